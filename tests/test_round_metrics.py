"""Per-round metrics: cosine quantiles, expert usage, bytes, on small hand-made tensors; and in `metrics.jsonl`."""

import json
import math
import os

import pytest
import torch

from fcmoe_hf.federated import ClientUpdate, FCMoEAggregator, build_aggregator
from fcmoe_hf.federated.functional.consensus import ConsensusDiagnostics
from fcmoe_hf.simulation.round_metrics import (
    communication,
    cosine_quantiles,
    expert_usage,
    merge_round_metrics,
    state_nbytes,
    update_nbytes,
)
from fcmoe_hf.trainer import get_federated_state

from .test_simulation import make_simulation

GROUP = "model.layers.0.mlp.experts"
X, Y, GATE = f"{GROUP}.gate_up_proj", f"{GROUP}.down_proj", "model.layers.0.mlp.gate.weight"
NAN = math.nan


def diagnostics(cosine):
    cosine = torch.tensor(cosine, dtype=torch.float64)
    zeros = torch.zeros(cosine.shape[1], dtype=torch.float64)
    return ConsensusDiagnostics(
        weights=torch.zeros_like(cosine), cosine=cosine, conflict=cosine < 0, conflict_share=zeros,
        mean_cosine=zeros, removed_norm=zeros, consensus_norm=zeros,
    )


def test_cosine_quantiles_over_contributing_pairs_of_all_groups():
    # Finite cosines (NaN: not contributing) over both groups, sorted: (-0.5, 0, 0.5, 1); n = 4.
    # Linear interpolation at position p * (n - 1) = 3p: p10 -> 0.3: -0.5 + 0.3 * 0.5 = -0.35; p25 -> 0.75: -0.125;
    # p50 -> 1.5: 0.25; p75 -> 2.25: 0.5 + 0.25 * 0.5 = 0.625; p90 -> 2.7: 0.85.
    diags = {"a": diagnostics([[0.5, NAN], [-0.5, 1.0]]), "b": diagnostics([[0.0], [NAN]])}
    out = cosine_quantiles(diags)
    assert out["n"] == 4
    expected = {"min": -0.5, "p10": -0.35, "p25": -0.125, "p50": 0.25, "p75": 0.625, "p90": 0.85, "max": 1.0}
    assert list(out) == [*expected, "n"]
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key
    # No diagnostics (no projection): no key. Diagnostics without a contributing pair: n = 0, quantiles None.
    assert cosine_quantiles({}) is None
    empty = cosine_quantiles({"a": diagnostics([[NAN, NAN]])})
    assert empty["n"] == 0 and empty["p50"] is None and empty["min"] is None
    json.dumps(out, allow_nan=False)


def test_expert_usage():
    # Group g1 (E = 3): client 0 routes to experts 0, 1; client 1 to expert 0; client 2 reported no counts for g1.
    # Group g2 (E = 2): client 0 to expert 1; client 1 nothing (zeros); client 2 to expert 1.
    counts = [
        {"g1": torch.tensor([2, 5, 0]), "g2": torch.tensor([0.0, 1.0])},
        {"g1": torch.tensor([1, 0, 0]), "g2": torch.tensor([0.0, 0.0])},
        {"g2": torch.tensor([0.0, 3.0])},
    ]
    out = expert_usage(counts, {"g1": 3, "g2": 2})
    # Clients per expert: g1 (2, 1, 0), g2 (0, 2): 5 pairs, 2 unused, none used by all 3, mean 5 / 5 = 1.
    assert out == {"experts_total": 5, "experts_unused": 2, "experts_used_by_all": 0, "clients_per_expert_mean": 1.0}
    # Clients 0 and 1 only: g1 expert 0 is used by both.
    assert expert_usage(counts[:2], {"g1": 3, "g2": 2})["experts_used_by_all"] == 1
    assert expert_usage(counts, {}) == {
        "experts_total": 0, "experts_unused": 0, "experts_used_by_all": 0, "clients_per_expert_mean": None
    }


def test_bytes(tmp_path):
    state = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
    assert state_nbytes(state) == 2 * 3 * 4 + 4 * 2
    sizes = []
    for i in range(2):
        directory = tmp_path / f"c{i}"
        ClientUpdate(f"c{i}", 1, {k: torch.ones_like(v) for k, v in state.items()},
                     activation_counts={"g": torch.arange(3 * (i + 1))}).save(directory)
        files = sorted(os.listdir(directory))
        assert files == ["activation_counts.safetensors", "update.json", "update.safetensors"]
        sizes.append(sum(os.path.getsize(directory / f) for f in files))
        assert update_nbytes(directory) == sizes[-1]
    assert sizes[0] != sizes[1]
    out = communication([tmp_path / "c0", tmp_path / "c1"], state)
    assert out == {"bytes_uploaded_per_client_mean": (sizes[0] + sizes[1]) / 2, "bytes_downloaded_per_client": 32}


def hand_round():
    # The FC-MoE hand round of tests/test_federated_aggregators.py: expert 0 has two contributing clients with
    # cos(Delta, g) = 90 / (15 sqrt 45) = 6 / sqrt 45 and -45 / (15 sqrt 45) = -3 / sqrt 45; expert 1 none.
    def state(e0, e1=(0.0, 0.0), gate=(0.0, 0.0)):
        return {X: torch.tensor([[e0[0]], [e1[0]]]), Y: torch.tensor([[e0[1]], [e1[1]]]), GATE: torch.tensor(list(gate))}

    old = state((-5.0, -1.0), (1.0, 2.0))
    updates = [
        ClientUpdate("c1", 30, state((15.0, 0.0), (7.0, 7.0)), activation_counts={GROUP: torch.tensor([2.0, 0.0])}),
        ClientUpdate("c2", 10, state((-12.0, 9.0), (3.0, 3.0)), activation_counts={GROUP: torch.tensor([1.0, 0.0])}),
        ClientUpdate("c3", 20, state((100.0, 100.0)), activation_counts={GROUP: torch.tensor([0.0, 0.0])}),
    ]
    return old, updates


def test_merge_round_metrics(tmp_path):
    old, updates = hand_round()
    dirs = []
    for u in updates:
        dirs.append(tmp_path / u.client_id)
        u.save(dirs[-1])
    loaded = [ClientUpdate.load(d) for d in dirs]
    out = merge_round_metrics(FCMoEAggregator().aggregate(old, loaded), loaded, dirs, old)
    q = out["cosine_quantiles"]
    assert q["n"] == 2
    assert q["min"] == pytest.approx(-3 / math.sqrt(45)) and q["max"] == pytest.approx(6 / math.sqrt(45))
    assert q["p50"] == pytest.approx(1.5 / math.sqrt(45))
    # Usage: expert 0 used by c1 and c2, not c3; expert 1 by nobody.
    assert (out["experts_total"], out["experts_unused"], out["experts_used_by_all"]) == (2, 1, 0)
    assert out["clients_per_expert_mean"] == 1.0
    assert out["bytes_downloaded_per_client"] == 6 * 4
    assert out["bytes_uploaded_per_client_mean"] == pytest.approx(sum(update_nbytes(d) for d in dirs) / 3)
    json.dumps(out, allow_nan=False)
    # FedAvg runs no projection: no cosine quantiles. A rejected update is not a merged client: without c3, expert 0
    # is used by every merged client; its upload still counts.
    updates[2].deltas[X][0, 0] = math.nan
    result = build_aggregator("fedavg").aggregate(old, updates)
    assert [r.client_id for r in result.rejected] == ["c3"]
    out = merge_round_metrics(result, updates, dirs, old)
    assert "cosine_quantiles" not in out
    assert (out["experts_unused"], out["experts_used_by_all"], out["clients_per_expert_mean"]) == (1, 1, 1.0)


def test_round_metrics_in_metrics_jsonl(tmp_path):
    simulation = make_simulation(tmp_path, num_rounds=1)
    history = simulation.run()
    (record,) = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    for key in (
        "cosine_quantiles", "experts_total", "experts_unused", "experts_used_by_all", "clients_per_expert_mean",
        "bytes_uploaded_per_client_mean", "bytes_downloaded_per_client", "round_wall_seconds", "conflict_share",
    ):
        assert key in record, key
    q = record["cosine_quantiles"]
    assert history[0]["cosine_quantiles"] == q and history[0]["experts_total"] == record["experts_total"]
    assert q["n"] > 0 and -1.0 <= q["min"] <= q["p50"] <= q["max"] <= 1.0
    # The tiny model: 2 layers x its MoE-LoRA modules, 4 experts each.
    assert record["experts_total"] > 0 and record["experts_total"] % 4 == 0
    assert 0 <= record["experts_unused"] <= record["experts_total"]
    assert 0.0 <= record["clients_per_expert_mean"] <= 3.0
    assert record["bytes_downloaded_per_client"] == state_nbytes(get_federated_state(simulation.model)) > 0
    assert record["bytes_uploaded_per_client_mean"] > record["bytes_downloaded_per_client"]
    assert record["round_wall_seconds"] > 0
