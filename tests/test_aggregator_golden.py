"""Golden merges: every aggregator's merged global state (and FC-MoE's personalized states), hashed.

The hashes in `golden/aggregators.json` were recorded with the code before the aggregators were split into one module
each; a refactoring that changes one bit of any merge fails here. Regenerate them only for an intended change of
arithmetic, and say which in the commit (`FCMOE_REGENERATE_GOLDEN=1 pytest tests/test_aggregator_golden.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from fcmoe_hf.federated import ClientUpdate, UpdateBounds, build_aggregator
from fcmoe_hf.federated.functional.importance import capped_norms, stack_statistics

GOLDEN = Path(__file__).parent / "golden" / "aggregators.json"
PREFIX = "base_model.model.model.layers"
NUM_EXPERTS, RANK, DIM = 4, 2, 6


def _global_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(2):
        for module in ("self_attn.q_proj", "mlp.down_proj"):
            group = f"{PREFIX}.{layer}.{module}"
            out[f"{group}.moe_lora_A"] = torch.randn(NUM_EXPERTS, RANK, DIM, generator=g) * 0.1
            out[f"{group}.moe_lora_B"] = torch.randn(NUM_EXPERTS, DIM, RANK, generator=g) * 0.1
            out[f"{group}.moe_lora_router.weight"] = torch.randn(NUM_EXPERTS, DIM, generator=g) * 0.1
    out["base_model.model.score.weight"] = torch.randn(3, DIM, generator=g)
    return out


def _updates(global_state, round_index: int, dtype=torch.float32) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(100 + round_index)
    updates = []
    groups = sorted({k.rsplit(".", 1)[0] for k in global_state if k.endswith("moe_lora_A")})
    for i in range(5):
        deltas = {}
        for key, value in global_state.items():
            delta = torch.randn(value.shape, generator=g) * 0.01 * (i + 1)
            if i == 3:  # a client opposing the others on every expert: the projection must fire
                delta = -3 * delta
            deltas[key] = delta.to(dtype)
        counts = {}
        for group in groups:
            c = torch.randint(0, 20, (NUM_EXPERTS,), generator=g)
            c[i % NUM_EXPERTS] = 0  # some experts never activated by some clients
            counts[group] = c
        gates = {group: torch.softmax(torch.randn(NUM_EXPERTS, generator=g), 0) for group in groups}
        updates.append(ClientUpdate(f"client_{i}", 10 + 7 * i, deltas, activation_counts=counts, mean_gate=gates))
    return updates


def _digest(state) -> str:
    h = hashlib.sha256()
    for key in sorted(state.keys()):
        t = state[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


CASES = {
    "fedavg": ("fedavg", {}),
    "fedprox": ("fedprox", {}),
    "pfl_moe": ("pfl_moe", {}),
    "fedavgm": ("fedavgm", {}),
    "fedadam": ("fedadam", {"server_learning_rate": 0.01, "tau": 1e-3}),
    "fedyogi": ("fedyogi", {}),
    "fedadagrad": ("fedadagrad", {"server_learning_rate": 0.01, "tau": 1e-3}),
    "ties": ("ties", {}),
    "fedmoe": ("fedmoe", {}),
    "fcmoe": ("fcmoe", {}),
    "fcmoe_no_projection": ("fcmoe", {"use_projection": False}),
    "fcmoe_no_retention": ("fcmoe", {"use_retention": False}),
    "fcmoe_no_importance": ("fcmoe", {"use_importance": False}),
    "fcmoe_two_read": ("fcmoe", {"merge_buffer_mb": 0}),
    "fcmoe_pairwise": ("fcmoe", {"projection_mode": "pairwise"}),
    "fcmoe_filtered": ("fcmoe", {"retention_mode": "filtered"}),
    "fcmoe_clipped": ("fcmoe", {"clip_update_norm": 0.05}),
    "fedavg_clipped": ("fedavg", {"clip_update_norm": 0.05}),
    "fedmedian": ("fedmedian", {}),
    "fedtrimmedavg": ("fedtrimmedavg", {}),
    "fcmoe_robust_median": ("fcmoe", {"robust": "median"}),
    "fcmoe_robust_trimmed_mean": ("fcmoe", {"robust": "trimmed_mean"}),
}


def _run(name: str, overrides: dict, tmp_path: Path, lazy: bool) -> dict[str, str]:
    aggregator = build_aggregator(name, **overrides)
    global_state = _global_state()
    out = {}
    for round_index in range(2):  # two rounds: server optimizers' state matters in the second
        updates = _updates(global_state, round_index, dtype=torch.bfloat16 if lazy else torch.float32)
        if lazy:
            loaded = []
            for u in updates:
                directory = tmp_path / f"r{round_index}" / u.client_id
                u.save(directory)
                loaded.append(ClientUpdate.load(directory))
            updates = loaded
        result = aggregator.aggregate(global_state, updates)
        out[f"round{round_index}/global"] = _digest(result.global_state)
        if name == "fcmoe":
            for cid in ("client_0", "client_3"):
                out[f"round{round_index}/{cid}"] = _digest(result.personalized_state(cid))
        global_state = {k: v.clone() for k, v in result.global_state.items()}
    return out


def _all(tmp_path: Path) -> dict[str, dict[str, str]]:
    results = {}
    for case, (name, overrides) in CASES.items():
        for lazy in (False, True):
            results[f"{case}/{'lazy_bf16' if lazy else 'memory'}"] = _run(name, overrides, tmp_path / case / str(lazy), lazy)
    return results


def test_every_merge_is_bit_identical_to_the_recorded_one(tmp_path):
    results = _all(tmp_path)
    if os.environ.get("FCMOE_REGENERATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden hashes regenerated")
    expected = json.loads(GOLDEN.read_text())
    assert sorted(results) == sorted(expected)
    changed = {case: keys for case, keys in ((c, [k for k in results[c] if results[c][k] != expected[c].get(k)]) for c in results) if keys}
    assert not changed, f"merges changed: {changed}"


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_default_defences_keep_every_honest_golden_update(action):
    """The fixtures' clients differ 12x in norm (client 3 opposes the others at 3x): the default relative bound, the
    round's bounds and FC-MoE's importance cap must leave every one of them untouched (the hashes above prove the
    merges unchanged; this proves why)."""
    for case, (name, overrides) in CASES.items():
        if "clip_update_norm" in overrides:
            continue
        aggregator = build_aggregator(name, **overrides, norm_bound_action=action)
        global_state = _global_state()
        for round_index in range(2):
            updates = _updates(global_state, round_index)
            bounds = UpdateBounds.for_round({u.client_id: u.num_samples for u in updates}, max_length=8, top_k=1)
            result = aggregator.aggregate(global_state, updates, bounds)
            assert result.rejected == [] and set(result.update_scales.values()) == {1.0}, case
            for group in updates[0].expert_groups:
                counts = stack_statistics(updates, group, NUM_EXPERTS)
                norms = torch.stack([u.expert_norms()[group] for u in updates])
                assert torch.equal(capped_norms(norms, counts, aggregator.config.norm_bound_factor), norms), (case, group)
            global_state = {k: v.clone() for k, v in result.global_state.items()}
