"""A lazy, read-only mapping over a safetensors file: tensors (or ranges of their rows) read from disk on access.

The server streams clients' updates tensor by tensor, and row range by row range, instead of holding every update in
memory. Nothing here does arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from safetensors import safe_open

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def describe_tensor(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[torch.Size, Optional[torch.dtype]]:
    """`(shape, dtype)` of `tensors[key]`, read from the file header when `tensors` is a [`LazySafetensors`]."""
    if isinstance(tensors, LazySafetensors):
        return tensors.tensor_info(key)
    tensor = tensors[key]
    return tensor.shape, tensor.dtype


class _DescriptorBudget:
    """How many read descriptors [`LazySafetensors`] objects may keep open at once, process-wide.

    A merge reads every client's file in turn, so it would keep K descriptors open; past the process's limit on open
    files (often 1024, 256 on macOS) that fails. A quarter of the soft limit is kept at most; beyond it, reads open
    and close a descriptor each time. Hosts without positional reads (Windows) never keep one: threads would share its
    file offset.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            soft = 512
        soft = 4096 if soft < 0 else soft  # RLIM_INFINITY
        self.limit = max(8, min(1024, soft // 4)) if hasattr(os, "pread") else 0

    def acquire(self) -> bool:
        with self._lock:
            if self.held >= self.limit:
                return False
            self.held += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.held = max(0, self.held - 1)


_DESCRIPTORS = _DescriptorBudget()


class LazySafetensors(Mapping):
    """A read-only `Mapping[str, Tensor]` over a safetensors file: each tensor is read from disk on access.

    Lets the server stream clients' updates tensor by tensor instead of holding every full update in memory. The
    header is parsed once (keys, shapes, dtypes, offsets, checked against the file size); each access then reads just
    that tensor's bytes (or, with [`read_rows`], a range of its rows) into a fresh tensor. Nothing is memory-mapped, so
    memory (RSS) holds only the tensors the caller keeps, and repeated reads of a recently read tensor come from the OS
    page cache. One read-only file descriptor is kept open from the first read until [`close`] (aggregators close the
files they merged) or garbage collection, within a process-wide budget (see `_DescriptorBudget`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._info: dict[str, tuple[torch.Size, Optional[torch.dtype]]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._fd: Optional[int] = None
        self._lock = threading.Lock()
        self._size = -1
        if sys.byteorder != "little":  # safetensors is little-endian: let the library byte-swap
            with safe_open(self.path, framework="pt") as f:
                for key in f.keys():
                    info = f.get_slice(key)
                    self._info[key] = (torch.Size(info.get_shape()), _SAFETENSORS_DTYPES.get(info.get_dtype()))
            self._keys = list(self._info)
            return
        self._keys = []
        try:
            size = self._size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header length {header_len} exceeds the file size {size}")
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, ValueError) as err:
            raise ValueError(f"Cannot read the safetensors header of {self.path}: {err}") from err
        data_start = 8 + header_len
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            shape = torch.Size(entry.get("shape", ()))
            begin, end = entry.get("data_offsets", (0, -1))
            expected = math.prod(shape) * (dtype.itemsize if dtype is not None else 0)
            if dtype is not None and (end - begin != expected or data_start + end > size or begin < 0):
                raise ValueError(f"{self.path}: tensor {key!r} has inconsistent offsets {begin, end} for {tuple(shape)} {dtype}.")
            self._keys.append(key)
            self._info[key] = (shape, dtype)
            self._offsets[key] = (data_start + begin, end - begin)
        self._keys.sort()  # the order safetensors' own `keys()` gives

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._info:
            raise KeyError(key)
        shape, dtype = self._info[key]
        if key not in self._offsets or dtype is None:
            with safe_open(self.path, framework="pt") as f:
                return f.get_tensor(key)
        return self.read_rows(key, 0, shape[0] if len(shape) else 1).reshape(shape)

    def read_rows(self, key: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows `start:stop` (along dimension 0) of tensor `key`, read from disk without reading the rest.

        Args:
            key (`str`): the tensor.
            start (`int`), stop (`int`): the row range.
            out (`torch.Tensor`, *optional*): a contiguous tensor of the stored dtype and `stop - start` rows' size to
                read into (a recycled buffer); a fresh tensor otherwise.

        Returns:
            `torch.Tensor` of shape `(stop - start, *shape[1:])` in the stored dtype.
        """
        shape, dtype = self._info[key]
        if key not in self._offsets or dtype is None:
            return self[key][start:stop]
        size = self._row_range(key, start, stop)[1]
        if out is None:
            out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        elif out.dtype != dtype or out.numel() * out.element_size() != size or not out.is_contiguous():
            raise ValueError(f"read_rows({key!r}): `out` must be a contiguous {dtype} tensor of {size} bytes.")
        if size:
            self.readinto_rows(key, start, stop, memoryview(out.view(torch.uint8).reshape(-1).numpy()))
        return out.view(stop - start, *shape[1:])

    def readinto_rows(self, key: str, start: int, stop: int, view: memoryview) -> None:
        """Read the raw bytes of rows `start:stop` of `key` (stored dtype, little-endian) into `view`, its exact size.

        The allocation-free form of [`read_rows`], for callers that read many slices into one buffer.
        """
        if key not in self._offsets or self._info[key][1] is None:  # read through safetensors (e.g. big-endian hosts)
            rows = self.read_rows(key, start, stop).contiguous()
            data = memoryview(rows.view(torch.uint8).reshape(-1).numpy())
            if len(view) != len(data):
                raise ValueError(f"readinto_rows({key!r}, {start}, {stop}) needs {len(data)} bytes, got {len(view)}.")
            view[:] = data
            return
        offset, size = self._row_range(key, start, stop)
        if len(view) != size:
            raise ValueError(f"readinto_rows({key!r}, {start}, {stop}) needs {size} bytes, got a buffer of {len(view)}.")
        self._read_into(offset, view, key)

    def _row_range(self, key: str, start: int, stop: int) -> tuple[int, int]:
        """`(file offset, byte count)` of rows `start:stop` of `key`."""
        shape = self._info[key][0]
        offset, nbytes = self._offsets[key]
        rows = shape[0] if len(shape) else 1
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"rows {start}:{stop} out of range for {key!r} with {rows} rows.")
        row_bytes = nbytes // rows if rows else 0
        return offset + start * row_bytes, (stop - start) * row_bytes

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        if os.fstat(fd).st_size != self._size:
            os.close(fd)
            raise ValueError(f"{self.path} changed on disk since its header was read.")
        return fd

    def _read_into(self, offset: int, view: memoryview, key: str) -> None:
        # A merge reads thousands of slices, and an open() per read costs more than the read: the object keeps one
        # descriptor, within a process-wide budget (beyond it, a descriptor per read). The file must be the one
        # whose header was parsed.
        fd, transient = self._fd, False
        if fd is None:
            with self._lock:
                if self._fd is None:
                    fd = self._open()
                    if _DESCRIPTORS.acquire():
                        self._fd = fd
                    else:
                        transient = True
                else:
                    fd = self._fd
        try:
            done = 0
            while done < len(view):
                if hasattr(os, "preadv"):
                    n = os.preadv(fd, [view[done:]], offset + done)
                elif hasattr(os, "pread"):
                    chunk = os.pread(fd, len(view) - done, offset + done)
                    n = len(chunk)
                    view[done : done + n] = chunk
                else:  # Windows: no positional reads, and this descriptor's offset is ours alone
                    os.lseek(fd, offset + done, os.SEEK_SET)
                    chunk = os.read(fd, len(view) - done)
                    n = len(chunk)
                    view[done : done + n] = chunk
                if not n:
                    raise ValueError(f"{self.path} ended while reading tensor {key!r}.")
                done += n
        finally:
            if transient:
                os.close(fd)

    def close(self) -> None:
        """Close the file descriptor kept for reads (reopened by the next read). Aggregators call it after a merge."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                _DESCRIPTORS.release()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = None  # descriptors and locks do not cross processes
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def tensor_info(self, key: str) -> tuple[torch.Size, Optional[torch.dtype]]:
        """`(shape, dtype)` of `key` from the file header, without reading the tensor (dtype `None` if torch lacks it)."""
        if key not in self._info:
            raise KeyError(key)
        return self._info[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._info


