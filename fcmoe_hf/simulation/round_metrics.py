"""Per-round measurements of a federation beyond the merge's own summary: how clients' expert updates align with the
consensus, how the clients used the experts, and what crossed the network.

Pure functions over tensors, mappings and files; [`~fcmoe_hf.simulation.FederatedSimulation`] adds their results to
each round's entry of `metrics.jsonl`. Every value is JSON-serialisable (`int`, `float`, `None` where a statistic is
undefined: never `NaN`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch

from ..federated.aggregators.result import AggregationResult
from ..federated.functional.consensus import ConsensusDiagnostics
from ..federated.update import UPDATE_COUNTS_FILE, UPDATE_META_FILE, UPDATE_TENSORS_FILE, ClientUpdate
from ..federated.validation import global_expert_sizes

#: The quantiles reported by [`cosine_quantiles`], by name.
COSINE_QUANTILES = {"p10": 0.10, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p90": 0.90}

#: The files of one client update on disk (what a client uploads).
UPDATE_FILES = (UPDATE_TENSORS_FILE, UPDATE_COUNTS_FILE, UPDATE_META_FILE)


def cosine_quantiles(diagnostics: Mapping[str, ConsensusDiagnostics]) -> Optional[dict[str, Any]]:
    """The distribution of `cos(Delta[i,k], g[k])` over every contributing (client, expert) pair of every group.

    The cosines are those of the consensus projection's diagnostics (FC-MoE, arXiv:2606.15625, Eq. 4): pairs where the
    client did not contribute, or where a norm is 0, are `NaN` there and left out. Quantiles interpolate linearly
    between order statistics (numpy's default).

    Args:
        diagnostics (`Mapping[str, ConsensusDiagnostics]`): per expert group, the merge's diagnostics
            ([`~fcmoe_hf.federated.AggregationResult.diagnostics`]).

    Returns:
        `None` when there are no diagnostics (the merge ran no projection); else
        `{"min", "p10", "p25", "p50", "p75", "p90", "max", "n"}` with `n` the number of pairs (the other values are
        `None` when `n` is 0).
    """
    if not diagnostics:
        return None
    cosines = torch.cat([d.cosine.detach().reshape(-1).double().cpu() for d in diagnostics.values()])
    cosines = cosines[torch.isfinite(cosines)]
    n = int(cosines.numel())
    names = ["min", *COSINE_QUANTILES, "max"]
    if n == 0:
        return {**dict.fromkeys(names), "n": 0}
    levels = torch.tensor([0.0, *COSINE_QUANTILES.values(), 1.0], dtype=torch.float64)
    values = torch.quantile(cosines, levels).tolist()
    return {**dict(zip(names, values)), "n": n}


def expert_usage(activation_counts: Sequence[Mapping[str, torch.Tensor]], expert_sizes: Mapping[str, int]) -> dict[str, Any]:
    """How the clients' routers used the experts this round, from their activation counts.

    An expert counts as used by a client when the client's router sent it at least one token (`f[i,k] > 0`); a client
    without counts for a group used none of its experts.

    Args:
        activation_counts (`Sequence[Mapping[str, torch.Tensor]]`): per client, `{group: (E,) counts}`
            ([`~fcmoe_hf.federated.ClientUpdate.activation_counts`]).
        expert_sizes (`Mapping[str, int]`): `{group: E}` of every expert group of the global state.

    Returns:
        `dict` with `experts_total` (number of (group, expert) pairs), `experts_unused` (pairs no client routed a
        token to), `experts_used_by_all` (pairs every client routed a token to) and `clients_per_expert_mean` (the
        mean over pairs of the number of clients that routed a token there; `None` when there are no experts).
    """
    num_clients = len(activation_counts)
    users = []
    for group, num_experts in expert_sizes.items():
        used = torch.zeros(num_experts, dtype=torch.long)
        for counts in activation_counts:
            values = counts.get(group)
            if values is not None:
                used += (values.detach().reshape(-1).cpu() > 0).long()
        users.append(used)
    per_expert = torch.cat(users) if users else torch.zeros(0, dtype=torch.long)
    total = int(per_expert.numel())
    return {
        "experts_total": total,
        "experts_unused": int((per_expert == 0).sum()),
        "experts_used_by_all": int((per_expert == num_clients).sum()) if num_clients else 0,
        "clients_per_expert_mean": float(per_expert.double().mean()) if total else None,
    }


def update_nbytes(directory: str | os.PathLike) -> int:
    """Bytes one client uploads: the size on disk of its update's files (deltas, activation counts, metadata)."""
    return sum(os.path.getsize(path) for path in (os.path.join(directory, name) for name in UPDATE_FILES) if os.path.exists(path))


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state's tensors, `sum numel * element_size` (what the server sends each client of a round)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def communication(update_dirs: Iterable[str | os.PathLike], global_state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`bytes_uploaded_per_client_mean` (mean [`update_nbytes`] over `update_dirs`; `None` without updates) and
    `bytes_downloaded_per_client` ([`state_nbytes`] of the global state the clients start from)."""
    uploaded = [update_nbytes(d) for d in update_dirs]
    return {
        "bytes_uploaded_per_client_mean": sum(uploaded) / len(uploaded) if uploaded else None,
        "bytes_downloaded_per_client": state_nbytes(global_state),
    }


def merge_round_metrics(
    result: AggregationResult,
    updates: Sequence[ClientUpdate],
    update_dirs: Iterable[str | os.PathLike],
    global_state: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """Everything above for one round: `cosine_quantiles` (only when the merge has diagnostics), the expert usage of
    the merged clients ([`expert_usage`]; rejected updates left out) and the communication ([`communication`], every
    uploaded update counted).

    Args:
        result ([`~fcmoe_hf.federated.AggregationResult`]): the round's merge.
        updates (`Sequence[ClientUpdate]`): the updates the server received (merged or rejected).
        update_dirs (`Iterable[str | os.PathLike]`): where those updates lie on disk.
        global_state (`Mapping[str, torch.Tensor]`): the global state the clients started the round from.
    """
    out: dict[str, Any] = {}
    quantiles = cosine_quantiles(result.diagnostics)
    if quantiles is not None:
        out["cosine_quantiles"] = quantiles
    merged = set(result.client_ids)
    counts = [u.activation_counts for u in updates if u.client_id in merged]
    out.update(expert_usage(counts, global_expert_sizes(global_state)))
    out.update(communication(update_dirs, global_state))
    return out


def first_rows(dataset: Any, limit: Optional[int]) -> Any:
    """The first `limit` rows of a `datasets.Dataset` (all of them when `limit` is None or not smaller)."""
    return dataset if limit is None or dataset.num_rows <= limit else dataset.select(range(limit))


def local_summary(per_metric: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """`local_<metric>_mean` / `_min` / `_max` over the clients' local scores of each metric."""
    out: dict[str, float] = {}
    for key, values in per_metric.items():
        values = [float(v) for v in values]
        out[f"local_{key}_mean"] = sum(values) / len(values)
        out[f"local_{key}_min"] = min(values)
        out[f"local_{key}_max"] = max(values)
    return out


def merge_outcome(result: Any) -> dict[str, list[dict[str, str]]]:
    """The clients a merge ([`~fcmoe_hf.federated.AggregationResult`]) left out and those whose counts it capped,
    with the reasons, as `metrics.jsonl` records them."""
    return {
        "rejected": [{"client_id": r.client_id, "reason": r.reason} for r in result.rejected],
        "capped": [{"client_id": c.client_id, "reason": c.reason} for c in result.capped],
    }
