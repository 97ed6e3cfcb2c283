"""Bad client updates: rejected with a reason, logged, and the merge equals the merge of the valid ones."""

import copy
import logging

import pytest
import torch

from fcmoe_hf.federated import ClientUpdate, build_aggregator
from fcmoe_hf.federated.aggregators import AGGREGATORS
from fcmoe_hf.federated.aggregators.kernels import weighted_pass
from fcmoe_hf.federated.io.stream import UpdateStream
from fcmoe_hf.federated.validation import (
    ContentRejected,
    check_update_structure,
    update_norm,
    validate_update,
    validate_updates,
)

GROUP = "base_model.model.model.layers.0.self_attn.q_proj"
A, B, ROUTER = f"{GROUP}.moe_lora_A", f"{GROUP}.moe_lora_B", f"{GROUP}.moe_lora_router"


def make_round(k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta = {A: torch.randn(3, 2, 4, generator=gen), B: torch.randn(3, 5, 2, generator=gen), ROUTER: torch.randn(3, 4, generator=gen)}
    updates = [
        ClientUpdate(
            f"ok{i}",
            10 + i,
            {key: torch.randn(v.shape, generator=gen) for key, v in theta.items()},
            activation_counts={GROUP: torch.tensor([1.0 + i, 2.0, 1.0])},
            mean_gate={GROUP: torch.tensor([0.5, 0.3, 0.2])},
        )
        for i in range(k)
    ]
    return theta, updates


def corrupt(update, cid, **changes):
    bad = copy.deepcopy(update)
    bad.client_id = cid
    for name, value in changes.items():
        setattr(bad, name, value)
    return bad


def bad_updates(template):
    nan = dict(template.deltas)
    nan[B] = template.deltas[B].clone()
    nan[B][1, 2, 0] = float("nan")
    inf = dict(template.deltas)
    inf[ROUTER] = torch.full_like(template.deltas[ROUTER], float("inf"))
    shape = dict(template.deltas)
    shape[A] = torch.zeros(3, 2, 5)
    missing = {k: v for k, v in template.deltas.items() if k != ROUTER}
    extra = dict(template.deltas, **{f"{GROUP}.lora_magnitude": torch.zeros(3)})
    huge = {k: v * 1e6 for k, v in template.deltas.items()}
    integer = dict(template.deltas)
    integer[ROUTER] = torch.zeros(3, 4, dtype=torch.int64)
    return [
        (corrupt(template, "nan", deltas=nan), f"non-finite values (NaN or Inf) in '{B}'"),
        (corrupt(template, "inf", deltas=inf), f"non-finite values (NaN or Inf) in '{ROUTER}'"),
        (corrupt(template, "shape", deltas=shape), f"shape mismatch for '{A}': expected (3, 2, 4), got (3, 2, 5)"),
        (corrupt(template, "missing", deltas=missing), f"missing keys ['{ROUTER}']"),
        (corrupt(template, "extra", deltas=extra), f"unexpected keys ['{GROUP}.lora_magnitude']"),
        (corrupt(template, "huge", deltas=huge), "exceeds max_update_norm 1000"),
        (corrupt(template, "int", deltas=integer), f"non-floating dtype torch.int64 for '{ROUTER}'"),
        (corrupt(template, "counts", activation_counts={GROUP: torch.tensor([1.0, -1.0, 0.0])}), "activation_counts"),
        (corrupt(template, "zero-samples", num_samples=0), "num_samples"),
    ]


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_each_bad_update_rejected_and_merge_equals_valid_merge(name, caplog):
    theta, valid = make_round()
    bad = bad_updates(valid[0])
    reference = build_aggregator(name, max_update_norm=1000.0).aggregate(theta, valid)
    # Bad updates interleaved with the valid ones, in every position.
    mixed = [bad[0][0], valid[0], bad[1][0], bad[2][0], valid[1], *[b for b, _ in bad[3:]], valid[2]]
    with caplog.at_level(logging.WARNING, logger="fcmoe_hf.federated.validation"):
        result = build_aggregator(name, max_update_norm=1000.0).aggregate(theta, mixed)
    reasons = {r.client_id: r.reason for r in result.rejected}
    assert set(reasons) == {b.client_id for b, _ in bad}
    for b, expected in bad:
        assert expected in reasons[b.client_id], (b.client_id, reasons[b.client_id])
        assert any(b.client_id in rec.getMessage() for rec in caplog.records)
    assert result.client_ids == ["ok0", "ok1", "ok2"]
    for key in theta:
        assert torch.equal(result.global_state[key], reference.global_state[key]), key


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_below_min_clients_raises_and_keeps_previous_state(name):
    theta, valid = make_round(k=2)
    snapshot = {k: v.clone() for k, v in theta.items()}
    nan_update = bad_updates(valid[0])[0][0]
    aggregator = build_aggregator(name, min_clients=3)
    state_before = aggregator.state_dict()
    with pytest.raises(ValueError, match=r"Only 2 valid client update\(s\) remain, fewer than min_clients=3.*nan: non-finite"):
        aggregator.aggregate(theta, [valid[0], nan_update, valid[1]])
    assert all(torch.equal(theta[k], snapshot[k]) for k in theta)
    assert aggregator.state_dict().keys() == state_before.keys()
    # Structural rejections hit the same rule before any tensor is read.
    with pytest.raises(ValueError, match="missing keys"):
        build_aggregator(name, min_clients=2).aggregate(theta, [valid[0], bad_updates(valid[0])[3][0]])


def test_server_optimizer_state_after_rejection_equals_clean_round():
    theta, valid = make_round()
    nan_update = bad_updates(valid[0])[0][0]
    clean, noisy = build_aggregator("fedadam"), build_aggregator("fedadam")
    a = clean.aggregate(theta, valid)
    b = noisy.aggregate(theta, [nan_update, *valid])  # merged twice internally; state committed once
    assert [r.client_id for r in b.rejected] == ["nan"]
    assert noisy.state_dict()["step"].item() == 1
    for key, value in clean.state_dict().items():
        assert torch.equal(value, noisy.state_dict()[key]), key
    assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in theta)


@pytest.mark.parametrize("name", ["fcmoe", "fedavg", "ties", "fedadam"])
def test_clipping_scales_large_updates(name):
    theta, valid = make_round()
    norms = [update_norm(u) for u in valid]
    clip = min(norms) / 2
    clipped = [corrupt(u, u.client_id, deltas={k: v * (clip / n) for k, v in u.deltas.items()}) for u, n in zip(valid, norms)]
    expected = build_aggregator(name).aggregate(theta, clipped)
    result = build_aggregator(name, clip_update_norm=clip).aggregate(theta, valid)
    for key in theta:
        torch.testing.assert_close(result.global_state[key], expected.global_state[key], rtol=1e-5, atol=1e-6)
    for cid in expected.residuals:  # residuals are those of the clipped updates
        for group, coef in expected.residuals[cid].items():
            torch.testing.assert_close(result.residuals[cid][group], coef, rtol=1e-5, atol=1e-7)
    # The bound still rejects, before clipping.
    huge = bad_updates(valid[0])[5][0]
    result = build_aggregator(name, clip_update_norm=clip, max_update_norm=1000.0).aggregate(theta, [*valid, huge])
    assert [r.client_id for r in result.rejected] == ["huge"]


def test_validate_update_reasons_and_duplicates():
    theta, valid = make_round()
    assert validate_update(valid[0], theta) is None
    assert validate_update(valid[0], theta, max_update_norm=1e-3).startswith("update norm")
    for bad, expected in bad_updates(valid[0]):
        reason = validate_update(bad, theta, max_update_norm=1000.0)
        assert reason is not None and expected in reason, (bad.client_id, reason)
    # Metadata-only checks do not read values.
    assert check_update_structure(bad_updates(valid[0])[0][0], theta) is None
    # Without a transport binding ids to senders, every claim of a duplicated id is rejected (first come is no proof).
    kept, rejected = validate_updates([valid[0], valid[0], valid[1]], theta)
    assert [u.client_id for u in kept] == ["ok1"]
    assert [r.reason for r in rejected] == ["client_id 'ok0' is claimed by 2 updates in this round; all claims rejected"] * 2
    assert check_update_structure(corrupt(valid[0], "m", deltas={}), theta) == f"missing keys ['{A}', '{B}', '{ROUTER}']"
    unknown = corrupt(valid[0], "u", activation_counts={"model.layers.7.mlp.experts": torch.ones(3)})
    assert "unknown expert groups" in check_update_structure(unknown, theta)
    wrong = corrupt(valid[0], "w", mean_gate={GROUP: torch.ones(4)})
    assert check_update_structure(wrong, theta) == f"mean_gate['{GROUP}'] has shape (4,), expected (3,) (one per expert)"


def test_bf16_updates_are_accepted():
    theta, valid = make_round()
    half = [corrupt(u, u.client_id, deltas={k: v.bfloat16() for k, v in u.deltas.items()}) for u in valid]
    result = build_aggregator("fcmoe").aggregate(theta, half)
    assert result.rejected == [] and all(result.global_state[k].dtype == torch.float32 for k in theta)


def test_malformed_global_state_is_an_error():
    theta, valid = make_round()
    with pytest.raises(ValueError, match="dimension 0"):
        build_aggregator("fcmoe").aggregate({**theta, A: torch.zeros(2, 2, 4)}, valid)
    with pytest.raises(ValueError, match="non-floating"):
        build_aggregator("fedavg").aggregate({**theta, ROUTER: torch.zeros(3, 4, dtype=torch.int64)}, valid)
    with pytest.raises(TypeError, match="ClientUpdate"):
        build_aggregator("fedavg").aggregate(theta, [valid[0].deltas])


def test_non_finite_values_found_without_norms():
    # FedAvg without a norm bound computes no norms: a NaN is caught through the accumulator, then located.
    theta, valid = make_round()
    nan_update = bad_updates(valid[0])[0][0]
    result = build_aggregator("fedavg").aggregate(theta, [*valid, nan_update])
    assert [(r.client_id, r.reason) for r in result.rejected] == [("nan", f"non-finite values (NaN or Inf) in '{B}'")]
    reference = build_aggregator("fedavg").aggregate(theta, valid)
    assert all(torch.equal(result.global_state[k], reference.global_state[k]) for k in theta)
    # A client with zero weight hides its NaN from the accumulator: it is checked explicitly.
    stream = UpdateStream([valid[0], nan_update])
    with pytest.raises(ContentRejected) as err:
        weighted_pass(
            stream, [B], [theta[B].shape], expert_rows=True, score_fn=lambda i, norms: torch.tensor(float(i == 0)), need_norms=False
        )
    assert err.value.problems == {1: f"non-finite values (NaN or Inf) in '{B}'"}
