"""FedProx: FedAvg on the server, a proximal term in the clients' objective."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..client_config import ClientConfig
from .fedavg import FedAvgAggregator, FedAvgConfig
from .registry import register_aggregator


@dataclass
class FedProxConfig(FedAvgConfig):
    """FedProx: the server merges as FedAvg; `proximal_mu` is carried for the clients' proximal term.

    Args:
        proximal_mu (`float`): the clients' proximal coefficient `mu` in `mu/2 * ||theta - theta_global||^2`
            (0.01 by default). The server does not use it: [`FedProxAggregator.configure_client`] sends it to the
            clients.
    """

    proximal_mu: float = field(
        default=0.01, metadata={"help": "Clients' proximal coefficient mu (mu/2 ||theta - theta_global||^2); used client-side."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}.")




@register_aggregator("fedprox")
class FedProxAggregator(FedAvgAggregator):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", arXiv:1812.06127).

    The server side is FedAvg: FedProx changes the clients' objective, adding `mu/2 * ||theta - Theta||^2` (the
    trainer's proximal term). [`configure_client`] asks every client for the proximal term with `config.proximal_mu`.
    """

    config_class = FedProxConfig

    def configure_client(self, server_round: int) -> ClientConfig:
        return ClientConfig(proximal_mu=self.config.proximal_mu)
