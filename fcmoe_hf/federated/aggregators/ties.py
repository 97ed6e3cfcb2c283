"""TIES-Merging of client updates: trim, elect sign, disjoint mean."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..io.stream import ACCUMULATE_DTYPE, rows_shape
from .base import Aggregator, AggregatorConfig
from .kernels import apply_step
from .registry import register_aggregator
from .result import AggregationResult


@dataclass
class TiesConfig(AggregatorConfig):
    """TIES-Merging (Yadav et al. 2023).

    Args:
        density (`float`): fraction of each update's entries kept per tensor, by magnitude (the paper's k = 20%).
        scaling (`float`): `lambda`, the merged update's scale (1.0).
    """

    density: float = field(default=0.2, metadata={"help": "Fraction of each update's largest-magnitude entries kept per tensor."})
    scaling: float = field(default=1.0, metadata={"help": "Scale lambda of the merged update."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}.")




@register_aggregator("ties")
class TiesAggregator(Aggregator):
    """TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
    arXiv:2306.01708), applied to client updates tensor by tensor.

    1. Trim: keep the `density` fraction of each update's entries with the largest magnitude (per tensor), zero the
       rest: `hat Delta_i`;
    2. elect: `gamma = sign(sum_i hat Delta_i)` per entry;
    3. disjoint mean: `Delta = mean over {i : sign(hat Delta_i) = gamma, hat Delta_i != 0} of hat Delta_i`;
    4. `Theta <- Theta + scaling * Delta`.

    Unweighted, as in the paper. Two streaming reads per tensor; per-client trim thresholds are kept between them.
    """

    config_class = TiesConfig

    @staticmethod
    def _threshold(values: torch.Tensor, density: float) -> torch.Tensor:
        flat = values.abs().flatten()
        keep = max(1, math.ceil(density * flat.numel()))
        return torch.kthvalue(flat, flat.numel() - keep + 1).values

    def _aggregate(self, global_state, stream):
        cfg = self.config
        new = {}
        for key in global_state.keys():
            theta = global_state[key]
            device = theta.device
            elect = torch.zeros(rows_shape(theta.shape, False), dtype=ACCUMULATE_DTYPE, device=device)
            thresholds = []
            for i, (t,) in stream.clients(range(len(stream)), [key], device, expert_rows=False):
                stream.check(i, [key], [t], need_norms=True)
                threshold = self._threshold(t, cfg.density)
                thresholds.append(threshold)
                elect.add_(torch.where(t.abs() >= threshold, t, 0.0), alpha=float(stream.clip[i]))
                stream.release([t])
            sign = torch.sign(elect)
            total = torch.zeros_like(elect)
            count = torch.zeros_like(elect)
            for i, (t,) in stream.clients(range(len(stream)), [key], device, expert_rows=False):
                trimmed = torch.where(t.abs() >= thresholds[i], t, 0.0) * float(stream.clip[i])
                agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
                total.add_(torch.where(agree, trimmed, 0.0))
                count.add_(agree.to(count.dtype))
                stream.release([t])
            merged = total / count.clamp_min(1.0)
            new[key] = apply_step(theta, cfg.scaling * merged, expert_rows=False)
        return AggregationResult(global_state=new, client_ids=[u.client_id for u in stream.updates])
