"""FedAvg: the data-size-weighted mean of the clients' updates."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Aggregator, AggregatorConfig
from .kernels import data_size_scores, expert_weighted_mean, sample_sizes
from .registry import register_aggregator


@dataclass
class FedAvgConfig(AggregatorConfig):
    """FedAvg has no options beyond [`AggregatorConfig`]'s."""




@register_aggregator("fedavg")
class FedAvgAggregator(Aggregator):
    """FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    arXiv:1602.05629).

    `Theta <- Theta + sum_i (|D_i| / sum_j |D_j|) Delta_i` for every tensor, expert or not.
    """

    config_class = FedAvgConfig

    def _aggregate(self, global_state, stream):
        by_size = data_size_scores(sample_sizes(stream))
        return expert_weighted_mean(stream, global_state, lambda group, num_experts: by_size, need_norms=False)
