"""The Python, NumPy and torch RNG states as JSON and tensors (a checkpoint stores them with no pickle)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


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
