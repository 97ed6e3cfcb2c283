"""Atomic, checksummed per-round checkpoints of a federation, and resuming from them. Nothing is pickled.

A checkpoint directory `checkpoints/round_NNNN/` holds the global state and the aggregator's state (safetensors), the
run's bookkeeping (`state.json`), the RNG states (`rng_state.json` for Python's and NumPy's generators,
`rng_state.safetensors` for torch's) and any small extra files the caller adds (the federation adds the adapter's
`adapter_config.json` and its model cards' fields, so a killed run's latest round can be published:
[`~fcmoe_hf.simulation.export.export_checkpoint`]).

Integrity:

- `state.json` is written last and records the SHA-256 of every other file of the checkpoint (`files`) and of its own
  content (`state_sha256`); every file is fsynced before the commit.
- `latest_checkpoint` names the last complete checkpoint: it is replaced atomically after the directory is written,
  so a run killed at any point resumes from a complete round. Its content is validated (a `round_NNNN` name of a
  directory inside the run's `checkpoints/`, no link) before anything is read. When it is missing (deleted), empty
  or names no directory while complete checkpoints exist, the newest one that passes its check is used, with a
  warning naming the pointer: a resume never restarts from round 0 and a plain run is refused as with a pointer.
- The previous complete checkpoint is kept (`keep=2`). On [`CheckpointStore.load`] a checkpoint whose files are
  missing, truncated, altered (checksum), unreadable or hold non-finite values fails its check; the previous one is
  then used, with a warning naming the files and what is wrong with them, and a [`CheckpointError`] naming every
  file is raised when no checkpoint passes.
- Only JSON and safetensors are read; any other file in a checkpoint directory (a planted `rng_state.pt`) is ignored.
- The client ids `state.json` records (`last_update_round`, `update_scales`) must be plain names
  ([`check_client_id`]): they become paths (`rounds/round_NNNN/updates/<client_id>`, an export's
  `clients/<client_id>/`), so an id such as `../../x` fails the checkpoint's check instead of reaching outside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .client_ids import CLIENT_ID_PATTERN, CheckpointError, check_client_id, client_problems
from .rng import rng_state, set_rng_state

__all__ = [
    "CLIENT_ID_PATTERN", "CheckpointError", "CheckpointStore", "check_client_id", "rng_state", "set_rng_state",
]

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpoint"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
GLOBAL_STATE_FILE = "global_state.safetensors"
AGGREGATOR_STATE_FILE = "aggregator_state.safetensors"
RNG_JSON_FILE = "rng_state.json"
RNG_TENSORS_FILE = "rng_state.safetensors"
#: The files every checkpoint has besides `state.json`.
REQUIRED_FILES = (GLOBAL_STATE_FILE, AGGREGATOR_STATE_FILE, RNG_JSON_FILE, RNG_TENSORS_FILE)
#: Version of the checkpoint layout written into `state.json` (`1`: no checksums; `2`: checksums).
FORMAT_VERSION = 2
_NAME = re.compile(r"^round_\d{4,}$")
def checkpoint_name(round_index: int) -> str:
    return f"round_{round_index:04d}"


def _round_of(name: str) -> int:
    return int(name.removeprefix("round_"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state_digest(state: Mapping[str, Any]) -> str:
    # The digest of state.json's content without its own digest field, over a canonical serialisation.
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, default=str).encode())


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def non_finite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors of `tensors` that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


class CheckpointStore:
    """The checkpoints of one run directory.

    Args:
        run_dir (`Path`): the run directory.
        keep (`int`, *optional*, defaults to 2): complete checkpoints kept: the newest and, with the default, the one
            before it (used, with a warning, when the newest fails its check on resume).
    """

    def __init__(self, run_dir: Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}.")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS_DIR
        self.keep = keep
        #: After [`load`]: the checkpoints that failed their check and were skipped, as `(directory, reason)`.
        self.skipped: list[tuple[Path, str]] = []

    # -- writing ----------------------------------------------------------------------------------------------------

    def save(
        self,
        round_index: int,
        global_state: Mapping[str, torch.Tensor],
        aggregator_state: Mapping[str, torch.Tensor],
        state: Mapping[str, Any],
        files: Optional[Mapping[str, bytes]] = None,
    ) -> Path:
        """Write round `round_index`'s checkpoint, then point `latest_checkpoint` at it atomically; prune old ones.

        Args:
            round_index (`int`): the round just completed.
            global_state (`Mapping[str, torch.Tensor]`): the global state after it.
            aggregator_state (`Mapping[str, torch.Tensor]`): the aggregator's state (server momentum, ...).
            state (`Mapping[str, Any]`): the run's bookkeeping, JSON-ready (`round`, `format`, `files`,
                `key_order` and `state_sha256` are added).
            files (`Mapping[str, bytes]`, *optional*): extra files (plain names) written into the checkpoint directory
                before it is committed.
        """
        reserved = {STATE_FILE, *REQUIRED_FILES}
        for name in files or {}:
            if Path(name).name != name or name in ("", ".", "..") or name in reserved:
                raise ValueError(f"Extra checkpoint file {name!r} is not a plain file name of its own.")
        directory = self.root / checkpoint_name(round_index)
        if directory.is_symlink():
            directory.unlink()
        elif directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        plain, tensors = rng_state()
        digests: dict[str, str] = {}

        def put(name: str, data: bytes) -> None:
            _write_synced(directory / name, data)
            digests[name] = sha256_bytes(data)

        put(GLOBAL_STATE_FILE, _serialize({k: v.contiguous() for k, v in global_state.items()}))
        put(AGGREGATOR_STATE_FILE, _serialize(dict(aggregator_state)))
        put(RNG_TENSORS_FILE, _serialize(tensors))
        put(RNG_JSON_FILE, json.dumps(plain).encode())
        for name, content in (files or {}).items():
            put(name, bytes(content))
        # safetensors stores keys sorted; the dicts' own order is kept so that a resumed run iterates (and so sums
        # floats) in the order an uninterrupted one does.
        order = {GLOBAL_STATE_FILE: list(global_state), AGGREGATOR_STATE_FILE: list(aggregator_state)}
        record = {"round": round_index, **state, "format": FORMAT_VERSION, "files": digests, "key_order": order}
        record = json.loads(json.dumps(record, default=str))
        record["state_sha256"] = _state_digest(record)
        _write_synced(directory / STATE_FILE, json.dumps(record, indent=2).encode())
        _fsync_path(directory)
        previous = self._latest_name()
        tmp = self.run_dir / f"{LATEST_FILE}.tmp"
        _write_synced(tmp, directory.name.encode())
        os.replace(tmp, self.run_dir / LATEST_FILE)  # the commit point: a kill before it keeps the previous round
        _fsync_path(self.run_dir)
        self._prune(round_index, previous)
        return directory

    def _prune(self, round_index: int, previous: Optional[str]) -> None:
        # Kept: the new checkpoint and the `keep - 1` newest complete ones before it (the previous latest first).
        # Gone: older ones, ones past the new round (an abandoned run's), and incomplete ones (no state.json).
        older = sorted(
            (p for p in self._round_dirs() if _round_of(p.name) < round_index and (p / STATE_FILE).is_file()),
            key=lambda p: _round_of(p.name), reverse=True,
        )
        if previous is not None and any(p.name == previous for p in older):
            older.sort(key=lambda p: p.name != previous)  # stable: the previous latest first, then newest first
        keep = {checkpoint_name(round_index), *(p.name for p in older[: self.keep - 1])}
        for old in self._round_dirs():
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def _round_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if _NAME.match(p.name) and p.is_dir() and not p.is_symlink()]

    # -- finding ----------------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the run has checkpoints: `latest_checkpoint`, or complete checkpoint directories without it."""
        return (self.run_dir / LATEST_FILE).exists() or bool(self._complete_dirs())

    def _complete_dirs(self) -> list[Path]:
        # Checkpoint directories whose state.json (written last) exists, newest first.
        found = [p for p in self._round_dirs() if (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: _round_of(p.name), reverse=True)

    def _latest_name(self) -> Optional[str]:
        # The checkpoint `latest_checkpoint` names; `None` when it is missing or empty.
        latest = self.run_dir / LATEST_FILE
        if not latest.exists():
            return None
        name = latest.read_text().strip()
        if name and not _NAME.match(name):
            raise CheckpointError(f"{latest} names {name!r}, not a checkpoint of this run (expected round_NNNN).")
        return name or None

    def _pointer_problem(self) -> Optional[str]:
        # Why `latest_checkpoint` cannot be followed (missing, empty, or naming no directory), or None when it can.
        latest, name = self.run_dir / LATEST_FILE, self._latest_name()
        if name is None:
            return f"{latest} is {'empty' if latest.exists() else 'missing'}"
        directory = self.root / name
        return None if directory.is_dir() or directory.is_symlink() else f"{latest} names {name!r}, which does not exist"

    def latest(self) -> Optional[Path]:
        """The directory `latest_checkpoint` names, validated, or `None` when the run has none.

        When `latest_checkpoint` is missing, empty or names no directory while complete checkpoints exist, the newest
        one that passes its check is returned, with a warning naming the pointer.

        Raises:
            [`CheckpointError`]: `latest_checkpoint` names something other than a checkpoint, or a link; or it cannot
                be followed and no complete checkpoint passes its check.
        """
        if self._pointer_problem() is not None:
            found = self._first_passing()
            return None if found is None else found[0]
        directory = self.root / self._latest_name()
        if directory.is_symlink():
            raise CheckpointError(f"{self.run_dir / LATEST_FILE} names {directory.name!r}, but {directory} is a link.")
        return directory

    def latest_round(self) -> Optional[int]:
        """The round of the latest complete checkpoint, or `None` when the run has none."""
        directory = self.latest()
        return None if directory is None else _round_of(directory.name)

    def candidates(self) -> list[Path]:
        """The checkpoints a resume may use, best first: the one `latest_checkpoint` names, then the older kept ones.

        When `latest_checkpoint` is missing, empty or names no directory: every complete checkpoint, newest first,
        with a warning naming the pointer (a resume then uses the newest that passes its check).
        """
        problem = self._pointer_problem()
        if problem is not None:
            scanned = self._complete_dirs()
            if scanned:
                logger.warning("%s: using the newest complete checkpoint in %s that passes its check (of %s).",
                               problem, self.root, ", ".join(p.name for p in scanned))
            return scanned
        name = self._latest_name()
        older = sorted((p for p in self._round_dirs() if _round_of(p.name) < _round_of(name)),
                       key=lambda p: _round_of(p.name), reverse=True)
        return [self.root / name, *older]

    # -- reading ----------------------------------------------------------------------------------------------------

    def read(self, directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], dict, dict]:
        """Read and check one checkpoint: `(state, global_state, aggregator_state, rng_plain, rng_tensors)`.

        Raises:
            [`CheckpointError`]: naming every file that is missing, unreadable, fails its checksum or holds
                non-finite values.
        """
        directory = Path(directory)
        if directory.is_symlink() or not directory.is_dir():
            raise CheckpointError(f"{directory}: not a checkpoint directory ({'a link' if directory.is_symlink() else 'missing'}).")
        state_path = directory / STATE_FILE
        try:
            state = json.loads(state_path.read_bytes())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{state_path}: cannot be read as JSON ({type(err).__name__}: {err}).") from err
        if not isinstance(state, dict):
            raise CheckpointError(f"{state_path}: expected a JSON object, got {type(state).__name__}.")
        problems = client_problems(state, state_path)
        if state.get("round") != _round_of(directory.name):
            problems.append(f"{state_path}: records round {state.get('round')!r}, not that of {directory.name}")
        digests = state.get("files")
        if digests is None:
            logger.warning("%s predates checkpoint checksums (format 1): its files are not verified.", directory)
        elif not isinstance(digests, dict) or state.get("state_sha256") != _state_digest(state):
            problems.append(f"{state_path}: its content does not match its recorded checksum (state_sha256)")
            digests = {}
        contents: dict[str, bytes] = {}
        for name in sorted({*REQUIRED_FILES, *(digests or {})}):
            path = directory / name
            if Path(name).name != name or name == STATE_FILE:
                problems.append(f"{state_path}: lists {name!r}, not a file of the checkpoint")
                continue
            try:
                contents[name] = path.read_bytes()
            except OSError as err:
                problems.append(f"{path}: missing or unreadable ({type(err).__name__})")
                continue
            if digests and name in digests and digests[name] != sha256_bytes(contents[name]):
                problems.append(f"{path}: checksum mismatch (truncated or altered; {len(contents[name])} bytes)")
        if problems:
            raise CheckpointError("; ".join(problems))
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name in (GLOBAL_STATE_FILE, AGGREGATOR_STATE_FILE, RNG_TENSORS_FILE):
            try:
                tensors[name] = load_safetensors(contents[name])
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"{directory / name}: not a readable safetensors file ({type(err).__name__}: {err}).") from err
        for name in (GLOBAL_STATE_FILE, AGGREGATOR_STATE_FILE):
            order = (state.get("key_order") or {}).get(name)
            if isinstance(order, list) and sorted(order) == sorted(tensors[name]):
                tensors[name] = {key: tensors[name][key] for key in order}
            bad = non_finite_keys(tensors[name])
            if bad:
                raise CheckpointError(
                    f"{directory / name}: non-finite values (NaN/Inf) in {len(bad)} tensor(s), e.g. {bad[0]!r}."
                )
        try:
            plain = json.loads(contents[RNG_JSON_FILE])
            plain["python"], plain["numpy"], tensors[RNG_TENSORS_FILE]["torch"]  # noqa: B018 (presence check)
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{directory / RNG_JSON_FILE}: not an RNG state ({type(err).__name__}: {err}).") from err
        return state, tensors[GLOBAL_STATE_FILE], tensors[AGGREGATOR_STATE_FILE], plain, tensors[RNG_TENSORS_FILE]

    def load(self, repair: bool = False) -> Optional[tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """`(state, global_state, aggregator_state)` of the newest checkpoint that passes its check (RNG states
        restored), or `None` when the run has none.

        When the latest checkpoint fails its check, the previous complete one is used with a warning naming the
        files at fault ([`skipped`] lists them). When `latest_checkpoint` is missing, empty or names no directory,
        the newest complete checkpoint that passes its check is used, with a warning naming the pointer.

        Args:
            repair (`bool`, *optional*, defaults to `False`): after falling back (or without a usable pointer), point
                `latest_checkpoint` at the checkpoint used (only the process that owns the run directory should).

        Raises:
            [`CheckpointError`]: `latest_checkpoint` is invalid, or no checkpoint passes its check (every file at
                fault is named).
        """
        pointer_problem = self._pointer_problem()
        found = self._first_passing()
        if found is None:
            return None
        directory, (state, global_state, aggregator_state, plain, rng_tensors) = found
        if self.skipped:
            logger.warning("Resuming from %s: the newer checkpoint(s) failed their check: %s", directory.name,
                           " | ".join(reason for _, reason in self.skipped))
        if repair and (self.skipped or pointer_problem is not None):
            tmp = self.run_dir / f"{LATEST_FILE}.tmp"
            _write_synced(tmp, directory.name.encode())
            os.replace(tmp, self.run_dir / LATEST_FILE)
        set_rng_state(plain, rng_tensors)
        return state, global_state, aggregator_state

    def _first_passing(self) -> Optional[tuple[Path, tuple]]:
        # The first of `candidates()` passing its check, with what `read` returned; the others tried go to `skipped`.
        self.skipped = []
        for directory in self.candidates():
            try:
                return directory, self.read(directory)
            except CheckpointError as err:
                self.skipped.append((directory, str(err)))
        if self.skipped:
            raise CheckpointError(f"No usable checkpoint in {self.root}: "
                                  + " | ".join(f"{d.name}: {reason}" for d, reason in self.skipped))
        return None


def _serialize(tensors: Mapping[str, torch.Tensor]) -> bytes:
    return save_safetensors(dict(tensors))
