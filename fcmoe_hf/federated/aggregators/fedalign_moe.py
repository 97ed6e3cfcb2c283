"""FedAlign-MoE's routing-share weighting of expert updates (arXiv:2603.21276)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..functional.importance import stack_statistics
from ..update import ClientUpdate
from .base import Aggregator, AggregatorConfig
from .kernels import expert_weighted_mean
from .registry import register_aggregator


@dataclass
class FedAlignMoEConfig(AggregatorConfig):
    """FedAlign-MoE's routing-share weighting has no options beyond [`AggregatorConfig`]'s."""


def routing_shares(updates: Sequence[ClientUpdate], group: str, num_experts: int) -> torch.Tensor:
    """`(K, E)` float64 routing shares `s_i(e) = f_i(e) / sum_e' f_i(e')` of one expert group.

    `f_i(e)` is the number of tokens client `i`'s router sent to expert `e` (its `activation_counts`). Each row sums
    to 1, or is all 0 for a client that routed no token in `group` (or reported no counts for it).

    Args:
        updates (`Sequence[ClientUpdate]`): the clients' updates.
        group (`str`): the expert group.
        num_experts (`int`): `E`, the group's number of experts.
    """
    counts = stack_statistics(updates, group, num_experts)
    total = counts.sum(dim=1, keepdim=True)
    return torch.where(total > 0, counts / torch.where(total > 0, total, 1.0), 0.0)


@register_aggregator("fedalign_moe")
class FedAlignMoEAggregator(Aggregator):
    """FedAlign-MoE's routing-share weighting of expert updates (arXiv:2603.21276), without any projection.

    With `f_i(e)` the tokens client `i` routed to expert `e` of a group and `s_i(e) = f_i(e) / sum_e' f_i(e')` its
    routing share (0 for every expert of a group where the client routed nothing), expert `e` is merged as

        `Theta_e <- Theta_e + sum_i w_i(e) Delta_i(e)`,  `w_i(e) = s_i(e) / sum_j s_j(e)`.

    An expert with `sum_j s_j(e) = 0` (no client routed a token to it) is left unchanged. Shared (non-expert) tensors:
    FedAvg by data size `|D_i|`.

    Compared with FC-MoE's importance `c_i(e) = f_i(e) * ||Delta_i(e)||` (arXiv:2606.15625, Eq. 2), the score has no
    norm factor (how far a client moved an expert does not change its weight), and the counts are normalised per
    client first, so a client's weight reflects how it splits its own traffic among the experts, not how many tokens
    it has: a client with few tokens that routes them all to one expert weighs as much there as a large client that
    does the same. Neither the data size nor the number of tokens enters the expert weights.
    """

    config_class = FedAlignMoEConfig

    def _aggregate(self, global_state, stream):
        def scores_of(group, num_experts):
            shares = routing_shares(stream.updates, group, num_experts)
            return lambda i, norms: shares[i]

        return expert_weighted_mean(stream, global_state, scores_of, need_norms=False)
