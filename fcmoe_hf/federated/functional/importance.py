"""Importance-aware expert weights (FC-MoE, arXiv:2606.15625, Eq. 2-3) and the data-size weights of the ablation.

For client `i` and expert `k`, the importance is `c[i,k] = f[i,k] * ||Delta[i,k]||`: how often the client's router
sent tokens to the expert, times how far the client moved it. The merge weights are `w[i,k] = c[i,k] / sum_j c[j,k]`:
a client that never activated `k` (`f = 0`) gets weight 0 and contributes nothing to it, and an expert with
`sum_j c[j,k] = 0` (nobody activated it, or nobody moved it) has all weights 0 and is left unchanged.

Every function works on `(K, E)` matrices (clients x experts of one expert group) in float64, vectorised over experts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:
    from ..update import ClientUpdate


def expert_norms(tensors: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """`(E,)` L2 norm of each expert's concatenated parameters over the group's tensors `keys` (computed in fp32+)."""
    squared = None
    for key in keys:
        t = tensors[key]
        part = t.reshape(t.shape[0], -1).double().square().sum(dim=1)
        squared = part if squared is None else squared + part
    return squared.sqrt()


def stack_statistics(updates: Sequence[ClientUpdate], group: str, num_experts: int, field: str = "activation_counts") -> torch.Tensor:
    """`(K, E)` float64 matrix of one per-expert statistic (`"activation_counts"` or `"mean_gate"`) of `group`.

    A client without the statistic for `group` gets a row of zeros: its router never sent a token there.
    """
    out = torch.zeros(len(updates), num_experts, dtype=torch.float64)
    for i, update in enumerate(updates):
        values = getattr(update, field).get(group)
        if values is not None:
            out[i] = values.detach().to(device="cpu", dtype=torch.float64)
    return out


def importance_scores(activation_counts: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Eq. 2: `c[i,k] = f[i,k] * ||Delta[i,k]||`.

    Args:
        activation_counts (`torch.Tensor` of shape `(K, E)`): `f[i,k]`, tokens client `i` routed to expert `k`.
        norms (`torch.Tensor` of shape `(K, E)`): `||Delta[i,k]||`, L2 norm of client `i`'s update of expert `k`.

    Returns:
        `torch.Tensor` of shape `(K, E)`, float64.
    """
    if activation_counts.shape != norms.shape:
        raise ValueError(f"activation_counts {tuple(activation_counts.shape)} and norms {tuple(norms.shape)} differ in shape.")
    return activation_counts.double() * norms.double()


def capped_norms(norms: torch.Tensor, activation_counts: torch.Tensor, factor: Optional[float]) -> torch.Tensor:
    """Norms for the importance, capped per expert: `min(||Delta[i,k]||, factor * m[k])`.

    `m[k]` is the median of the norms of the clients that activated expert `k` (`f[i,k] > 0`). Without the cap a
    client buys weight by scaling its update (`c = f * ||Delta||` grows with the scale); with it, at most `factor`
    times a typical client's. Experts nobody activated, or whose median is 0, are not capped; `factor=None` returns
    `norms` unchanged. Honest norms within the factor are returned bit for bit.

    Args:
        norms (`torch.Tensor` of shape `(K, E)`): `||Delta[i,k]||`.
        activation_counts (`torch.Tensor` of shape `(K, E)`): `f[i,k]`.
        factor (`float`, *optional*): the cap relative to the median.
    """
    if factor is None:
        return norms
    norms = norms.double()
    active = activation_counts > 0
    n = active.sum(dim=0)
    ordered = torch.where(active, norms, math.inf).sort(dim=0).values
    lower = ordered.gather(0, ((n - 1).clamp_min(0) // 2).unsqueeze(0)).squeeze(0)
    upper = ordered.gather(0, (n // 2).clamp_max(norms.shape[0] - 1).unsqueeze(0)).squeeze(0)
    median = (lower + upper) / 2
    cap = torch.where((n > 0) & (median > 0) & torch.isfinite(median), factor * median, math.inf)
    return torch.minimum(norms, cap.unsqueeze(0))


def normalize_scores(scores: torch.Tensor) -> torch.Tensor:
    """Per expert (column), `scores / scores.sum()`; a column that sums to 0 gets all-zero weights.

    Args:
        scores (`torch.Tensor` of shape `(K, E)`): non-negative scores (importance, data sizes, masked sizes, ...).

    Returns:
        `torch.Tensor` of shape `(K, E)`, float64: each column sums to 1, or is all 0 where nobody contributes.
    """
    scores = scores.double()
    total = scores.sum(dim=0, keepdim=True)
    return torch.where(total > 0, scores / torch.where(total > 0, total, 1.0), 0.0)


def importance_weights(activation_counts: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Eq. 3's weights `w[i,k] = c[i,k] / sum_j c[j,k]` with `c = f * ||Delta||`; all-zero columns stay zero."""
    return normalize_scores(importance_scores(activation_counts, norms))


def data_size_weights(num_samples: Union[Sequence[int], torch.Tensor], num_experts: int = 1) -> torch.Tensor:
    """FedAvg's weights `|D_i| / sum_j |D_j|`, repeated for each of `num_experts` columns: shape `(K, E)`, float64.

    This is the paper's ablation (c), "without importance weighting": every expert is weighted by data size, whether
    or not the client activated it.
    """
    sizes = torch.as_tensor(num_samples, dtype=torch.float64).reshape(-1, 1)
    if bool((sizes < 0).any()) or float(sizes.sum()) <= 0:
        raise ValueError(f"num_samples must be non-negative with a positive total, got {sizes.flatten().tolist()}.")
    return normalize_scores(sizes.expand(-1, num_experts))


def active_experts(scores: torch.Tensor) -> torch.Tensor:
    """`(E,)` bool: experts with a positive total score, i.e. that the merge changes."""
    return scores.double().sum(dim=0) > 0
