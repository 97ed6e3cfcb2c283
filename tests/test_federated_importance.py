"""Importance-aware weights (FC-MoE, arXiv:2606.15625, Eq. 2-3): hand-computed examples."""

import pytest
import torch

from fcmoe_hf.federated import ClientUpdate
from fcmoe_hf.federated.functional.importance import (
    active_experts,
    data_size_weights,
    importance_scores,
    importance_weights,
    normalize_scores,
    stack_statistics,
)

GROUP = "model.layers.0.mlp.experts"


def test_eq1_eq2_importance_is_count_times_norm_of_concatenated_expert():
    # Eq. 1: Delta = theta_local - theta_global, per tensor of the group.
    theta_global = {f"{GROUP}.gate_up_proj": torch.tensor([[1.0], [0.0]]), f"{GROUP}.down_proj": torch.tensor([[1.0], [2.0]])}
    theta_local = {f"{GROUP}.gate_up_proj": torch.tensor([[4.0], [0.0]]), f"{GROUP}.down_proj": torch.tensor([[5.0], [2.0]])}
    deltas = {k: theta_local[k] - theta_global[k] for k in theta_global}
    # Expert 0's vector is the concatenation (gate_up[0], down[0]) = (3, 4): norm 5. Expert 1 did not move: norm 0.
    update = ClientUpdate("a", 10, deltas, activation_counts={GROUP: torch.tensor([2.0, 7.0])})
    norms = update.expert_norms()[GROUP]
    assert torch.equal(norms, torch.tensor([5.0, 0.0], dtype=torch.float64))
    # Eq. 2: c = f * ||Delta|| = (2 * 5, 7 * 0) = (10, 0).
    scores = importance_scores(update.activation_counts[GROUP].unsqueeze(0), norms.unsqueeze(0))
    assert torch.equal(scores, torch.tensor([[10.0, 0.0]], dtype=torch.float64))
    assert torch.equal(update.importance()[GROUP], scores[0])


def test_eq3_weights_hand_computed():
    # Three clients, two experts.
    # counts f = [[2, 0], [1, 3], [1, 0]], norms = [[15, 9], [15, 2], [0, 4]]
    # c = f * norm = [[30, 0], [15, 6], [0, 0]]: column sums (45, 6)
    # w = [[30/45, 0], [15/45, 6/6], [0, 0]] = [[2/3, 0], [1/3, 1], [0, 0]]
    counts = torch.tensor([[2.0, 0.0], [1.0, 3.0], [1.0, 0.0]])
    norms = torch.tensor([[15.0, 9.0], [15.0, 2.0], [0.0, 4.0]])
    weights = importance_weights(counts, norms)
    expected = torch.tensor([[2 / 3, 0.0], [1 / 3, 1.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-15)
    # Client 0 never activated expert 1 (f = 0): weight 0 although its update there is the largest.
    assert weights[0, 1] == 0


def test_expert_nobody_activated_gets_all_zero_weights():
    counts = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    norms = torch.tensor([[3.0, 1.0], [4.0, 1.0]])
    weights = importance_weights(counts, norms)
    # Column 0: c = (0, 0): nobody activated it; all weights 0 (the merge leaves the expert unchanged).
    assert torch.equal(weights[:, 0], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(weights[:, 1], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    assert active_experts(importance_scores(counts, norms)).tolist() == [False, True]


def test_data_size_weights_ignore_activations():
    # Ablation (c): |D| = (30, 10) -> (3/4, 1/4) for every expert, activated or not.
    weights = data_size_weights([30, 10], num_experts=3)
    assert weights.shape == (2, 3)
    assert torch.equal(weights, torch.tensor([[0.75] * 3, [0.25] * 3], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_samples"):
        data_size_weights([0, 0])


def test_normalize_scores_columns_sum_to_one_or_zero():
    scores = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])
    weights = normalize_scores(scores)
    assert weights.sum(0).tolist() == [1.0, 0.0, 1.0]


def test_stack_statistics_missing_group_is_zero_row():
    a = ClientUpdate("a", 1, {}, activation_counts={GROUP: torch.tensor([1, 2])})
    b = ClientUpdate("b", 1, {})
    stacked = stack_statistics([a, b], GROUP, 2)
    assert stacked.dtype == torch.float64
    assert stacked.tolist() == [[1.0, 2.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="shape"):
        importance_scores(torch.ones(2, 3), torch.ones(3, 2))
