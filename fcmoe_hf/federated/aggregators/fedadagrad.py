"""FedAdagrad: an adaptive server optimizer (Reddi et al. 2021, arXiv:2003.00295)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .fedopt import FedOptAggregator, FedOptConfig
from .registry import register_aggregator


@dataclass
class FedAdagradConfig(FedOptConfig):
    """FedAdagrad: Flower's defaults `eta=0.1, beta_1=0.0 (no momentum), tau=1e-3`."""

    beta_1: float = field(default=0.0, metadata={"help": "First-moment decay beta_1 (0: no momentum)."})




@register_aggregator("fedadagrad")
class FedAdagradAggregator(FedOptAggregator):
    """FedAdagrad (Reddi et al. 2021, arXiv:2003.00295): `v_t = v_{t-1} + d_t^2`."""

    config_class = FedAdagradConfig

    def _second_moment(self, v, d2):
        return v + d2
