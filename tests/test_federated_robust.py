"""Robust aggregation: FedMedian / FedTrimmedAvg against Flower's own strategies, per-expert participation, the
weighted statistics, and FC-MoE's robust consensus."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fcmoe_hf.federated import ClientUpdate, build_aggregator
from fcmoe_hf.federated.attacks import sign_flip_update
from fcmoe_hf.federated.functional.robust import trimmed_mean, weighted_median, weighted_trimmed_mean

strategy = pytest.importorskip("flwr.serverapp.strategy")
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict  # noqa: E402

GROUP = "base_model.model.layers.0.q_proj"
KEYS = (f"{GROUP}.moe_lora_A", f"{GROUP}.moe_lora_B", "base_model.model.score.weight", "base_model.model.score.bias")
SHAPES = ((4, 2, 6), (4, 6, 2), (3, 6), (3,))


def _round(k, seed=0, counts=None):
    g = torch.Generator().manual_seed(seed)
    theta = {key: torch.randn(s, generator=g) for key, s in zip(KEYS, SHAPES)}
    updates = [
        ClientUpdate(
            f"c{i}",
            5 + i,
            {key: torch.randn(s, generator=g) * 0.1 for key, s in zip(KEYS, SHAPES)},
            activation_counts={GROUP: torch.tensor([1, 2, 3, 4]) if counts is None else counts[i]},
        )
        for i in range(k)
    ]
    return theta, updates


def _flower(flwr_class, kwargs, theta, updates, monkeypatch):
    """Flower's own `aggregate_train` over the clients' parameters `Theta + Delta_i` (its reply checks bypassed)."""
    replies = [
        SimpleNamespace(
            content=RecordDict(
                {
                    "arrays": ArrayRecord({k: Array((theta[k] + u.deltas[k]).numpy()) for k in KEYS}),
                    "metrics": MetricRecord({"num-examples": u.num_samples}),
                }
            )
        )
        for u in updates
    ]
    flower = flwr_class(**kwargs)
    monkeypatch.setattr(flower, "_check_and_log_replies", lambda replies, is_train: (list(replies), []))
    arrays, _ = flower.aggregate_train(1, replies)
    return {k: a.numpy() for k, a in arrays.items()}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(
    "name,flwr_class,ours,theirs",
    [
        ("fedmedian", strategy.FedMedian, {}, {}),
        ("fedtrimmedavg", strategy.FedTrimmedAvg, {}, {}),
        ("fedtrimmedavg", strategy.FedTrimmedAvg, {"beta": 0.3}, {"beta": 0.3}),
        ("fedtrimmedavg", strategy.FedTrimmedAvg, {"beta": 0.0}, {"beta": 0.0}),
    ],
)
def test_robust_aggregators_match_flower(monkeypatch, k, name, flwr_class, ours, theirs):
    theta, updates = _round(k, seed=k)
    expected = _flower(flwr_class, theirs, theta, updates, monkeypatch)
    for per_expert in (True, False):  # every client used every expert: both readings are Flower's
        result = build_aggregator(name, per_expert=per_expert, merge_buffer_mb=0, **ours).aggregate(theta, updates)
        assert result.rejected == []
        for key in KEYS:
            np.testing.assert_allclose(result.global_state[key].numpy(), expected[key], rtol=1e-6, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg"])
def test_only_clients_that_used_an_expert_take_part(name, monkeypatch):
    counts = [torch.tensor([1, 0, 3, 0]), torch.tensor([2, 0, 0, 0]), torch.tensor([5, 0, 1, 0]), torch.tensor([1, 1, 0, 0])]
    theta, updates = _round(4, counts=counts)
    result = build_aggregator(name).aggregate(theta, updates)
    a = f"{GROUP}.moe_lora_A"
    torch.testing.assert_close(result.global_state[a][1], theta[a][1] + updates[3].deltas[a][1])  # only c3 used it
    assert torch.equal(result.global_state[a][3], theta[a][3])  # nobody used expert 3: unchanged
    # Expert 2: the median of c0 and c2 only (Flower's arithmetic on those two).
    expected = _flower(strategy.FedMedian if name == "fedmedian" else strategy.FedTrimmedAvg, {}, theta, [updates[0], updates[2]], monkeypatch)
    np.testing.assert_allclose(result.global_state[a][2].numpy(), expected[a][2], rtol=1e-6, atol=1e-6)
    assert result.expert_weights[GROUP][:, 1].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_bf16_lazy_chunks_equal_in_memory(tmp_path):
    theta, updates = _round(5)
    loaded = []
    for u in updates:
        half = ClientUpdate(u.client_id, u.num_samples, {k: v.bfloat16() for k, v in u.deltas.items()}, activation_counts=u.activation_counts)
        loaded.append(ClientUpdate.load(half.save(tmp_path / u.client_id)))
    in_memory = [ClientUpdate(u.client_id, u.num_samples, {k: v.bfloat16() for k, v in u.deltas.items()}, activation_counts=u.activation_counts) for u in updates]
    for name in ("fedmedian", "fedtrimmedavg"):
        a = build_aggregator(name, merge_buffer_mb=0).aggregate(theta, loaded)  # one expert per chunk
        b = build_aggregator(name).aggregate(theta, in_memory)
        assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in KEYS)


def test_weighted_statistics():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0]).view(4, 1, 1)
    assert float(weighted_median(values, torch.tensor([[1.0], [1.0], [1.0], [5.0]]))) == 10.0
    assert float(weighted_median(values, torch.ones(4, 1))) == 2.5  # NumPy's median
    assert float(weighted_median(values, torch.tensor([[1.0], [0.0], [1.0], [0.0]]))) == 2.0  # zero weight: not there
    assert float(weighted_trimmed_mean(values, torch.ones(4, 1), 0.25)) == 2.5
    # Equal weights, beta * n whole: Flower's trimmed mean; fractional cuts keep part of the boundary weight.
    x = torch.randn(10, 3, 7)
    torch.testing.assert_close(weighted_trimmed_mean(x, torch.full((10, 3), 0.1), 0.2), trimmed_mean(x, torch.ones(10, 3, dtype=torch.bool), 0.2))
    assert float(weighted_trimmed_mean(values, torch.ones(4, 1), 0.125)) == pytest.approx((0.5 * 1 + 2 + 3 + 0.5 * 10) / 3)
    assert weighted_median(x, torch.zeros(10, 3)).abs().sum() == 0


@pytest.mark.parametrize("robust", ["median", "trimmed_mean"])
def test_fcmoe_robust_consensus_resists_a_flipped_client(robust):
    g = torch.Generator().manual_seed(3)
    theta = {key: torch.randn(s, generator=g) for key, s in zip(KEYS, SHAPES)}
    direction = {key: torch.randn(s, generator=g) for key, s in zip(KEYS, SHAPES)}
    honest = [
        ClientUpdate(f"c{i}", 10, {k: 0.05 * (d + 0.3 * torch.randn(d.shape, generator=g)) for k, d in direction.items()},
                     activation_counts={GROUP: torch.tensor([4, 4, 4, 4])})
        for i in range(6)
    ]
    attacked = [*honest[:5], sign_flip_update(honest[5], 8.0)]  # within the norm bound (8 < 10)
    a = f"{GROUP}.moe_lora_A"

    def cosine(result):
        step = (result.global_state[a] - theta[a]).flatten()
        return float(torch.nn.functional.cosine_similarity(step, direction[a].flatten(), dim=0))

    mean_rule = build_aggregator("fcmoe").aggregate(theta, attacked)
    robust_rule = build_aggregator("fcmoe", robust=robust, trim_beta=0.2).aggregate(theta, attacked)
    assert mean_rule.rejected == [] and robust_rule.rejected == []
    assert cosine(robust_rule) > 0.9 > cosine(mean_rule)
    # All clients equal: every rule gives that update; diagnostics and retention still work.
    same = [ClientUpdate(f"s{i}", 10, dict(honest[0].deltas), activation_counts=honest[0].activation_counts) for i in range(3)]
    for projection in (True, False):
        result = build_aggregator("fcmoe", robust=robust, use_projection=projection, merge_buffer_mb=0).aggregate(theta, same)
        torch.testing.assert_close(result.global_state[a], theta[a] + honest[0].deltas[a])
        assert result.personalized_state("s0")[a].shape == theta[a].shape
        assert (GROUP in result.diagnostics) == projection


def test_fcmoe_robust_config_checks():
    with pytest.raises(ValueError, match="robust must be"):
        build_aggregator("fcmoe", robust="mode")
    with pytest.raises(ValueError, match="projection_mode='consensus'"):
        build_aggregator("fcmoe", robust="median", projection_mode="pairwise")
    with pytest.raises(ValueError, match="retention_mode='projection'"):
        build_aggregator("fcmoe", robust="median", retention_mode="filtered")
    with pytest.raises(ValueError, match="beta must be in"):
        build_aggregator("fedtrimmedavg", beta=0.5)
