"""Validation of client updates before they are merged.

An update from a client is untrusted input: it must carry exactly the global adapter's tensors, with the same shapes, a
floating dtype, finite values and a norm within a configured bound; its activation statistics must name known expert
groups with one non-negative count per expert. A bad update is *rejected* (logged and reported with a reason), never
merged, and never repaired in place: nothing here mutates its inputs.

Structural checks ([`check_update_structure`]) read only metadata (shapes and dtypes come from the safetensors header
when the deltas are a [`~fcmoe_hf.federated.LazySafetensors`]). Value checks need the data; the aggregators run them
while streaming the merge (the first read of every tensor), so a valid round reads each client's tensors no more often
than the merge itself does. [`validate_update`] runs every check at once, for callers that want a verdict up front.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .bounds import UpdateBounds, count_problem, counts_problem
from .io.safetensors import describe_tensor
from .layout import group_keys
from .update import ClientUpdate

logger = logging.getLogger(__name__)

#: How many offending keys a rejection reason lists before summarising the rest.
_MAX_LISTED = 5


@dataclass(frozen=True)
class RejectedUpdate:
    """An update left out of a merge, and why.

    Args:
        client_id (`str`): the client that sent it.
        reason (`str`): a human-readable reason naming the offending field, key or value.
    """

    client_id: str
    reason: str


class ContentRejected(Exception):
    """Raised inside a merge when client updates turn out to hold invalid values; `problems` maps index -> reason."""

    def __init__(self, problems: dict[int, str]):
        super().__init__("; ".join(f"client #{i}: {r}" for i, r in sorted(problems.items())))
        self.problems = problems


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def global_expert_sizes(global_state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """`{group: E}`: the number of experts of every expert group of the global state (its tensors' dimension 0).

    Raises:
        `ValueError`: if the tensors of one group disagree on the number of experts (a malformed global state).
    """
    sizes: dict[str, int] = {}
    for group, keys in group_keys(global_state.keys())[0].items():
        dims = {key: describe_tensor(global_state, key)[0] for key in keys}
        counts = {shape[0] if len(shape) else 0 for shape in dims.values()}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(
                f"Global state: the tensors of expert group {group!r} must share a non-zero dimension 0 (the expert "
                f"index); got shapes { {k: tuple(v) for k, v in dims.items()} }."
            )
        sizes[group] = counts.pop()
    return sizes


def _check_statistics(name: str, stats: Mapping[str, torch.Tensor], sizes: Mapping[str, int]) -> Optional[str]:
    unknown = [group for group in stats if group not in sizes]
    if unknown:
        return f"{name} names unknown expert groups {_listed(unknown)}"
    for group, values in stats.items():
        if not isinstance(values, torch.Tensor):
            return f"{name}[{group!r}] is a {type(values).__name__}, expected a tensor"
        if tuple(values.shape) != (sizes[group],):
            return f"{name}[{group!r}] has shape {tuple(values.shape)}, expected ({sizes[group]},) (one per expert)"
        if values.dtype == torch.bool or values.is_complex():
            return f"{name}[{group!r}] has dtype {values.dtype}, expected a real number type"
        values = values.double()
        if not bool(torch.isfinite(values).all()):
            return f"{name}[{group!r}] has non-finite values"
        if bool((values < 0).any()):
            return f"{name}[{group!r}] has negative values"
        if name == "activation_counts":
            problem = counts_problem(f"{name}[{group!r}]", values)
            if problem is not None:
                return problem
        elif bool((values > 1.0 + 1e-6).any()):
            return f"{name}[{group!r}] has values above 1 (it holds mean router probabilities)"
    return None


def check_update_structure(
    update: ClientUpdate,
    global_state: Mapping[str, torch.Tensor],
    *,
    expert_sizes: Optional[Mapping[str, int]] = None,
) -> Optional[str]:
    """Check an update's metadata against the global state; reads no tensor data.

    Checks `client_id` (a non-empty string), `num_samples` (an exact integer in `[1, 2**53]`: not a `bool`, float or
    string), the key set (missing and unexpected keys are both reported), every
    tensor's shape and floating dtype, and `activation_counts` / `mean_gate` (known groups, shape `(E,)`, finite,
    non-negative; counts whole numbers within `2**53`, gates at most 1).

    Args:
        update ([`ClientUpdate`]): the update to check.
        global_state (`Mapping[str, torch.Tensor]`): the global state the update must match (may be lazy).
        expert_sizes (`Mapping[str, int]`, *optional*): `{group: E}` of the global state, when already computed
            by [`global_expert_sizes`].

    Returns:
        `Optional[str]`: `None` if the update is well formed, else the reason it is not.
    """
    if not isinstance(update.client_id, str) or not update.client_id:
        return f"client_id must be a non-empty string, got {update.client_id!r}"
    problem = count_problem(update.num_samples, "num_samples", minimum=1)
    if problem is not None:
        return problem
    keys = set(update.deltas.keys())
    missing = [k for k in global_state.keys() if k not in keys]
    extra = [k for k in update.deltas.keys() if k not in global_state]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if extra:
            parts.append(f"unexpected keys {_listed(extra)}")
        return "; ".join(parts)
    for key in global_state.keys():
        expected, _ = describe_tensor(global_state, key)
        shape, dtype = describe_tensor(update.deltas, key)
        if tuple(shape) != tuple(expected):
            return f"shape mismatch for {key!r}: expected {tuple(expected)}, got {tuple(shape)}"
        if dtype is None or not dtype.is_floating_point:
            return f"non-floating dtype {dtype} for {key!r}"
    sizes = global_expert_sizes(global_state) if expert_sizes is None else expert_sizes
    return _check_statistics("activation_counts", update.activation_counts, sizes) or _check_statistics(
        "mean_gate", update.mean_gate, sizes
    )


def check_tensor_values(key: str, tensor: torch.Tensor) -> Optional[str]:
    """`None` if `tensor` is floating and finite everywhere, else the reason naming `key`."""
    if not tensor.is_floating_point():
        return f"non-floating dtype {tensor.dtype} for {key!r}"
    if not bool(torch.isfinite(tensor).all()):
        return f"non-finite values (NaN or Inf) in {key!r}"
    return None


def non_finite_reason(keys: Sequence[str], tensors: Sequence[torch.Tensor], what: str) -> str:
    """Why tensors with a non-finite norm are invalid: the first key holding NaN/Inf, else `what`'s norm overflows."""
    for key, t in zip(keys, tensors):
        reason = check_tensor_values(key, t)
        if reason is not None:
            return reason
    return f"the norm of {what!r} overflows float32"


def check_global_state(global_state: Mapping[str, torch.Tensor]) -> None:
    """Raise `ValueError` if the global state is empty, has a non-floating tensor or inconsistent expert groups."""
    if len(global_state) == 0:
        raise ValueError("The global state is empty.")
    for key in global_state.keys():
        _, dtype = describe_tensor(global_state, key)
        if dtype is None or not dtype.is_floating_point:
            raise ValueError(f"Global state tensor {key!r} has non-floating dtype {dtype}.")
    global_expert_sizes(global_state)


def check_update_norm(norm: float, max_update_norm: Optional[float]) -> Optional[str]:
    """`None` if the update's L2 norm is finite and within `max_update_norm` (`None`: no bound), else the reason."""
    if not math.isfinite(norm):
        return f"update norm is not finite ({norm})"
    if max_update_norm is not None and norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds max_update_norm {max_update_norm:.4g}"
    return None


def median_norm(values: Sequence[float]) -> float:
    """The median of `values` (the mean of the two middle ones for an even count; non-finite values count as
    infinite). With at least 3 clients one scaled update cannot move it beyond the honest norms; with 2 it can (the
    mean of both), and a relative bound then guards nothing: no statistic tells one honest client of two apart."""
    ordered = sorted(v if math.isfinite(v) else math.inf for v in values)
    if not ordered:
        return math.nan
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def relative_norm_problem(norm: float, reference: Optional[float], factor: Optional[float]) -> Optional[str]:
    """`None` if `norm <= factor * reference` (or no relative bound is set, or the reference is 0), else the reason."""
    if factor is None or reference is None or not math.isfinite(reference) or reference <= 0:
        return None
    if not math.isfinite(norm) or norm > factor * reference:
        return f"update norm {norm:.4g} exceeds norm_bound_factor {factor:g} x the round's median update norm {reference:.4g}"
    return None


def clip_factor(norm: float, clip_update_norm: Optional[float]) -> float:
    """The factor `min(1, clip / norm)` that scales an update of L2 norm `norm` to at most `clip_update_norm`."""
    if clip_update_norm is None or norm <= clip_update_norm or norm == 0:
        return 1.0
    return clip_update_norm / norm


def measure_update(update: ClientUpdate) -> tuple[float, Optional[str]]:
    """`(L2 norm of the whole update, None)`, or `(nan, reason)` if a tensor is not floating or not finite.

    Reads every tensor once (streaming: one tensor in memory at a time).
    """
    squared = 0.0
    for key in update.deltas.keys():
        tensor = update.deltas[key]
        reason = check_tensor_values(key, tensor)
        if reason is not None:
            return math.nan, reason
        squared += float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
    return math.sqrt(squared), None


def update_norm(update: ClientUpdate) -> float:
    """The L2 norm of the whole update over all its tensors.

    Raises:
        `ValueError`: naming the client and the key, if a tensor is not floating or has non-finite values.
    """
    norm, reason = measure_update(update)
    if reason is not None:
        raise ValueError(f"Client {update.client_id!r}: {reason}")
    return norm


def validate_update(
    update: ClientUpdate,
    global_state: Mapping[str, torch.Tensor],
    *,
    max_update_norm: Optional[float] = None,
    check_values: bool = True,
) -> Optional[str]:
    """Run every check on one update: structure, then (with `check_values`) finite values and the norm bound.

    Args:
        update ([`ClientUpdate`]): the update to check; not modified.
        global_state (`Mapping[str, torch.Tensor]`): the global state it must match.
        max_update_norm (`float`, *optional*): bound on the update's L2 norm over all tensors; `None` for no bound.
        check_values (`bool`): also read the tensors (finite values, norm). `False` checks metadata only.

    Returns:
        `Optional[str]`: `None` if the update is valid, else the reason it is not.
    """
    reason = check_update_structure(update, global_state)
    if reason is not None or not check_values:
        return reason
    return _value_problem(update, max_update_norm)


def _value_problem(update: ClientUpdate, max_update_norm: Optional[float]) -> Optional[str]:
    norm, reason = measure_update(update)
    return reason if reason is not None else check_update_norm(norm, max_update_norm)


def reject(client_id: str, reason: str) -> RejectedUpdate:
    """Log a rejected update (python `logging`, WARNING) and return its [`RejectedUpdate`] record."""
    logger.warning("Rejected the update of client %r: %s", client_id, reason)
    return RejectedUpdate(client_id=client_id, reason=reason)


Received = Union[ClientUpdate, RejectedUpdate]


def received_updates(updates: Union[Sequence[Received], Mapping[str, Received]]) -> list[tuple[Optional[str], Received]]:
    """`[(sender, update)]`: the transport's sender id when `updates` is a `Mapping` (sender -> update), else `None`."""
    if isinstance(updates, Mapping):
        return [(str(sender), update) for sender, update in updates.items()]
    if isinstance(updates, (str, bytes)) or not isinstance(updates, Sequence):
        raise TypeError(f"updates must be a sequence of ClientUpdate or a mapping sender -> ClientUpdate, got {type(updates).__name__}.")
    return [(None, update) for update in updates]


def validate_updates(
    updates: Union[Sequence[Received], Mapping[str, Received]],
    global_state: Mapping[str, torch.Tensor],
    *,
    max_update_norm: Optional[float] = None,
    check_values: bool = True,
    bounds: Optional[UpdateBounds] = None,
) -> tuple[list[ClientUpdate], list[RejectedUpdate]]:
    """Split `updates` into the valid ones and the rejected ones (each logged with its reason), order preserved.

    Ids: when `updates` is a mapping `{sender: update}` (the transport bound each update to the node it came from),
    an update claiming another id than its sender's is rejected as spoofed, so a client cannot be impersonated. When
    it is a plain sequence, the server cannot tell a real client from an impostor: *every* update claiming an id that
    more than one update claims is rejected (keeping the first would let whoever is faster take the id). With
    `bounds.clients`, an id not assigned to the round is rejected. [`RejectedUpdate`] items (rejected upstream, e.g.
    an unreadable file) are passed through. See [`validate_update`] for the other checks, and
    [`UpdateBounds.check`] for the bounds.
    """
    sizes = global_expert_sizes(global_state)
    received = received_updates(updates)
    rejected: list[RejectedUpdate] = []
    claims: dict[str, int] = {}
    for sender, update in received:
        if isinstance(update, RejectedUpdate):
            continue
        if not isinstance(update, ClientUpdate):
            raise TypeError(f"Expected ClientUpdate objects, got {type(update).__name__}.")
        if sender is None or update.client_id == sender:
            claims[update.client_id] = claims.get(update.client_id, 0) + 1
    valid: list[ClientUpdate] = []
    for sender, update in received:
        if isinstance(update, RejectedUpdate):
            rejected.append(update)
            continue
        cid = update.client_id
        if sender is not None and cid != sender:
            rejected.append(reject(sender, f"the update claims client_id {cid!r} but was received from {sender!r}"))
            continue
        if claims.get(cid, 0) > 1:
            rejected.append(
                reject(cid, f"client_id {cid!r} is claimed by {claims[cid]} updates in this round; all claims rejected")
            )
            continue
        reason = check_update_structure(update, global_state, expert_sizes=sizes)
        if reason is None and bounds is not None:
            reason = bounds.check(cid, update.num_samples, update.activation_counts)
        if reason is None and check_values:
            reason = _value_problem(update, max_update_norm)
        if reason is None:
            valid.append(update)
        else:
            rejected.append(reject(cid if isinstance(cid, str) else repr(cid), reason))
    return valid, rejected


def load_update(directory, client_id: Optional[str] = None, lazy: bool = True) -> Received:
    """[`ClientUpdate.load`], or a [`RejectedUpdate`] naming the file and field when the update cannot be read.

    For a transport that hands unreadable updates to the aggregator as rejections (the round goes on) instead of
    aborting the round. `client_id` is the id the transport assigned (used to name the rejection).
    """
    try:
        return ClientUpdate.load(directory, lazy=lazy)
    except (OSError, ValueError) as err:
        return reject(client_id if client_id is not None else os.fspath(directory), str(err))


def require_min_clients(num_valid: int, rejected: Sequence[RejectedUpdate], min_clients: int) -> None:
    """Raise a `ValueError` listing the rejections when fewer than `min_clients` valid updates remain."""
    if num_valid >= max(min_clients, 1):
        return
    details = "; ".join(f"{r.client_id}: {r.reason}" for r in rejected) or "no updates were given"
    raise ValueError(
        f"Only {num_valid} valid client update(s) remain, fewer than min_clients={min_clients}; the global state is "
        f"left unchanged. Rejected: {details}"
    )
