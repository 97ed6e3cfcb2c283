"""Coordinate-wise robust statistics of client updates: median and trimmed mean, plain or weighted.

Each function takes the updates of a chunk of rows (experts, or rows of a shared tensor) of every client as one
`(K, R, D)` tensor and per-row client weights `(K, R)`, and returns the `(R, D)` statistic over the clients, computed
independently for every coordinate. A client with weight 0 in a row does not take part in it (the way MoE aggregators
leave out clients that never routed a token to an expert); a row nobody takes part in gets 0 (its parameters stay).

- [`weighted_median`]: per coordinate, the value `x` where the clients' weight below and above are both at most half
  the total; when a whole interval qualifies (equal weights, an even number of clients), the mean of its two ends.
  With equal weights it is the ordinary median (NumPy's `median`, Flower's `FedMedian`), the mean of the two middle
  values for an even count.
- [`trimmed_mean`]: Flower's `FedTrimmedAvg` (SciPy's `trim_mean`): of the `n` participating values, the
  `floor(beta * n)` smallest and as many largest are dropped, the rest averaged. Unweighted.
- [`weighted_trimmed_mean`]: the weighted generalisation: the weight mass below the `beta` quantile and above the
  `1 - beta` quantile is removed (a value straddling a cut keeps the part of its weight inside), the rest is the
  weighted mean. With equal weights and `beta * n` an integer it equals [`trimmed_mean`].

Memory: a sort of the chunk (values and indices: about 16 bytes per element besides the chunk's own 4), so callers
size chunks with [`ROBUST_BYTES_PER_ELEMENT`]. No Python loop runs over elements or clients.
"""

from __future__ import annotations

import torch

#: Working bytes per chunk element of these functions (the float32 chunk, the sort's values and int64 indices, the
#: gathered weights and their cumulative sums), to size chunks.
ROBUST_BYTES_PER_ELEMENT = 28


def _sorted_with_weights(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` sorted along clients, and the weights (float64, expanded per coordinate) in the same order."""
    ordered, index = values.sort(dim=0)
    w = weights.to(device=values.device, dtype=torch.float64).unsqueeze(-1).expand(values.shape)
    return ordered, w.gather(0, index)


def _check(values: torch.Tensor, weights: torch.Tensor) -> None:
    if values.dim() != 3 or tuple(weights.shape) != tuple(values.shape[:2]):
        raise ValueError(f"Expected values (K, R, D) and weights (K, R), got {tuple(values.shape)} and {tuple(weights.shape)}.")
    if bool((weights < 0).any()):
        raise ValueError("Robust statistics need non-negative weights.")


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise weighted median over clients (see the module docstring); rows with no weight get 0.

    Args:
        values (`torch.Tensor` of shape `(K, R, D)`): the clients' values.
        weights (`torch.Tensor` of shape `(K, R)`): non-negative weights; `(weights > 0).double()` gives the plain
            median of the participating clients.

    Returns:
        `torch.Tensor` of shape `(R, D)`, in `values`' dtype.
    """
    _check(values, weights)
    ordered, w = _sorted_with_weights(values, weights)
    cumulative = w.cumsum(dim=0)
    half = cumulative[-1:] / 2
    last = values.shape[0] - 1
    # The first position whose cumulative weight reaches half the total, and the first that passes it: both carry
    # weight (the cumulative sum jumps there), and they differ only when the half falls exactly between two values.
    lower = (cumulative < half).sum(dim=0, keepdim=True).clamp_max(last)
    upper = (cumulative <= half).sum(dim=0, keepdim=True).clamp_max(last)
    median = (ordered.gather(0, lower).double() + ordered.gather(0, upper).double()) / 2
    total = cumulative[-1]
    return torch.where(total > 0, median.squeeze(0), 0.0).to(values.dtype)


def trimmed_mean(values: torch.Tensor, participating: torch.Tensor, beta: float) -> torch.Tensor:
    """Flower's `FedTrimmedAvg` per coordinate over the participating clients of each row (unweighted).

    Args:
        values (`torch.Tensor` of shape `(K, R, D)`): the clients' values.
        participating (`torch.Tensor` of shape `(K, R)`, bool): who takes part in each row.
        beta (`float`): the fraction cut at each end, in `[0, 0.5)`.

    Returns:
        `torch.Tensor` of shape `(R, D)`, in `values`' dtype (0 for rows nobody takes part in).
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}.")
    _check(values, participating)
    participating = participating.to(values.device).bool()
    n = participating.sum(dim=0)  # (R,)
    cut = torch.floor(beta * n.double()).long()
    # Non-participants sort last (+inf), so the participating values are positions 0..n-1 of every row.
    ordered = torch.where(participating.unsqueeze(-1), values, torch.inf).sort(dim=0).values
    position = torch.arange(values.shape[0], device=values.device).view(-1, 1)
    keep = ((position >= cut) & (position < n - cut)).unsqueeze(-1)  # (K, R, 1)
    total = torch.where(keep, ordered.double(), 0.0).sum(dim=0)
    count = (n - 2 * cut).clamp_min(1).double().unsqueeze(-1)
    return torch.where((n > 0).unsqueeze(-1), total / count, 0.0).to(values.dtype)


def weighted_trimmed_mean(values: torch.Tensor, weights: torch.Tensor, beta: float) -> torch.Tensor:
    """Coordinate-wise weighted trimmed mean: `beta` of the weight mass cut at each end (see the module docstring).

    Args:
        values (`torch.Tensor` of shape `(K, R, D)`): the clients' values.
        weights (`torch.Tensor` of shape `(K, R)`): non-negative weights.
        beta (`float`): the weight fraction cut at each end, in `[0, 0.5)`.

    Returns:
        `torch.Tensor` of shape `(R, D)`, in `values`' dtype (0 for rows with no weight).
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}.")
    _check(values, weights)
    ordered, w = _sorted_with_weights(values, weights)
    upper_end = w.cumsum(dim=0)
    lower_end = upper_end - w
    total = upper_end[-1:]
    low, high = beta * total, (1 - beta) * total
    kept = (torch.minimum(upper_end, high) - torch.maximum(lower_end, low)).clamp_min(0)
    kept_total = kept.sum(dim=0)
    mean = (kept * ordered.double()).sum(dim=0) / torch.where(kept_total > 0, kept_total, 1.0)
    return torch.where(kept_total > 0, mean, 0.0).to(values.dtype)
