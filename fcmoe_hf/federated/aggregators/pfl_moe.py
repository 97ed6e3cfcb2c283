"""PFL-MoE's server side: FedAvg (the personal model and its gate stay on the clients)."""

from __future__ import annotations

from dataclasses import dataclass

from ..client_config import ClientConfig
from .fedavg import FedAvgAggregator, FedAvgConfig
from .registry import register_aggregator


@dataclass
class PFLMoEConfig(FedAvgConfig):
    """PFL-MoE's server is FedAvg; the personal model and the gate are client-side and have no server options."""




@register_aggregator("pfl_moe")
class PFLMoEAggregator(FedAvgAggregator):
    """PFL-MoE (Guo et al. 2021, "PFL-MoE: Personalized Federated Learning Based on Mixture of Experts",
    arXiv:2012.15589).

    The server is FedAvg: `Theta <- Theta + sum_i (|D_i| / sum |D|) Delta_i`. Each client then freezes the FedAvg model,
    trains a personal copy (on 3/4 of its data) and a gate `g = sigmoid(w . x)` (on 1/4) that mixes the two:
    `output = g * f_global + (1 - g) * f_personal`. The personal copy and the gate never leave the client, so the
    server returns only the global state; `personalized_state` is the global state (the mixing is client-side).
    [`configure_client`] asks the clients for that local part (`ClientConfig(personalization="pfl_moe")`, carried out
    by [`~fcmoe_hf.personalization.train_pfl_moe_client`]).
    """

    config_class = PFLMoEConfig

    def configure_client(self, server_round: int) -> ClientConfig:
        """Every round: plain local training of the global adapter, plus PFL-MoE's personal adapter and gate."""
        return ClientConfig(personalization="pfl_moe")
