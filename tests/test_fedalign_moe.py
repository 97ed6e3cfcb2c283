"""FedAlign-MoE routing-share weighting: hand-computed merges on two experts, and what it does not depend on."""

import math

import pytest
import torch
from transformers import HfArgumentParser

from fcmoe_hf.federated import (
    ClientConfig,
    ClientUpdate,
    FedAlignMoEAggregator,
    FedAlignMoEConfig,
    aggregator_config_class,
    build_aggregator,
)
from fcmoe_hf.federated.aggregators.fedalign_moe import routing_shares

GROUP = "model.layers.0.mlp.experts"
X, Y, GATE = f"{GROUP}.gate_up_proj", f"{GROUP}.down_proj", "model.layers.0.mlp.gate.weight"


def state(e0, e1=0.0, gate=(0.0, 0.0)):
    """Two experts with one parameter each (x; y = 0) and a shared two-entry router."""
    return {X: torch.tensor([[e0], [e1]]), Y: torch.zeros(2, 1), GATE: torch.tensor(list(gate))}


def update(cid, n, e0, e1, gate=(0.0, 0.0), counts=(1.0, 1.0)):
    activation = {} if counts is None else {GROUP: torch.tensor(counts)}
    return ClientUpdate(cid, n, state(e0, e1, gate), activation_counts=activation)


def xs(result):
    return result.global_state[X][:, 0].tolist()


# Theta: experts (1, 2), router (0, 0)
#   A: |D| = 30, Delta experts (4, -2), router (1, -1), f = (3, 0) -> s_A = (1, 0)
#   B: |D| = 10, Delta experts (8, 6),  router (-3, 5), f = (1, 4) -> s_B = (0.2, 0.8)
def hand_round(counts_a=(3.0, 0.0), counts_b=(1.0, 4.0), delta_b=(8.0, 6.0)):
    old = state(1.0, 2.0)
    updates = [
        update("A", 30, 4.0, -2.0, gate=(1.0, -1.0), counts=counts_a),
        update("B", 10, *delta_b, gate=(-3.0, 5.0), counts=counts_b),
    ]
    return old, updates


def test_hand_computed_round():
    old, updates = hand_round()
    result = build_aggregator("fedalign_moe").aggregate(old, updates)
    # Expert 0: w = (1, 0.2) / 1.2 = (5/6, 1/6): 1 + 4 * 5/6 + 8 * 1/6 = 1 + 28/6 = 17/3.
    # Expert 1: w = (0, 0.8) / 0.8 = (0, 1): 2 + 6 = 8.
    assert xs(result) == pytest.approx([17 / 3, 8.0])
    torch.testing.assert_close(
        result.expert_weights[GROUP], torch.tensor([[5 / 6, 0.0], [1 / 6, 1.0]], dtype=torch.float64)
    )
    # Router (shared): FedAvg by |D| = (3/4, 1/4): (0.75 - 0.75, -0.75 + 1.25) = (0, 0.5).
    assert result.global_state[GATE].tolist() == [0.0, 0.5]
    assert result.global_state[Y].tolist() == [[0.0], [0.0]]
    # No projection, no retention.
    assert result.diagnostics == {} and result.residuals == {}
    assert result.client_ids == ["A", "B"]
    # The same round under FedAvg (6, 2) and FC-MoE's f * ||Delta|| (6.6, 8) merges differently.
    assert xs(build_aggregator("fedavg").aggregate(old, updates)) == [6.0, 2.0]
    assert xs(build_aggregator("fcmoe", use_projection=False).aggregate(old, updates)) == pytest.approx([6.6, 8.0])


def test_shares_are_normalised_per_client_and_ignore_norms():
    # A routes 100x more tokens with the same split: its shares, and so the merge, do not change (FC-MoE's would:
    # expert 0, c = (300 * 4, 8) -> w = (150/151, 1/151)).
    old, updates = hand_round(counts_a=(300.0, 0.0))
    assert xs(FedAlignMoEAggregator().aggregate(old, updates)) == pytest.approx([17 / 3, 8.0])
    # B moves expert 0 ten times as far: its weight stays 1/6 (no norm factor): 1 + 20/6 + 80/6 = 53/3.
    old, updates = hand_round(delta_b=(80.0, 6.0))
    result = FedAlignMoEAggregator().aggregate(old, updates)
    assert xs(result) == pytest.approx([53 / 3, 8.0])
    torch.testing.assert_close(result.expert_weights[GROUP][:, 0], torch.tensor([5 / 6, 1 / 6], dtype=torch.float64))


def test_unrouted_experts_and_clients():
    # Nobody routed to expert 1 -> unchanged although both clients moved it. B (f = (2, 0)) -> s_B = (1, 0):
    # expert 0: w = (1/2, 1/2): 1 + 2 + 4 = 7.
    old, updates = hand_round(counts_b=(2.0, 0.0))
    assert xs(FedAlignMoEAggregator().aggregate(old, updates)) == [7.0, 2.0]
    # B routed nothing in the group (zeros, or no counts at all): weight 0 on every expert; only A's update counts on
    # its expert 0 (1 + 4 = 5); expert 1 unchanged. The router still averages B's update by data size.
    for counts_b in ((0.0, 0.0), None):
        old, updates = hand_round(counts_b=counts_b)
        result = FedAlignMoEAggregator().aggregate(old, updates)
        assert xs(result) == [5.0, 2.0]
        assert result.expert_weights[GROUP][1].tolist() == [0.0, 0.0]
        assert result.global_state[GATE].tolist() == [0.0, 0.5]
    # Nobody routed anything: every expert stays; the router is still merged.
    old, updates = hand_round(counts_a=(0.0, 0.0), counts_b=(0.0, 0.0))
    result = FedAlignMoEAggregator().aggregate(old, updates)
    assert xs(result) == [1.0, 2.0] and result.global_state[GATE].tolist() == [0.0, 0.5]


def test_routing_shares():
    updates = [
        update("a", 1, 0.0, 0.0, counts=(3.0, 1.0)),
        update("b", 1, 0.0, 0.0, counts=(0.0, 0.0)),
        update("c", 1, 0.0, 0.0, counts=None),
        update("d", 1, 0.0, 0.0, counts=(0.0, 5.0)),
    ]
    shares = routing_shares(updates, GROUP, 2)
    assert shares.dtype == torch.float64
    assert shares.tolist() == [[0.75, 0.25], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]]


def test_nan_update_of_an_unweighted_client_is_rejected():
    # B routes nothing, so its expert weights are 0; a NaN in its expert update must still be caught, not hidden.
    old, updates = hand_round(counts_b=(0.0, 0.0))
    updates[1].deltas[X][0, 0] = math.nan
    result = FedAlignMoEAggregator().aggregate(old, updates)
    assert [r.client_id for r in result.rejected] == ["B"] and "non-finite" in result.rejected[0].reason
    assert xs(result) == [5.0, 2.0]
    # A (1 client left): router is A's update alone.
    assert result.global_state[GATE].tolist() == [1.0, -1.0]


def test_streamed_from_disk_matches_memory(tmp_path):
    old, updates = hand_round()
    loaded = []
    for u in updates:
        u.save(tmp_path / u.client_id)
        loaded.append(ClientUpdate.load(tmp_path / u.client_id))
    memory = FedAlignMoEAggregator().aggregate(old, updates)
    streamed = FedAlignMoEAggregator().aggregate(old, loaded)
    for key in old:
        assert torch.equal(memory.global_state[key], streamed.global_state[key])


def test_registry_and_config():
    aggregator = build_aggregator("fedalign_moe", min_clients=2)
    assert isinstance(aggregator, FedAlignMoEAggregator) and aggregator.name == "fedalign_moe"
    assert aggregator_config_class("fedalign_moe") is FedAlignMoEConfig
    assert aggregator.config == FedAlignMoEConfig(min_clients=2)
    (config,) = HfArgumentParser(FedAlignMoEConfig).parse_args_into_dataclasses(["--clip_update_norm", "3"])
    assert config == FedAlignMoEConfig(clip_update_norm=3.0)
    assert aggregator.configure_client(1) == ClientConfig()  # plain local training
