"""What a client sends to the server after a round: per-tensor deltas, expert activation counts, sample count.

On disk an update is three files: the deltas as safetensors, the activation statistics as safetensors, and the rest
as JSON ([`ClientUpdate.save`] / [`ClientUpdate.load`]). Nothing is pickled. Keys and expert groups follow
[`~fcmoe_hf.federated.layout`].
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from .bounds import describe_value, parse_count
from .functional.importance import expert_norms
from .io.safetensors import LazySafetensors
from .layout import group_keys

UPDATE_TENSORS_FILE = "update.safetensors"
UPDATE_COUNTS_FILE = "activation_counts.safetensors"
UPDATE_META_FILE = "update.json"


@dataclass
class ClientUpdate:
    """One client's contribution to a round. It contains no raw data.

    Args:
        client_id (`str`): who sent it.
        num_samples (`int`): number of training samples the client used (FedAvg weight of shared tensors).
        deltas (`Mapping[str, torch.Tensor]`): `theta_end - theta_start` for every trainable tensor, keyed as the
            global state is. May be lazy ([`LazySafetensors`]) so the server can stream.
        activation_counts (`dict[str, torch.Tensor]`): per expert group, `(E,)` number of tokens the client's router
            sent to each expert during local training (`f[i,k]`).
        mean_gate (`dict[str, torch.Tensor]`): per expert group, `(E,)` mean router probability of each expert on the
            client's data (used by usage-thresholded expert averaging); optional.
        round (`int`, *optional*): the round this update belongs to.
        metrics (`dict`): training metrics (loss, aux loss, runtime, ...).
    """

    client_id: str
    num_samples: int
    deltas: Mapping[str, torch.Tensor]
    activation_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    mean_gate: dict[str, torch.Tensor] = field(default_factory=dict)
    round: Optional[int] = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def expert_groups(self) -> dict[str, list[str]]:
        """`{group: [tensor keys]}` for the expert tensors among `deltas`."""
        return group_keys(self.deltas.keys())[0]

    @property
    def shared_keys(self) -> list[str]:
        """Keys of the non-expert tensors among `deltas`."""
        return group_keys(self.deltas.keys())[1]

    def expert_norms(self) -> dict[str, torch.Tensor]:
        """Per group, `(E,)` norms `||Delta[i,k]||` of the concatenated expert updates."""
        return {group: expert_norms(self.deltas, keys) for group, keys in self.expert_groups.items()}

    def importance(self) -> dict[str, torch.Tensor]:
        """Per group, `(E,)` FC-MoE importance `c[i,k] = f[i,k] * ||Delta[i,k]||` (Eq. 2 of the FC-MoE paper, arXiv:2606.15625).

        A group without activation counts gets importance 0 for every expert (it was never routed to).
        """
        out = {}
        for group, norms in self.expert_norms().items():
            counts = self.activation_counts.get(group)
            out[group] = norms * counts.double() if counts is not None else torch.zeros_like(norms)
        return out

    def save(self, directory: str | os.PathLike) -> str:
        """Write the update as safetensors (deltas; counts) + JSON (everything else) into `directory`."""
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.deltas.items()}, os.path.join(directory, UPDATE_TENSORS_FILE))
        counts = {f"activation_counts/{g}": c.detach().cpu() for g, c in self.activation_counts.items()}
        counts.update({f"mean_gate/{g}": m.detach().cpu() for g, m in self.mean_gate.items()})
        save_file(counts, os.path.join(directory, UPDATE_COUNTS_FILE))
        meta = {"client_id": self.client_id, "num_samples": self.num_samples, "round": self.round, "metrics": _jsonable(self.metrics)}
        with open(os.path.join(directory, UPDATE_META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        return os.fspath(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, lazy: bool = True) -> ClientUpdate:
        """Read an update written by [`save`]. With `lazy=True` the deltas are memory-mapped on access."""
        meta_path = os.path.join(directory, UPDATE_META_FILE)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:  # ValueError: bad JSON, or an integer beyond Python's digit limit
            raise ValueError(f"Cannot read client update metadata {meta_path}: {err}") from err
        meta = parse_update_metadata(meta, meta_path)
        tensors_path = os.path.join(directory, UPDATE_TENSORS_FILE)
        deltas = LazySafetensors(tensors_path)
        if not lazy:
            deltas = dict(deltas.items())
        counts, gates = {}, {}
        counts_path = os.path.join(directory, UPDATE_COUNTS_FILE)
        if os.path.exists(counts_path):
            for key, value in LazySafetensors(counts_path).items():
                kind, _, group = key.partition("/")
                if kind not in ("activation_counts", "mean_gate") or not group:
                    raise ValueError(
                        f"{counts_path}: unexpected tensor {key!r} (expected 'activation_counts/<group>' or 'mean_gate/<group>')."
                    )
                (counts if kind == "activation_counts" else gates)[group] = value
        return cls(
            client_id=meta["client_id"],
            num_samples=meta["num_samples"],
            deltas=deltas,
            activation_counts=counts,
            mean_gate=gates,
            round=meta.get("round"),
            metrics=meta.get("metrics", {}),
        )


def parse_update_metadata(meta: Any, source: str) -> dict[str, Any]:
    """Strictly checked update metadata (`update.json`): raises `ValueError` naming `source` and the field.

    `client_id` a non-empty string; `num_samples` an exact integer in `[1, 2**53]` (`true`, `3.7`, `12.0`, `"12"` and
    `10**400` are all refused); `round` an integer or null; `metrics` an object.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: the metadata must be a JSON object, got {type(meta).__name__}.")
    for name in ("client_id", "num_samples"):
        if name not in meta:
            raise ValueError(f"Client update metadata {source} lacks the field {name!r}.")
    if not isinstance(meta["client_id"], str) or not meta["client_id"]:
        raise ValueError(f"{source}: field 'client_id' must be a non-empty string, got {describe_value(meta['client_id'])}.")
    parse_count(meta["num_samples"], "num_samples", source, minimum=1)
    if meta.get("round") is not None:
        parse_count(meta["round"], "round", source)
    if not isinstance(meta.get("metrics", {}), dict):
        raise ValueError(f"{source}: field 'metrics' must be a JSON object, got {describe_value(meta['metrics'])}.")
    return meta


def _jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value
    return out
