"""Adaptive server optimizers (FedOpt): the shared configuration and update rule of FedAdam, FedYogi, FedAdagrad."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import AggregatorConfig
from .server_optimizer import ServerOptimizerAggregator


@dataclass
class FedOptConfig(AggregatorConfig):
    """Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", arXiv:2003.00295).

    Defaults are those of Flower's strategies (`flwr.serverapp.strategy`, flwr 1.4x) and so is the arithmetic: the
    same numbers give the same step to float tolerance (a test runs flwr's own code beside these). The right server
    learning rate depends on the scale of the updates (LoRA deltas are small): tune it.

    Args:
        server_learning_rate (`float`): `eta`.
        beta_1 (`float`): first-moment decay.
        beta_2 (`float`): second-moment decay (unused by FedAdagrad).
        tau (`float`): adaptivity (denominator offset).
    """

    server_learning_rate: float = field(default=0.1, metadata={"help": "Server learning rate eta."})
    beta_1: float = field(default=0.9, metadata={"help": "First-moment decay beta_1."})
    beta_2: float = field(default=0.99, metadata={"help": "Second-moment decay beta_2 (unused by FedAdagrad)."})
    tau: float = field(default=1e-3, metadata={"help": "Adaptivity tau added to sqrt(v)."})

    def __post_init__(self):
        super().__post_init__()
        if not (0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1):
            raise ValueError(f"beta_1 and beta_2 must be in [0, 1), got {self.beta_1}, {self.beta_2}.")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}.")




class FedOptAggregator(ServerOptimizerAggregator):
    """Reddi et al. 2021 Algorithm 2: `m_t = beta_1 m + (1 - beta_1) d`, `v_t` per variant,
    `Theta <- Theta + eta_t * m_t / (sqrt(v_t) + tau)`; `m` and `v` start at 0, as Flower's `FedOpt` does. `eta_t` is
    `eta` except where a variant corrects it ([`FedAdamAggregator`]); `t` is the 1-based number of this merge."""

    _buffers = ("m", "v")

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _step_size(self, t: int) -> float:
        """`eta_t` of the `t`-th merge (1-based)."""
        return self.config.server_learning_rate

    def _update(self, d, state):
        cfg = self.config
        m_prev = torch.zeros_like(d) if state["m"] is None else state["m"]
        v_prev = torch.zeros_like(d) if state["v"] is None else state["v"]
        m = cfg.beta_1 * m_prev + (1 - cfg.beta_1) * d
        v = self._second_moment(v_prev, d * d)
        return self._step_size(self._step + 1) * m / (v.sqrt() + cfg.tau), {"m": m, "v": v}
