"""FedAdam: an adaptive server optimizer (Reddi et al. 2021, arXiv:2003.00295)."""

from __future__ import annotations

from dataclasses import dataclass

from .fedopt import FedOptAggregator, FedOptConfig
from .registry import register_aggregator


@dataclass
class FedAdamConfig(FedOptConfig):
    """FedAdam: Flower's defaults `eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-9`."""




@register_aggregator("fedadam")
class FedAdamAggregator(FedOptAggregator):
    """FedAdam (Reddi et al. 2021, arXiv:2003.00295): `v_t = beta_2 v_{t-1} + (1 - beta_2) d_t^2`."""

    config_class = FedAdamConfig

    def _second_moment(self, v, d2):
        return self.config.beta_2 * v + (1 - self.config.beta_2) * d2
