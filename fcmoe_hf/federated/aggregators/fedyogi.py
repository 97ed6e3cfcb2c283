"""FedYogi: an adaptive server optimizer (Reddi et al. 2021, arXiv:2003.00295)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .fedopt import FedOptAggregator, FedOptConfig
from .registry import register_aggregator


@dataclass
class FedYogiConfig(FedOptConfig):
    """FedYogi: Flower's defaults `eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3`."""

    server_learning_rate: float = field(default=0.01, metadata={"help": "Server learning rate eta."})




@register_aggregator("fedyogi")
class FedYogiAggregator(FedOptAggregator):
    """FedYogi (Reddi et al. 2021, arXiv:2003.00295): `v_t = v_{t-1} - (1 - beta_2) d_t^2 sign(v_{t-1} - d_t^2)`."""

    config_class = FedYogiConfig

    def _second_moment(self, v, d2):
        return v - (1 - self.config.beta_2) * d2 * torch.sign(v - d2)
