"""What crosses the wire between the Flower `ServerApp` and the `ClientApp`s, as Flower records.

A global state travels as an `ArrayRecord` of float32 arrays. A client's reply to a training message carries its
[`~fcmoe_hf.federated.ClientUpdate`] (deltas and activation counts: never data):

- `"deltas"`: `ArrayRecord`, `theta_end - theta_start` per trainable tensor, in the transport dtype (`bfloat16`
  travels as its raw 16-bit pattern, marked in `"update"`, and is widened to float32 on arrival);
- `"statistics"`: `ArrayRecord`, `activation_counts/<group>` and `mean_gate/<group>`;
- `"metrics"`: `MetricRecord`, `num-examples` and the client's numeric training metrics;
- `"update"`: `ConfigRecord`, `client-id`, `round`, `transport-dtype`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..federated import ClientUpdate
from ..federated.bounds import parse_count

DELTAS, STATISTICS, METRICS, UPDATE = "deltas", "statistics", "metrics", "update"
NUM_EXAMPLES = "num-examples"


def state_to_arrays(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """`state` as an `ArrayRecord` of `dtype` (`"float32"`, or `"bfloat16"` as raw 16-bit patterns)."""
    if dtype == "bfloat16":
        return ArrayRecord({k: Array(v.detach().cpu().to(torch.bfloat16).contiguous().view(torch.int16).numpy()) for k, v in state.items()})
    if dtype != "float32":
        raise ValueError(f"transport dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
    return ArrayRecord({k: Array(v.detach().cpu().to(torch.float32).contiguous().numpy()) for k, v in state.items()})


def arrays_to_state(record: ArrayRecord, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The float32 tensors of an `ArrayRecord` written by [`state_to_arrays`] with `dtype`."""
    out = {}
    for key, array in record.items():
        value = torch.from_numpy(np.array(array.numpy(), copy=True))
        out[key] = value.view(torch.bfloat16).float() if dtype == "bfloat16" else value.float()
    return out


def record_nbytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (what dominates it on the wire)."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


def update_to_content(update: ClientUpdate, dtype: str = "float32") -> RecordDict:
    """A client's reply to a training message (see the module docstring)."""
    statistics = {f"activation_counts/{g}": c.long() for g, c in update.activation_counts.items()}
    statistics.update({f"mean_gate/{g}": m.float() for g, m in update.mean_gate.items()})
    metrics = MetricRecord({NUM_EXAMPLES: int(update.num_samples)})
    for key, value in update.metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            metrics[key] = value
    return RecordDict({
        DELTAS: state_to_arrays(update.deltas, dtype),
        STATISTICS: ArrayRecord({k: Array(v.numpy()) for k, v in statistics.items()}),
        METRICS: metrics,
        UPDATE: ConfigRecord({"client-id": update.client_id, "round": int(update.round or 0), "transport-dtype": dtype}),
    })


def content_to_update(content: RecordDict) -> ClientUpdate:
    """The [`~fcmoe_hf.federated.ClientUpdate`] of a reply written by [`update_to_content`].

    Raises:
        `ValueError`: naming the record that is missing.
    """
    for name in (DELTAS, STATISTICS, METRICS, UPDATE):
        if name not in content:
            raise ValueError(f"Client reply lacks the {name!r} record: is the ClientApp fcmoe_hf's (fcmoe_hf.flower.client)?")
    meta = content.config_records[UPDATE]
    counts, gates = {}, {}
    for key, array in content.array_records[STATISTICS].items():
        kind, _, group = key.partition("/")
        (counts if kind == "activation_counts" else gates)[group] = torch.from_numpy(np.array(array.numpy(), copy=True))
    metrics = content.metric_records[METRICS]
    client_id = meta["client-id"]
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"reply's {UPDATE!r} record: client-id must be a non-empty string, got {client_id!r}")
    # Exact integers, as on disk: a float (3.7, inf), bool or string count is a malformed reply, never truncated.
    num_samples = parse_count(metrics[NUM_EXAMPLES], NUM_EXAMPLES, f"reply of {client_id!r} ({METRICS!r} record)", minimum=1)
    round_index = parse_count(meta["round"], "round", f"reply of {client_id!r} ({UPDATE!r} record)")
    return ClientUpdate(
        client_id=client_id,
        num_samples=num_samples,
        deltas=arrays_to_state(content.array_records[DELTAS], str(meta.get("transport-dtype", "float32"))),
        activation_counts=counts,
        mean_gate=gates,
        round=round_index or None,
        metrics={k: v for k, v in metrics.items() if k != NUM_EXAMPLES},
    )


def tensors_to_arrays(tensors: Optional[Mapping[str, torch.Tensor]]) -> ArrayRecord:
    """Any tensors (kept dtype) as an `ArrayRecord`, e.g. a client's memory in `context.state`."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in (tensors or {}).items()})


def arrays_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of [`tensors_to_arrays`]."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}
