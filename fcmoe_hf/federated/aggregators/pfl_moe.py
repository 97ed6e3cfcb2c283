"""PFL-MoE's server side: FedAvg (the personal model and its gate stay on the clients)."""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    config_class = PFLMoEConfig
