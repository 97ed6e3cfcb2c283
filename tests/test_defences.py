"""Malicious and malformed client updates: rejected with a reason naming the field, the round goes on, and the honest
result is what it would have been without the attacker (issue 18, the update half)."""

import json
import logging
import math

import pytest
import torch

from fcmoe_hf.federated import (
    ClientExpectation,
    ClientUpdate,
    RejectedUpdate,
    UpdateBounds,
    build_aggregator,
    load_update,
)
from fcmoe_hf.federated.aggregators import AGGREGATORS
from fcmoe_hf.federated.attacks import attack_clients, inflate_counts, scale_update, sign_flip_update, spoof_id
from fcmoe_hf.federated.bounds import cap_counts
from fcmoe_hf.federated.functional.importance import capped_norms

GROUP = "base_model.model.model.layers.0.self_attn.q_proj"
A, B, ROUTER = f"{GROUP}.moe_lora_A", f"{GROUP}.moe_lora_B", f"{GROUP}.moe_lora_router"
NUM_CLIENTS = 5


def make_round(k=NUM_CLIENTS, seed=0):
    """Honest clients that mostly agree (a shared direction plus noise), as clients of one task do."""
    gen = torch.Generator().manual_seed(seed)
    theta = {A: torch.randn(3, 2, 4, generator=gen), B: torch.randn(3, 5, 2, generator=gen), ROUTER: torch.randn(3, 4, generator=gen)}
    direction = {key: torch.randn(v.shape, generator=gen) for key, v in theta.items()}
    updates = [
        ClientUpdate(
            f"c{i}",
            10 + i,
            {key: 0.01 * (d + 0.5 * torch.randn(d.shape, generator=gen)) for key, d in direction.items()},
            activation_counts={GROUP: torch.tensor([3.0 + i, 2.0, 1.0])},
        )
        for i in range(k)
    ]
    return theta, updates


def bounds_for(updates, max_length=8):
    return UpdateBounds.for_round({u.client_id: u.num_samples for u in updates}, max_length=max_length, top_k=1)


def step(result, theta):
    return torch.cat([(result.global_state[k] - theta[k]).flatten() for k in theta])


def assert_same_merge(result, reference):
    for key in reference.global_state:
        torch.testing.assert_close(result.global_state[key], reference.global_state[key], rtol=0, atol=0)


# -- strict metadata -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("3.7", "num_samples must be an integer, got float 3.7"),
        ("12.0", "num_samples must be an integer, got float 12.0"),
        ('"12"', "num_samples must be an integer, got str '12'"),
        ("true", "num_samples must be an integer, got bool True"),
        ("1" + "0" * 400, "num_samples must be in [1, 9007199254740992], got an integer of 1329 bits"),
        ("0", "num_samples must be in [1, 9007199254740992], got 0"),
        ("-3", "got -3"),
    ],
)
def test_update_json_is_parsed_strictly_naming_file_and_field(tmp_path, raw, expected):
    theta, updates = make_round(k=2)
    directory = updates[0].save(tmp_path / "c0")
    path = tmp_path / "c0" / "update.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(meta).replace(f'"num_samples": {meta["num_samples"]}', f'"num_samples": {raw}'))
    with pytest.raises(ValueError) as err:
        ClientUpdate.load(directory)
    assert str(path) in str(err.value) and expected in str(err.value)
    # The transport turns it into a rejection and the round goes on.
    received = {"c0": load_update(directory, "c0"), "c1": updates[1]}
    assert isinstance(received["c0"], RejectedUpdate) and expected in received["c0"].reason
    result = build_aggregator("fedavg").aggregate(theta, received)
    assert result.client_ids == ["c1"] and [r.client_id for r in result.rejected] == ["c0"]
    assert_same_merge(result, build_aggregator("fedavg").aggregate(theta, [updates[1]]))


def test_other_metadata_fields_are_checked(tmp_path):
    _, updates = make_round(k=1)
    directory = updates[0].save(tmp_path / "c0")
    path = tmp_path / "c0" / "update.json"
    for field, value, expected in [
        ("client_id", 7, "field 'client_id' must be a non-empty string"),
        ("round", 1.5, "round must be an integer"),
        ("metrics", [1], "field 'metrics' must be a JSON object"),
    ]:
        meta = {"client_id": "c0", "num_samples": 10, "round": 1, "metrics": {}, field: value}
        path.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=expected) as err:
            ClientUpdate.load(directory)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("value", [10**400, 3.7, "12", True, 12.0, 2**53 + 1])
def test_in_memory_num_samples_rejected_by_every_aggregator(name, value):
    theta, updates = make_round()
    bad = ClientUpdate("bad", value, dict(updates[0].deltas), activation_counts=dict(updates[0].activation_counts))
    result = build_aggregator(name).aggregate(theta, [*updates, bad])
    assert [r.client_id for r in result.rejected] == ["bad"] and "num_samples" in result.rejected[0].reason
    assert_same_merge(result, build_aggregator(name).aggregate(theta, updates))


def test_activation_counts_must_be_whole_and_bounded():
    theta, updates = make_round()
    cases = {
        "frac": torch.tensor([1.5, 0.0, 0.0]),
        "e30": updates[0].activation_counts[GROUP] * 1e30,
        "sum": torch.full((3,), float(2**52)),
    }
    bad = [ClientUpdate(cid, 10, dict(updates[0].deltas), activation_counts={GROUP: c}) for cid, c in cases.items()]
    result = build_aggregator("fcmoe").aggregate(theta, [*updates, *bad])
    reasons = {r.client_id: r.reason for r in result.rejected}
    assert "non-integer values" in reasons["frac"] and f"activation_counts['{GROUP}']" in reasons["frac"]
    assert "exceeds the largest accepted count" in reasons["e30"] and "exceeds" in reasons["sum"]
    assert_same_merge(result, build_aggregator("fcmoe").aggregate(theta, updates))


# -- bounds the server can verify ------------------------------------------------------------------------------------


def test_num_samples_above_the_assigned_partition_is_capped_or_rejected():
    theta, updates = make_round()
    liar = inflate_counts(updates[2], factor=1, num_samples=10**12)
    received = [*updates[:2], liar, *updates[3:]]
    undefended = build_aggregator("fedavg", enforce_bounds=False).aggregate(theta, received, bounds_for(updates))
    assert undefended.rejected == []  # 10**12 < 2**53: only the server's knowledge of the partition catches it
    torch.testing.assert_close(step(undefended, theta), step(build_aggregator("fedavg").aggregate(theta, [liar]), theta))
    # Default: the claim is capped to the partition the server assigned (its true size here): the honest merge.
    result = build_aggregator("fedavg").aggregate(theta, received, bounds_for(updates))
    assert result.rejected == [] and result.summary()["num_capped"] == 1
    assert [(c.client_id, c.reason) for c in result.capped] == [
        ("c2", "num_samples 1000000000000 capped to the assigned partition size 12")
    ]
    assert_same_merge(result, build_aggregator("fedavg").aggregate(theta, updates))
    rejecting = build_aggregator("fedavg", bounds_action="reject").aggregate(theta, received, bounds_for(updates))
    assert [(r.client_id, r.reason) for r in rejecting.rejected] == [
        ("c2", "num_samples 1000000000000 exceeds the client's assigned partition size 12")
    ]
    assert_same_merge(rejecting, build_aggregator("fedavg").aggregate(theta, updates[:2] + updates[3:]))


@pytest.mark.parametrize("name", ["fcmoe", "fedalign_moe", "fedmoe", "fedmedian"])
def test_inflated_activation_counts_are_capped_or_rejected(name):
    theta, updates = make_round()
    liar = inflate_counts(updates[1], factor=1e6, num_samples=updates[1].num_samples)
    received = [updates[0], liar, *updates[2:]]
    result = build_aggregator(name).aggregate(theta, received, bounds_for(updates))
    assert result.rejected == [] and [c.client_id for c in result.capped] == ["c1"]
    # Capped to the typical rate of the others (median of 6/10, 8/12, 9/13, 10/14 activations per sample), shape kept.
    rate = float(torch.tensor([6 / 10, 8 / 12, 9 / 13, 10 / 14], dtype=torch.float64).median())
    assert f"activation_counts['{GROUP}'] scaled from 7e+06 to 7 in total" in result.capped[0].reason
    assert f"median {rate:.6g} activations per sample" in result.capped[0].reason
    honest = build_aggregator(name).aggregate(theta, updates, bounds_for(updates))
    assert honest.capped == []
    if name != "fedmedian":  # the median has no weights
        weights, reference = result.expert_weights[GROUP][1], honest.expert_weights[GROUP][1]
        off = build_aggregator(name, enforce_bounds=False).aggregate(theta, received, bounds_for(updates))
        if name == "fcmoe":  # FedAlign-MoE normalises counts per client, FedMoE weighs by samples: only f buys weight
            assert float(off.expert_weights[GROUP][1].max()) > 0.99  # unchecked, the lie buys the whole weight
        assert torch.allclose(weights, reference, rtol=0.15)  # capped, it buys nothing beyond a typical client's
    rejecting = build_aggregator(name, bounds_action="reject").aggregate(theta, received, bounds_for(updates))
    assert [r.client_id for r in rejecting.rejected] == ["c1"]
    assert "max_activations_per_sample" in rejecting.rejected[0].reason
    assert_same_merge(rejecting, build_aggregator(name).aggregate(theta, [updates[0], *updates[2:]]))


def test_cap_counts_keeps_honest_updates_and_bounds_every_expert():
    bounds = UpdateBounds(clients={"a": ClientExpectation(10), "b": ClientExpectation(10), "c": ClientExpectation(10)},
                          max_activations_per_sample=16.0, top_k=2)
    honest = ClientUpdate("a", 10, {}, activation_counts={GROUP: torch.tensor([40.0, 40.0, 0.0])})
    greedy = ClientUpdate("b", 10, {}, activation_counts={GROUP: torch.tensor([1e9, 0.0, 0.0])})
    stretched = ClientUpdate("c", 10**6, {}, activation_counts={GROUP: torch.tensor([90.0, 0.0, 0.0])})
    out, capped = cap_counts([honest, greedy, stretched], bounds)
    assert out[0] is honest and [c.client_id for c in capped] == ["b", "c"]
    assert out[1].activation_counts[GROUP].tolist() == [80.0, 0.0, 0.0]  # median rate 8 x 10 samples, within 80
    assert out[2].num_samples == 10 and out[2].activation_counts[GROUP].tolist() == [80.0, 0.0, 0.0]  # one expert <= 80
    assert out[1].deltas is greedy.deltas and greedy.activation_counts[GROUP][0] == 1e9  # inputs untouched
    # Nobody within bounds: the bound itself is the rate.
    (alone,), _ = cap_counts([greedy], bounds)
    assert alone.activation_counts[GROUP].tolist() == [80.0, 0.0, 0.0]


def test_bounds_reject_one_expert_beyond_its_tokens_and_pass_honest_counts():
    bounds = UpdateBounds(clients={"a": ClientExpectation(10)}, max_activations_per_sample=16.0, top_k=2)
    assert bounds.check("a", 10, {GROUP: torch.tensor([80.0, 80.0, 0.0])}) is None
    assert "has an expert with 90" in bounds.check("a", 10, {GROUP: torch.tensor([90.0, 0.0, 0.0])})
    assert "sums to 170" in bounds.check("a", 10, {GROUP: torch.tensor([80.0, 80.0, 10.0])})
    assert bounds.check("b", 1, {}) == "client_id 'b' was not assigned to this round"
    with pytest.raises(ValueError, match="max_num_samples must be an integer"):
        ClientExpectation(max_num_samples=3.0)


# -- scaled and sign-flipped updates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_sign_flipped_x100_is_rejected_by_default(name, caplog):
    theta, updates = make_round()
    attacked = [*updates[:3], sign_flip_update(updates[3], 100.0), updates[4]]
    with caplog.at_level(logging.WARNING, logger="fcmoe_hf.federated.validation"):
        result = build_aggregator(name).aggregate(theta, attacked, bounds_for(updates))
    assert [r.client_id for r in result.rejected] == ["c3"]
    assert "exceeds norm_bound_factor 10 x the round's median update norm" in result.rejected[0].reason
    assert any("c3" in record.getMessage() for record in caplog.records)
    assert_same_merge(result, build_aggregator(name).aggregate(theta, updates[:3] + updates[4:]))


@pytest.mark.parametrize("name", ["fedavg", "fcmoe"])
def test_sign_flipped_x100_takes_over_with_the_defences_off(name):
    theta, updates = make_round()
    honest = step(build_aggregator(name).aggregate(theta, updates), theta)
    attacked = [*updates[:3], sign_flip_update(updates[3], 100.0), updates[4]]
    off = build_aggregator(name, norm_bound_factor=None).aggregate(theta, attacked)
    moved = step(off, theta)
    assert off.rejected == [] and float(torch.dot(moved, honest)) < 0 and moved.norm() > 10 * honest.norm()
    # The opt-in clip instead keeps the attacker but at the bound.
    clipped = build_aggregator(name, norm_bound_action="clip").aggregate(theta, attacked)
    assert clipped.rejected == [] and clipped.update_scales["c3"] < 0.11


def test_inflating_counts_buys_an_x3_sign_flip_no_weight():
    theta, updates = make_round()
    flipped = sign_flip_update(updates[3], 3.0)
    attacker = inflate_counts(flipped, factor=1e6, num_samples=updates[3].num_samples)
    attacked = [*updates[:3], attacker, updates[4]]
    off = build_aggregator("fcmoe", enforce_bounds=False).aggregate(theta, attacked, bounds_for(updates))
    assert float(off.expert_weights[GROUP][3].min()) > 0.99  # the issue: weight 1.0 on every expert
    capped = build_aggregator("fcmoe").aggregate(theta, attacked, bounds_for(updates))
    plain = build_aggregator("fcmoe").aggregate(theta, [*updates[:3], flipped, updates[4]], bounds_for(updates))
    assert [c.client_id for c in capped.capped] == ["c3"] and plain.capped == []
    # No more weight than the same x3 flip with its true counts (its rate is above the median; counts round down).
    assert bool((capped.expert_weights[GROUP][3] <= plain.expert_weights[GROUP][3]).all())
    result = build_aggregator("fcmoe", bounds_action="reject").aggregate(theta, attacked, bounds_for(updates))
    assert [r.client_id for r in result.rejected] == ["c3"]
    assert_same_merge(result, build_aggregator("fcmoe").aggregate(theta, updates[:3] + updates[4:]))


def test_importance_cannot_be_bought_by_scaling_one_expert():
    theta, updates = make_round(k=7)

    def greedy(scale):  # one expert scaled: the whole update stays within 10x the median norm, the expert does not
        deltas = {k: v.clone() for k, v in updates[0].deltas.items()}
        deltas[A][1] *= scale
        deltas[B][1] *= scale
        return ClientUpdate("c0", 10, deltas, activation_counts=updates[0].activation_counts)

    weights, undefended = [], []
    for scale in (14.0, 18.0):
        result = build_aggregator("fcmoe").aggregate(theta, [greedy(scale), *updates[1:]])
        assert result.rejected == []
        weights.append(float(result.expert_weights[GROUP][0, 1]))
        off = build_aggregator("fcmoe", norm_bound_factor=None).aggregate(theta, [greedy(scale), *updates[1:]])
        undefended.append(float(off.expert_weights[GROUP][0, 1]))
    assert undefended[1] > undefended[0] > weights[0]  # without the cap, weight grows with the scale
    assert weights[0] == pytest.approx(weights[1], rel=1e-12)  # with it, scaling past 10x the median buys nothing
    norms = torch.tensor([[1.0, 5.0], [2.0, 100.0], [3.0, 7.0], [50.0, 0.0]])
    counts = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1]])
    capped = capped_norms(norms, counts, 10.0)
    assert capped.tolist() == [[1.0, 5.0], [2.0, 60.0], [3.0, 7.0], [20.0, 0.0]]  # medians 2 and 6


# -- overflow --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("defaults", [True, False])
def test_huge_finite_deltas_reject_the_client_not_the_round(name, defaults):
    theta, updates = make_round()
    one = {k: torch.zeros_like(v) for k, v in updates[0].deltas.items()}
    one[ROUTER][0, 0] = 3e38  # finite, norm finite; a weighted sum overflows
    every = {k: torch.full_like(v, 3e38) for k, v in updates[0].deltas.items()}
    bad = [ClientUpdate("one", 10, one, activation_counts=updates[0].activation_counts),
           ClientUpdate("every", 10, every, activation_counts=updates[0].activation_counts)]
    overrides = {} if defaults else {"norm_bound_factor": None}
    for attacker in bad:
        result = build_aggregator(name, **overrides).aggregate(theta, [*updates, attacker])
        assert [r.client_id for r in result.rejected] == [attacker.client_id], result.rejected
        assert all(bool(torch.isfinite(t).all()) for t in result.global_state.values())
        assert_same_merge(result, build_aggregator(name, **overrides).aggregate(theta, updates))


# -- client ids ------------------------------------------------------------------------------------------------------


def test_spoofed_and_unknown_ids():
    theta, updates = make_round()
    reference = build_aggregator("fedavg").aggregate(theta, updates)
    # The transport binds each update to its sender: an impostor claiming c1 is rejected, the real c1 is merged.
    impostor = spoof_id(sign_flip_update(updates[0], 5.0), "c1")
    received = {u.client_id: u for u in updates} | {"c9": impostor}
    bounds = bounds_for(updates + [ClientUpdate("c9", 10, {})])
    result = build_aggregator("fedavg").aggregate(theta, received, bounds)
    assert [(r.client_id, r.reason) for r in result.rejected] == [
        ("c9", "the update claims client_id 'c1' but was received from 'c9'")
    ]
    assert_same_merge(result, reference)
    # An id the server did not assign this round.
    stranger = spoof_id(updates[0], "c42")
    result = build_aggregator("fedavg").aggregate(theta, [*updates, stranger], bounds_for(updates))
    assert [(r.client_id, r.reason) for r in result.rejected] == [("c42", "client_id 'c42' was not assigned to this round")]
    # Without a binding, two claims of one id are both rejected: the impostor does not replace the real client.
    result = build_aggregator("fedavg").aggregate(theta, [impostor, *updates])
    assert [r.client_id for r in result.rejected] == ["c1", "c1"] and "claimed by 2 updates" in result.rejected[0].reason
    assert result.client_ids == ["c0", "c2", "c3", "c4"]


# -- the harness ------------------------------------------------------------------------------------------------------


def test_attack_functions_do_not_modify_their_input():
    _, updates = make_round(k=2)
    before = {k: v.clone() for k, v in updates[0].deltas.items()}
    flipped = sign_flip_update(updates[0], 100.0)
    assert torch.equal(flipped.deltas[A], -100 * before[A]) and torch.equal(updates[0].deltas[A], before[A])
    assert torch.equal(scale_update(updates[0], 2.0).deltas[B], 2 * before[B])
    inflated = inflate_counts(updates[0], 1e30)
    assert inflated.num_samples == 10 * 10**30 or inflated.num_samples == int(10 * 1e30)
    assert math.isclose(float(inflated.activation_counts[GROUP][0]), 3e30)
    transform = attack_clients({"c1": lambda u: sign_flip_update(u, 100.0)}, rounds={2})
    assert transform(1, "c1", updates[1]) is updates[1] and transform(2, "c0", updates[0]) is updates[0]
    assert torch.equal(transform(2, "c1", updates[1]).deltas[A], -100 * updates[1].deltas[A])
