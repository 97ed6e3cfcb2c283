"""FedAvgM: server momentum over FedAvg's step."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import AggregatorConfig
from .registry import register_aggregator
from .server_optimizer import ServerOptimizerAggregator


@dataclass
class FedAvgMConfig(AggregatorConfig):
    """FedAvgM (Hsu et al. 2019) server momentum.

    Args:
        server_learning_rate (`float`): server step size `eta` (1.0).
        server_momentum (`float`): momentum `beta` (0.9, the paper's usual value; 0 gives FedAvg when `eta = 1`).
    """

    server_learning_rate: float = field(default=1.0, metadata={"help": "Server learning rate eta."})
    server_momentum: float = field(default=0.9, metadata={"help": "Server momentum beta (0 with eta=1 is FedAvg)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.server_momentum}.")




@register_aggregator("fedavgm")
class FedAvgMAggregator(ServerOptimizerAggregator):
    """FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification", arXiv:1909.06335).

    `m_t = beta * m_{t-1} + d_t`, `Theta <- Theta + eta * m_t`, with `d_t` FedAvg's step and `m_0 = 0`.
    """

    config_class = FedAvgMConfig
    _buffers = ("momentum",)

    def _update(self, d, state):
        cfg = self.config
        m = d.clone() if state["momentum"] is None else cfg.server_momentum * state["momentum"] + d
        return cfg.server_learning_rate * m, {"momentum": m}
