"""Atomic per-round checkpoints of a federation, and resuming from them. Nothing is pickled.

A checkpoint directory `checkpoints/round_NNNN/` holds the global state and the aggregator's state (safetensors), the
run's bookkeeping (`state.json`), the RNG states (`rng_state.json` for Python's and NumPy's generators,
`rng_state.safetensors` for torch's) and any small extra files the caller adds (the federation adds the adapter's
`adapter_config.json` and its model cards' fields, so a killed run's latest round can be published:
[`~fcmoe_hf.simulation.export.export_checkpoint`]). `latest_checkpoint` names the last complete one: it is replaced atomically after
the directory is written, so a run killed at any point resumes from a complete round. Its content is validated (a
`round_NNNN` name inside the run's `checkpoints/`) before anything is read.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST_FILE = "latest_checkpoint"
CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"^round_\d{4,}$")


def checkpoint_name(round_index: int) -> str:
    return f"round_{round_index:04d}"


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The Python, NumPy and torch (CPU) RNG states as `(JSON-ready dict, tensors)`."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    return plain, {"torch": torch.get_rng_state()}


def set_rng_state(plain: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Inverse of [`rng_state`]."""
    py = plain["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
    n = plain["numpy"]
    np.random.set_state((str(n["kind"]), np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(tensors["torch"])


class CheckpointStore:
    """The checkpoints of one run directory.

    Args:
        run_dir (`Path`): the run directory.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS_DIR

    def save(
        self,
        round_index: int,
        global_state: Mapping[str, torch.Tensor],
        aggregator_state: Mapping[str, torch.Tensor],
        state: Mapping[str, Any],
        files: Optional[Mapping[str, bytes]] = None,
    ) -> Path:
        """Write round `round_index`'s checkpoint, then point `latest_checkpoint` at it atomically; keep the newest.

        Args:
            round_index (`int`): the round just completed.
            global_state (`Mapping[str, torch.Tensor]`): the global state after it.
            aggregator_state (`Mapping[str, torch.Tensor]`): the aggregator's state (server momentum, ...).
            state (`Mapping[str, Any]`): the run's bookkeeping, JSON-ready (`round` is added).
            files (`Mapping[str, bytes]`, *optional*): extra files (plain names) written into the checkpoint directory
                before it is committed.
        """
        for name in files or {}:
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"Extra checkpoint file {name!r} is not a plain file name.")
        directory = self.root / checkpoint_name(round_index)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(directory / "global_state.safetensors"))
        save_file(dict(aggregator_state), str(directory / "aggregator_state.safetensors"))
        plain, tensors = rng_state()
        save_file(tensors, str(directory / "rng_state.safetensors"))
        (directory / "rng_state.json").write_text(json.dumps(plain))
        with open(directory / "state.json", "w") as f:
            json.dump({"round": round_index, **state}, f, indent=2, default=str)
        for name, content in (files or {}).items():
            (directory / name).write_bytes(content)
        tmp = self.run_dir / f"{LATEST_FILE}.tmp"
        tmp.write_text(directory.name)
        os.replace(tmp, self.run_dir / LATEST_FILE)  # the commit point: a kill before it keeps the previous round
        for old in self.root.glob("round_*"):
            if old.name != directory.name:
                shutil.rmtree(old, ignore_errors=True)
        return directory

    def exists(self) -> bool:
        return (self.run_dir / LATEST_FILE).exists()

    def latest(self) -> Optional[Path]:
        """The directory `latest_checkpoint` names, validated, or `None` when the run has none."""
        latest = self.run_dir / LATEST_FILE
        if not latest.exists():
            return None
        name = latest.read_text().strip()
        if not _NAME.match(name):
            raise ValueError(f"{latest} names {name!r}, not a checkpoint of this run (expected round_NNNN).")
        directory = self.root / name
        if not directory.is_dir():
            raise ValueError(f"{latest} names {name!r}, but {directory} does not exist.")
        return directory

    def latest_round(self) -> Optional[int]:
        """The round of the latest complete checkpoint, or `None` when the run has none."""
        directory = self.latest()
        return None if directory is None else int(directory.name.removeprefix("round_"))

    def load(self) -> Optional[tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """`(state, global_state, aggregator_state)` of the latest checkpoint (RNG states restored), or `None`."""
        directory = self.latest()
        if directory is None:
            return None
        files = {name: directory / name for name in ("state.json", "global_state.safetensors", "aggregator_state.safetensors", "rng_state.json", "rng_state.safetensors")}
        try:
            state = json.loads(files["state.json"].read_text())
            global_state = load_file(str(files["global_state.safetensors"]))
            aggregator_state = load_file(str(files["aggregator_state.safetensors"]))
            plain = json.loads(files["rng_state.json"].read_text())
            tensors = load_file(str(files["rng_state.safetensors"]))
        except (OSError, ValueError, json.JSONDecodeError) as err:  # safetensors raises its own errors too
            raise ValueError(f"Cannot read checkpoint {directory}: {err}") from err
        except Exception as err:
            raise ValueError(f"Cannot read checkpoint {directory}: {type(err).__name__}: {err}") from err
        set_rng_state(plain, tensors)
        return state, global_state, aggregator_state
