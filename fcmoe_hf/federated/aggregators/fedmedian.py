"""FedMedian: the coordinate-wise median of the clients' updates, per expert over the clients that used it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..functional.importance import normalize_scores, stack_statistics
from ..functional.robust import weighted_median
from ..io.stream import ChunkArena, rows_shape
from ..layout import group_keys
from .base import Aggregator, AggregatorConfig
from .kernels import apply_step, owns_tensors, robust_rows
from .registry import register_aggregator
from .result import AggregationResult


@dataclass
class FedMedianConfig(AggregatorConfig):
    """Coordinate-wise robust aggregation (Yin et al. 2018, "Byzantine-Robust Distributed Learning", arXiv:1803.01498).

    Args:
        per_expert (`bool`): an expert's statistic is taken over the clients that routed at least one token to it
            (`activation_counts > 0`), as the MoE aggregators weight experts; an expert nobody used stays unchanged.
            `False`: every client counts for every tensor (Flower's strategies, which know no experts).
        merge_buffer_mb (`float`): working memory (MiB) for chunks of rows of every client (64 MiB); a chunk holds at
            least one expert of every client whatever the budget.
    """

    per_expert: bool = field(default=True, metadata={"help": "Per expert, only the clients that activated it take part."})
    merge_buffer_mb: float = field(default=64.0, metadata={"help": "Working memory (MiB) of the chunked merge."})

    def __post_init__(self):
        super().__post_init__()
        if self.merge_buffer_mb < 0:
            raise ValueError(f"merge_buffer_mb must be >= 0, got {self.merge_buffer_mb}.")


class CoordinateWiseAggregator(Aggregator):
    """`Theta <- Theta + statistic_i(Delta_i)` coordinate by coordinate, chunk of rows by chunk of rows.

    Memory: `K` clients' copies of one chunk of rows (at most `merge_buffer_mb`, at least one expert or row of every
    client) and the sort's working space; each update is read once. Subclasses give `_statistic(values, weights)`.
    """

    config_class = FedMedianConfig

    def _statistic(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _aggregate(self, global_state, stream):
        cfg = self.config
        groups, shared = group_keys(global_state.keys())
        budget = int(cfg.merge_buffer_mb * 2**20)
        owned = owns_tensors(global_state)
        arenas: dict[torch.device, ChunkArena] = {}
        new, expert_weights = {}, {}
        k = len(stream)
        for group, keys in groups.items():
            theta = [global_state[key] for key in keys]
            num_experts = theta[0].shape[0]
            if cfg.per_expert:
                weights = (stack_statistics(stream.updates, group, num_experts) > 0).double()
            else:
                weights = torch.ones(k, num_experts, dtype=torch.float64)
            arena = arenas.setdefault(theta[0].device, ChunkArena(theta[0].device))
            steps = robust_rows(stream, keys, theta, weights, self._statistic, budget, arena)
            new.update({key: apply_step(t, s, True, owned=owned) for key, t, s in zip(keys, theta, steps)})
            expert_weights[group] = normalize_scores(weights)
        for key in shared:
            theta = global_state[key]
            arena = arenas.setdefault(theta.device, ChunkArena(theta.device))
            weights = torch.ones(k, rows_shape(theta.shape, True)[0], dtype=torch.float64)
            (step,) = robust_rows(stream, [key], [theta], weights, self._statistic, budget, arena)
            new[key] = apply_step(theta, step, True, owned=owned)
        return AggregationResult(
            global_state={key: new[key] for key in global_state.keys()},
            client_ids=[u.client_id for u in stream.updates],
            expert_weights=expert_weights,
        )


@register_aggregator("fedmedian")
class FedMedianAggregator(CoordinateWiseAggregator):
    """FedMedian (Yin et al. 2018, arXiv:1803.01498; Flower's `FedMedian`): every coordinate of the new state is the
    previous one plus the median of the clients' updates of it, unweighted (NumPy's median: the mean of the two middle
    values for an even count). Flower takes the median of the clients' parameters `Theta + Delta_i`; with one start
    `Theta` for every client that is the same number (up to float32 rounding).

    Per expert, only the clients that activated the expert take part (`config.per_expert`). Shared tensors: every
    client. A minority of arbitrary updates cannot move a coordinate beyond the range of the honest values.
    """

    config_class = FedMedianConfig

    def _statistic(self, values, weights):
        return weighted_median(values, (weights > 0).double())
