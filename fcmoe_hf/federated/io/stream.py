"""Reading the updates of one merge, tensor by tensor or chunk of experts by chunk, into recycled float32 buffers.

A merge never holds every client's full adapter. It walks the global state group by group (and shared tensor by shared
tensor) and reads the clients' tensors one client at a time from their (possibly lazy, safetensors-backed) `deltas`
([`UpdateStream`]), or reads a chunk of experts of every client into one fixed float32 buffer ([`ChunkArena`],
[`read_stacked_rows`]): the expert rows of a group are contiguous on disk, so each update is read once, in forward
order. What is done with the values is the aggregators' business (`fcmoe_hf.federated.aggregators.kernels`).

Values are checked on the first read of each tensor of a merge: a client with NaN/Inf is reported with
[`~fcmoe_hf.federated.validation.ContentRejected`] and the aggregator restarts the merge without it, so a round with a
bad update costs one more merge and a valid round costs nothing.

Client updates may be clipped: a factor `clip[i]` scales client `i`'s whole update. It is folded into the weights and
statistics instead of scaling tensors, so no scaled copy of an update is ever made.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional

import torch

from ..update import ClientUpdate
from ..validation import ContentRejected, check_tensor_values, non_finite_reason
from .safetensors import LazySafetensors

ACCUMULATE_DTYPE = torch.float32
_CPU = torch.device("cpu")


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (for reading file bytes straight into it)."""
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())



def as_rows(tensor: torch.Tensor, expert_rows: bool) -> torch.Tensor:
    """A 2-D view: `(E, -1)` for an expert tensor (one row per expert), `(1, -1)` for a shared tensor."""
    if expert_rows:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(1, -1)


def row_sq_norm(a: torch.Tensor) -> torch.Tensor:
    """`(R,)` float64 squared L2 norms of the rows of a float32 2-D tensor."""
    return torch.linalg.vector_norm(a, dim=1).double().square()


def rows_shape(shape: Sequence[int], expert_rows: bool) -> tuple[int, int]:
    """The shape of [`as_rows`] of a tensor of shape `shape`."""
    numel = math.prod(shape)
    if expert_rows:
        return shape[0], numel // shape[0] if shape[0] else 0
    return 1, numel


class UpdateStream:
    """Reads the updates of one merge tensor by tensor, checks values on first reads, and tracks update norms.

    Float32 working copies of bf16/fp16 updates are made into recycled buffers ([`release`]): a merge converts
    thousands of same-shaped tensors, and fresh allocations for each were measured to cost more in page faults than
    the conversions themselves. Reads are plain sequential file reads left to the kernel's readahead (an explicit
    prefetch, by `posix_fadvise(WILLNEED)` or by a reader thread, measured slower here).

    Args:
        updates (`Sequence[ClientUpdate]`): the (structurally valid) updates being merged, in client order.
        clip (`Sequence[float]`, *optional*): per-client scale factors (norm clipping); all 1 by default.
        track_norms (`bool`): accumulate every client's squared update norm over first reads, for a norm bound.
        cache_bytes (`int`): memory allowed for keeping clients' float32 copies of one group between a first and a
            second read of it (see [`weighted_pass`]'s `keep`); clients beyond it are read again. 0 disables it.
    """

    def __init__(
        self,
        updates: Sequence[ClientUpdate],
        clip: Optional[Sequence[float]] = None,
        track_norms: bool = False,
        cache_bytes: int = 0,
    ):
        self.updates = list(updates)
        self.clip = torch.ones(len(self.updates), dtype=torch.float64) if clip is None else torch.tensor(list(clip), dtype=torch.float64)
        self.track_norms = track_norms
        self.cache_bytes = cache_bytes
        self.squared_norms = torch.zeros(len(self.updates), dtype=torch.float64)
        self._cache: dict[int, list[torch.Tensor]] = {}
        self._cached_bytes = 0
        self._free: dict[tuple, list[torch.Tensor]] = {}  # recycled float32 buffers by (shape, dtype, device)
        self._owned: dict[int, torch.Tensor] = {}  # handed-out buffers (never the caller's own tensors)

    def __len__(self) -> int:
        return len(self.updates)

    def read(
        self, i: int, keys: Sequence[str], device: torch.device, expert_rows: bool, dtype: Optional[torch.dtype] = ACCUMULATE_DTYPE
    ) -> list[torch.Tensor]:
        """Client `i`'s raw (unclipped) tensors `keys` as 2-D tensors, in `dtype` (`None`: as stored).

        Read-only: a tensor already in `dtype` may be the caller's own. Converted copies are recycled buffers: hand
        them back with [`release`] once done.
        """
        deltas = self.updates[i].deltas
        out = []
        for key in keys:
            raw = as_rows(deltas[key], expert_rows)
            if (dtype is None or raw.dtype == dtype) and raw.device == device:
                out.append(raw)
                continue
            spec = (tuple(raw.shape), dtype or raw.dtype, device)
            free = self._free.get(spec)
            buffer = free.pop() if free else torch.empty(spec[0], dtype=spec[1], device=device)
            buffer.copy_(raw)
            self._owned[id(buffer)] = buffer  # a strong reference: the id cannot be reused while it is ours
            out.append(buffer)
        return out

    def read_stacked(
        self, key: str, start: int, stop: int, out: torch.Tensor, row_norms: Optional[torch.Tensor] = None
    ) -> None:
        """Fill `out` (`(K, stop - start, D)`) with every client's raw rows `start:stop` of `key`, in `out`'s dtype.

        A lazy update reads just those rows from disk: straight into `out[i]` when stored in `out`'s dtype, else into a
        recycled staging buffer, converted while still in cache (staging every client first and converting once was
        measured slower: the staging area falls out of cache). `row_norms` (`(K, stop - start)`, `out`'s dtype), if
        given, receives the L2 norm of each row, also computed while the rows are in cache.
        """
        staging: dict[torch.dtype, tuple[torch.Tensor, memoryview]] = {}
        for i, update in enumerate(self.updates):
            deltas, target = update.deltas, out[i]
            if isinstance(deltas, LazySafetensors) and out.device == _CPU:
                dtype = deltas.tensor_info(key)[1]
                if dtype != out.dtype:
                    if dtype not in staging:
                        free = self._free.setdefault((tuple(out.shape[1:]), dtype, _CPU), [])
                        buffer = free.pop() if free else torch.empty(out.shape[1:], dtype=dtype)
                        staging[dtype] = (buffer, _bytes_of(buffer))
                    buffer, raw = staging[dtype]
                    deltas.readinto_rows(key, start, stop, raw)
                    target.copy_(buffer)
                else:
                    deltas.readinto_rows(key, start, stop, _bytes_of(target))
            else:
                target.copy_(as_rows(deltas[key][start:stop], True))
            if row_norms is not None:
                torch.linalg.vector_norm(target, dim=1, out=row_norms[i])
        for buffer, _ in staging.values():
            self._free[(tuple(buffer.shape), buffer.dtype, _CPU)].append(buffer)

    def release(self, tensors: Sequence[torch.Tensor]) -> None:
        """Recycle the converted buffers among `tensors` (others, e.g. the caller's tensors, are left alone)."""
        for t in tensors:
            if self._owned.get(id(t)) is t:
                del self._owned[id(t)]
                self._free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def keep(self, i: int, tensors: list[torch.Tensor]) -> bool:
        """Keep client `i`'s tensors for the next [`clients`] call over the same keys, if the budget allows."""
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self._cached_bytes + size > self.cache_bytes:
            return False
        self._cache[i] = tensors
        self._cached_bytes += size
        return True

    def clear_cache(self) -> None:
        """Drop (and recycle) every kept tensor."""
        for tensors in self._cache.values():
            self.release(tensors)
        self._cache.clear()
        self._cached_bytes = 0

    def clients(
        self,
        indices: Iterable[int],
        keys: Sequence[str],
        device: torch.device,
        expert_rows: bool,
        dtype: Optional[torch.dtype] = ACCUMULATE_DTYPE,
    ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Yield `(i, read(i, keys))` for each client in `indices`; kept tensors ([`keep`]) are served instead."""
        for i in indices:
            if i in self._cache:
                tensors = self._cache.pop(i)
                self._cached_bytes -= sum(t.numel() * t.element_size() for t in tensors)
                yield i, tensors
            else:
                yield i, self.read(i, keys, device, expert_rows, dtype)

    def check(
        self, i: int, keys: Sequence[str], tensors: Sequence[torch.Tensor], need_norms: bool
    ) -> Optional[torch.Tensor]:
        """First-read bookkeeping of client `i`'s `tensors`: its clipped per-row norms, or `None`.

        Norms are computed when `need_norms` or norm tracking asks for them; a non-finite norm means non-finite values
        (or a norm that overflows float32, itself a sign of a broken update) and raises [`ContentRejected`].
        """
        if not (need_norms or self.track_norms):
            return None
        squared = row_sq_norm(tensors[0])
        for t in tensors[1:]:
            squared += row_sq_norm(t)
        total = float(squared.sum())
        if not math.isfinite(total):  # NaN/Inf propagate into the norms; find which tensor and why
            for key, t in zip(keys, tensors):
                if not math.isfinite(float(row_sq_norm(t).sum())):
                    raise ContentRejected({i: non_finite_reason([key], [t], key)})
        scale = float(self.clip[i])
        if self.track_norms:
            self.squared_norms[i] += total * scale * scale
        return squared.sqrt() * scale

    def find_problems(self, keys: Sequence[str], indices: Optional[Iterable[int]] = None) -> dict[int, str]:
        """Re-read `keys` of the given clients (all by default) and return `{index: reason}` for invalid values."""
        problems = {}
        for i in range(len(self)) if indices is None else indices:
            for key in keys:
                reason = check_tensor_values(key, self.updates[i].deltas[key])
                if reason is not None:
                    problems[i] = reason
                    break
        return problems

    def norms(self) -> list[float]:
        """The tracked L2 norm of every client's update (clipped), over everything read so far."""
        return [math.sqrt(v) for v in self.squared_norms.tolist()]


def experts_per_chunk(num_clients: int, expert_numel: int, budget_bytes: int) -> int:
    """How many experts of every client fit in `budget_bytes` as float32 (`0`: not even one)."""
    per_expert = num_clients * expert_numel * torch.finfo(ACCUMULATE_DTYPE).bits // 8
    return budget_bytes // per_expert if per_expert else 0


class ChunkArena:
    """One reusable float32 buffer carved into `(K, experts, D)` views, one per tensor of a chunk.

    Every chunk of a merge reuses the same memory: a fresh allocation per chunk costs page faults on its first touch,
    about as much as the arithmetic done on it.
    """

    def __init__(self, device: torch.device = _CPU):
        self.device = device
        self._buffer = torch.empty(0, dtype=ACCUMULATE_DTYPE, device=device)

    def views(self, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """Contiguous, non-overlapping tensors of the given shapes (their contents are garbage)."""
        total = sum(math.prod(shape) for shape in shapes)
        if self._buffer.numel() < total:
            self._buffer = torch.empty(total, dtype=ACCUMULATE_DTYPE, device=self.device)
        out, offset = [], 0
        for shape in shapes:
            size = math.prod(shape)
            out.append(self._buffer[offset : offset + size].view(shape))
            offset += size
        return out


def read_stacked_rows(
    stream: UpdateStream, keys: Sequence[str], start: int, stop: int, out: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Fill `out[j]` (`(K, stop - start, D_j)` float32) with every client's raw rows `start:stop` of `keys[j]`.

    Lazy updates are read without per-read allocations: into `out` directly when stored as float32, else through one
    recycled staging buffer.

    Returns:
        `torch.Tensor` of shape `(K, stop - start)`: float64 squared norms of every client's expert rows over `keys`.
    """
    k, rows = out[0].shape[:2]
    norms = torch.empty(len(keys), k, rows, dtype=out[0].dtype, device=out[0].device)
    for j, (key, stacked) in enumerate(zip(keys, out)):
        stream.read_stacked(key, start, stop, stacked, row_norms=norms[j])
    return norms.double().square().sum(dim=0).cpu()
