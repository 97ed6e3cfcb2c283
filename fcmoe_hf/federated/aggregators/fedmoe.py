"""FedMoE stand-in: usage-thresholded expert averaging."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..update import ClientUpdate
from .base import Aggregator, AggregatorConfig
from .kernels import expert_weighted_mean, sample_sizes
from .registry import register_aggregator


@dataclass
class FedMoEConfig(AggregatorConfig):
    """Usage-thresholded expert averaging (the FedMoE stand-in: the closest published formula to FedMoE's modular aggregation, arXiv:2408.11304).

    Args:
        usage_threshold (`float`): `tau`; client `c` contributes to expert `e` when its usage `u_c(e) >= tau`.
        threshold_relative (`bool`): read `usage_threshold` as a fraction of the uniform share `1/E` (default: 0.5
            means "at least half of what a uniform router would give"), so one value fits any number of experts.
    """

    usage_threshold: float = field(default=0.5, metadata={"help": "Usage threshold tau (see threshold_relative)."})
    threshold_relative: bool = field(
        default=True, metadata={"help": "Read usage_threshold as a fraction of the uniform share 1/E."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.usage_threshold < 0:
            raise ValueError(f"usage_threshold must be >= 0, got {self.usage_threshold}.")




@register_aggregator("fedmoe")
class FedMoEAggregator(Aggregator):
    """FedMoE stand-in: usage-thresholded expert averaging (Mei et al. 2024, arXiv:2408.11304; formula from the
    same group's HFedMoE).

    With `u_c(e)` the mean gate value of expert `e` on client `c`'s data and `tau` the usage threshold,
    `E_e <- sum_c |D_c| 1[u_c(e) >= tau] E_e(c) / sum_c |D_c| 1[u_c(e) >= tau]`, applied to updates:
    `Theta_e += sum_c w_c Delta_e(c)` with those weights. An expert no client uses enough stays unchanged. Shared
    tensors: FedAvg. A client without `mean_gate` for a group uses its activation-count shares `f / sum f` instead
    (both sum to 1 over experts); a client with neither never used the group.
    """

    config_class = FedMoEConfig

    def _usage(self, updates: Sequence[ClientUpdate], group: str, num_experts: int) -> torch.Tensor:
        usage = torch.zeros(len(updates), num_experts, dtype=torch.float64)
        for i, update in enumerate(updates):
            if group in update.mean_gate:
                usage[i] = update.mean_gate[group].double()
            elif group in update.activation_counts:
                counts = update.activation_counts[group].double()
                if counts.sum() > 0:
                    usage[i] = counts / counts.sum()
        return usage

    def _aggregate(self, global_state, stream):
        cfg = self.config
        sizes = sample_sizes(stream)

        def scores_of(group, num_experts):
            tau = cfg.usage_threshold / num_experts if cfg.threshold_relative else cfg.usage_threshold
            scores = sizes.unsqueeze(1) * (self._usage(stream.updates, group, num_experts) >= tau).double()
            return lambda i, norms: scores[i]

        return expert_weighted_mean(stream, global_state, scores_of, need_norms=True)
