"""The shared streaming kernels of the aggregators: weighted sums of updates read once, and the step applied.

[`weighted_pass`] reads every client's tensors of one expert group (or one shared tensor) and folds them into a
float32 accumulator of the group's size, weighted per expert row by a score function; [`dot_pass`] is the second read
some merges need (dot products with vectors computed from the first). [`apply_step`] writes `Theta + factor * step`
in one fused pass. FedAvg, FedMoE, FC-MoE and the server optimizers are all built from these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..functional.consensus import row_dot
from ..functional.importance import normalize_scores
from ..functional.robust import ROBUST_BYTES_PER_ELEMENT
from ..io.safetensors import LazySafetensors
from ..io.stream import _CPU, ACCUMULATE_DTYPE, ChunkArena, UpdateStream, as_rows, read_stacked_rows, rows_shape
from ..layout import group_keys
from ..validation import ContentRejected, non_finite_reason
from .result import AggregationResult


@dataclass
class WeightedSum:
    """The result of [`weighted_pass`] over one group (or one shared tensor).

    The sums are not normalised: the weighted mean is `sums * inverse_total()` per row, which callers fold into the
    one operation that writes the new global tensor (no separate pass to divide).

    Args:
        sums (`list[torch.Tensor]`): per key, the `(R, D)` float32 `sum_i score[i] clip[i] Delta_i`.
        scores (`torch.Tensor` of shape `(K, R)`): the unnormalised per-row scores used, float64.
        norms (`torch.Tensor` of shape `(K, R)`, *optional*): per-row norms of the clipped updates, when computed.
    """

    sums: list[torch.Tensor]
    scores: torch.Tensor
    norms: Optional[torch.Tensor]

    def inverse_total(self) -> torch.Tensor:
        """`(R,)` float64 `1 / sum_i score[i]`, and 0 for rows nobody contributed to (their sums are exactly 0)."""
        total = self.scores.sum(dim=0)
        return torch.where(total > 0, 1.0 / torch.where(total > 0, total, 1.0), 0.0)


ScoreFn = Callable[[int, Optional[torch.Tensor]], torch.Tensor]


def weighted_pass(
    stream: UpdateStream,
    keys: Sequence[str],
    shapes: Sequence[torch.Size],
    *,
    expert_rows: bool,
    score_fn: ScoreFn,
    need_norms: bool,
    keep: bool = False,
    device: torch.device = _CPU,
) -> WeightedSum:
    """One streaming read of every client's `keys`: the score-weighted sum of their updates, row by row.

    Args:
        stream ([`UpdateStream`]): the updates.
        keys (`Sequence[str]`): the tensors of one expert group (or a single shared tensor).
        shapes (`Sequence[torch.Size]`): their shapes (the global state's).
        expert_rows (`bool`): one score per expert (dimension 0) if `True`, one per tensor if `False`.
        score_fn (`Callable`): `score_fn(i, norms_i)` -> `(R,)` (or a 0-d tensor: one for every row) non-negative
            scores of client `i`, given its per-row clipped norms (`None` when `need_norms` is `False`).
        need_norms (`bool`): compute per-row norms (importance needs them; they also check values).
        keep (`bool`): a second read of the same keys follows ([`dot_pass`]): keep clients' float32 copies within
            the stream's cache budget so it need not read and convert them again.
        device (`torch.device`): where to accumulate.
    """
    k = len(stream)
    stream.clear_cache()
    num_rows = rows_shape(shapes[0], expert_rows)[0]
    sums: list[Optional[torch.Tensor]] = [None] * len(keys)
    scores = torch.zeros(k, num_rows, dtype=torch.float64)
    norms = torch.zeros(k, num_rows, dtype=torch.float64) if need_norms else None
    # Tensors used more than once are converted to float32 once; a tensor only summed is summed as stored (bf16
    # updates: the kernel upcasts on the fly, without a float32 copy).
    reused = keep or need_norms or stream.track_norms
    unchecked: list[int] = []
    for i, tensors in stream.clients(range(k), keys, device, expert_rows, ACCUMULATE_DTYPE if reused else None):
        kept = keep and stream.keep(i, tensors)
        row_norms = stream.check(i, keys, tensors, need_norms)
        if norms is not None:
            norms[i] = row_norms
        score = score_fn(i, row_norms).double()
        scores[i] = score
        if score.dim() == 0:  # one weight for the whole client (data size): a scalar multiply-add
            coefficient = float(score) * float(stream.clip[i])
            nonzero = all_nonzero = coefficient != 0
        else:
            coefficient = (score * stream.clip[i]).to(device=device, dtype=ACCUMULATE_DTYPE).unsqueeze(1)
            values = score.tolist()  # E numbers: Python is cheaper than two more tensor reductions
            nonzero, all_nonzero = any(values), all(values)
        if row_norms is None and not all_nonzero:
            unchecked.append(i)  # a zero weight hides NaNs from the accumulator check below
        if nonzero:
            for j, t in enumerate(tensors):
                if sums[j] is None:  # the first contribution allocates the sum (float32 even for bf16 updates)
                    sums[j] = t.to(ACCUMULATE_DTYPE) * coefficient
                elif isinstance(coefficient, float):
                    sums[j].add_(t, alpha=coefficient)
                else:
                    sums[j].addcmul_(t, coefficient)
        if not kept:
            stream.release(tensors)
    out = [
        s if s is not None else torch.zeros(rows_shape(shape, expert_rows), dtype=ACCUMULATE_DTYPE, device=device)
        for s, shape in zip(sums, shapes)
    ]
    if norms is None:
        # A sum is finite iff its total is (NaN and Inf propagate); a total that overflows is confirmed elementwise.
        bad = [j for j, s in enumerate(out) if not math.isfinite(float(s.sum())) and not bool(torch.isfinite(s).all())]
        problems = stream.find_problems([keys[j] for j in bad]) if bad else {}
        problems.update(stream.find_problems(keys, [i for i in unchecked if i not in problems]))
        if problems:
            raise ContentRejected(problems)
        if bad:  # finite values whose weighted sum overflows: reject the largest contribution, not the round
            raise ContentRejected(_largest_contribution(stream, [keys[j] for j in bad], scores))
    return WeightedSum(sums=out, scores=scores, norms=norms)


def _largest_contribution(stream: UpdateStream, keys: Sequence[str], scores: torch.Tensor) -> dict[int, str]:
    """`{i: reason}` for the client whose weighted values in `keys` are the largest (the one that overflowed a sum)."""
    sizes = []
    for i, update in enumerate(stream.updates):
        weight = float(scores[i].abs().max()) * float(stream.clip[i])
        peak = max(float(update.deltas[key].abs().max()) if update.deltas[key].numel() else 0.0 for key in keys)
        sizes.append(weight * peak)
    worst = max(range(len(sizes)), key=lambda i: sizes[i])
    return {worst: f"its weighted values in {keys[0]!r} overflow the float32 sum of the merge (largest |value| x weight {sizes[worst]:.4g})"}


def dot_pass(
    stream: UpdateStream,
    keys: Sequence[str],
    indices: Sequence[int],
    vectors: Sequence[Sequence[torch.Tensor]],
    *,
    expert_rows: bool,
    device: torch.device = _CPU,
) -> torch.Tensor:
    """A second streaming read: `(K, V, R)` float64 dot products of clients' (clipped) updates with `V` vectors.

    Args:
        stream ([`UpdateStream`]): the updates.
        keys (`Sequence[str]`): the tensors of one expert group.
        indices (`Sequence[int]`): the clients to read; the others' rows stay 0.
        vectors (`Sequence[Sequence[torch.Tensor]]`): `V` vectors, each a list of float32 2-D tensors paired with
            `keys` (e.g. the consensus `g` and the previous global `Theta`).
        expert_rows (`bool`): per-expert rows if `True`.
        device (`torch.device`): where the vectors live.
    """
    out = torch.zeros(len(stream), len(vectors), vectors[0][0].shape[0], dtype=torch.float64)
    for i, tensors in stream.clients(indices, keys, device, expert_rows):
        for v, vector in enumerate(vectors):
            out[i, v] = sum(row_dot(t, b) for t, b in zip(tensors, vector, strict=True)) * stream.clip[i]
        stream.release(tensors)
    stream.clear_cache()  # clients not read this time (no weight) may still hold kept tensors
    return out


def sample_sizes(stream: UpdateStream) -> torch.Tensor:
    return torch.tensor([float(u.num_samples) for u in stream.updates], dtype=torch.float64)


def data_size_scores(sizes: torch.Tensor):
    return lambda i, norms: sizes[i]


def apply_step(
    theta: torch.Tensor, step: torch.Tensor, expert_rows: bool, factor: Optional[torch.Tensor] = None, owned: bool = False
) -> torch.Tensor:
    """`Theta + step`, or `Theta + factor[r] * step` per row, in float32, cast back to `Theta`'s dtype.

    One fused pass writes the new tensor: the weighted sums are never normalised in place first. With `owned` (`theta`
    is a fresh copy nobody else holds, e.g. read from a [`LazySafetensors`]) a float32 `theta` is updated in place:
    the same values, without allocating (and page-faulting) a second adapter's worth of memory.
    """
    in_place = owned and theta.dtype == ACCUMULATE_DTYPE and theta.device == step.device and theta.is_contiguous()
    base = as_rows(theta.to(device=step.device, dtype=ACCUMULATE_DTYPE), expert_rows)
    if factor is None:
        new = base.add_(step) if in_place else base + step
    else:
        factor = factor.to(device=step.device, dtype=ACCUMULATE_DTYPE).unsqueeze(1)
        new = base.addcmul_(step, factor) if in_place else torch.addcmul(base, step, factor)
    return new.reshape(theta.shape).to(theta.dtype)


def owns_tensors(global_state: Mapping[str, torch.Tensor]) -> bool:
    """Whether `global_state[key]` returns a fresh tensor on every access (a lazy file), which a merge may reuse."""
    return isinstance(global_state, LazySafetensors)


def weighted_group(stream, keys, theta, score_fn, need_norms, expert_rows=True, keep=False):
    return weighted_pass(
        stream,
        keys,
        [t.shape for t in theta],
        expert_rows=expert_rows,
        score_fn=score_fn,
        need_norms=need_norms,
        keep=keep,
        device=theta[0].device,
    )


def fedavg_shared(stream: UpdateStream, global_state: Mapping[str, torch.Tensor], keys: Sequence[str], sizes: torch.Tensor) -> dict[str, torch.Tensor]:
    """FedAvg of the non-expert tensors, one tensor at a time."""
    out = {}
    owned = owns_tensors(global_state)
    for key in keys:
        theta = global_state[key]
        result = weighted_group(stream, [key], [theta], data_size_scores(sizes), need_norms=False, expert_rows=False)
        out[key] = apply_step(theta, result.sums[0], False, result.inverse_total(), owned=owned)
    return out


def fedavg_steps(stream: UpdateStream, global_state: Mapping[str, torch.Tensor]):
    """Yield `(key, theta, pseudo-gradient)` for every tensor: the data-size-weighted mean update (FedAvg's step)."""
    sizes = sample_sizes(stream)
    for key in global_state.keys():
        theta = global_state[key]
        result = weighted_group(stream, [key], [theta], data_size_scores(sizes), need_norms=False, expert_rows=False)
        yield key, theta, (result.sums[0] * result.inverse_total().to(ACCUMULATE_DTYPE).unsqueeze(1)).reshape(theta.shape)


def expert_weighted_mean(stream: UpdateStream, global_state: Mapping[str, torch.Tensor], scores_of, need_norms: bool) -> AggregationResult:
    """`Theta + sum_i w[i,k] Delta[i,k]` per expert group with `w` the normalised `scores_of(group, num_experts)`
    (a `ScoreFn`); shared tensors by data size. FedAvg and usage-thresholded averaging differ only in the scores."""
    groups, shared = group_keys(global_state.keys())
    new, weights = {}, {}
    owned = owns_tensors(global_state)
    for group, keys in groups.items():
        theta = [global_state[key] for key in keys]
        result = weighted_group(stream, keys, theta, scores_of(group, theta[0].shape[0]), need_norms=need_norms)
        factor = result.inverse_total()
        new.update({key: apply_step(t, s, True, factor, owned) for key, t, s in zip(keys, theta, result.sums)})
        weights[group] = normalize_scores(result.scores)
    new.update(fedavg_shared(stream, global_state, shared, sample_sizes(stream)))
    return AggregationResult(
        global_state={key: new[key] for key in global_state.keys()},
        client_ids=[u.client_id for u in stream.updates],
        expert_weights=weights,
    )


def read_checked_chunk(stream: UpdateStream, keys: Sequence[str], start: int, stop: int, out: Sequence[torch.Tensor]) -> torch.Tensor:
    """[`read_stacked_rows`] with the first-read bookkeeping: values checked (NaN/Inf -> [`ContentRejected`]), norms
    tracked, and the clients' clip factors applied to the data (for statistics that cannot fold them into weights).

    Returns:
        `torch.Tensor` of shape `(K, stop - start)`: float64 squared norms of the clipped rows.
    """
    sq = read_stacked_rows(stream, keys, start, stop, out)
    bad = [i for i, total in enumerate(sq.sum(dim=1).tolist()) if not math.isfinite(total)]
    if bad:  # NaN/Inf propagate into the norms: name the tensor
        group = keys[0].rsplit(".", 1)[0]
        raise ContentRejected({i: non_finite_reason(keys, [x[i] for x in out], group) for i in bad})
    clip = stream.clip
    if bool((clip != 1).any()):
        for x in out:
            x.mul_(clip.to(device=x.device, dtype=x.dtype).view(-1, 1, 1))
    sq = sq * clip.square().unsqueeze(1)
    if stream.track_norms:
        stream.squared_norms += sq.sum(dim=1)
    return sq


def robust_rows(
    stream: UpdateStream,
    keys: Sequence[str],
    theta: Sequence[torch.Tensor],
    weights: torch.Tensor,
    statistic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    budget_bytes: int,
    arena: ChunkArena,
) -> list[torch.Tensor]:
    """A coordinate-wise `statistic` (e.g. [`~fcmoe_hf.federated.functional.robust.weighted_median`]) of every
    client's update of `keys`, row (expert) chunk by chunk: `(R, D_j)` float32 steps paired with `keys`.

    Args:
        weights (`torch.Tensor` of shape `(K, R)`): per client and row, the weight `statistic` gets (0: left out).
        budget_bytes (`int`): working memory; chunks hold at least one row of every client whatever the budget
            (`K x row x ROBUST_BYTES_PER_ELEMENT` bytes).
    """
    shapes = [rows_shape(t.shape, True) for t in theta]
    num_rows, k = shapes[0][0], len(stream)
    per_row = k * sum(d for _, d in shapes) * ROBUST_BYTES_PER_ELEMENT
    chunk = max(1, budget_bytes // per_row) if per_row else num_rows
    steps = [torch.zeros(shape, dtype=ACCUMULATE_DTYPE, device=theta[0].device) for shape in shapes]
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        stacked = arena.views([(k, stop - start, d) for _, d in shapes])
        read_checked_chunk(stream, keys, start, stop, stacked)
        for x, step in zip(stacked, steps):
            step[start:stop] = statistic(x, weights[:, start:stop])
    return steps
