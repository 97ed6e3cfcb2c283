"""FedAdam: an adaptive server optimizer (Reddi et al. 2021, arXiv:2003.00295)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .fedopt import FedOptAggregator, FedOptConfig
from .registry import register_aggregator


@dataclass
class FedAdamConfig(FedOptConfig):
    """FedAdam: Flower's defaults `eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3`, and its bias correction.

    Args:
        bias_correction (`bool`): scale the step as Flower's `FedAdam` does, `eta_t = eta * sqrt(1 - beta_2^(t+1)) /
            (1 - beta_1^(t+1))` with `t` the 1-based round (Adam's correction, Kingma & Ba 2015, shifted by one round
            as in flwr 1.4x). `False` gives Reddi et al.'s Algorithm 2 as printed (no correction).
    """

    bias_correction: bool = field(default=True, metadata={"help": "Flower's bias-corrected step size (False: none)."})




@register_aggregator("fedadam")
class FedAdamAggregator(FedOptAggregator):
    """FedAdam (Reddi et al. 2021, arXiv:2003.00295): `v_t = beta_2 v_{t-1} + (1 - beta_2) d_t^2`."""

    config_class = FedAdamConfig

    def _step_size(self, t: int) -> float:
        cfg = self.config
        if not cfg.bias_correction:
            return cfg.server_learning_rate
        return cfg.server_learning_rate * math.sqrt(1 - cfg.beta_2 ** (t + 1)) / (1 - cfg.beta_1 ** (t + 1))

    def _second_moment(self, v, d2):
        return self.config.beta_2 * v + (1 - self.config.beta_2) * d2
