"""Gradient consensus projection (FC-MoE, arXiv:2606.15625, Eq. 3-5) and its pairwise variant: hand-computed examples."""

import math

import pytest
import torch

from fcmoe_hf.federated.functional.consensus import (
    conflict_coefficients,
    consensus_direction,
    consensus_merge,
    consensus_statistics,
    pairwise_statistics,
    project_onto_consensus,
    projected_merge_scale,
)

# One expert (E = 1), two clients, 2-D expert vectors:
#   Delta_1 = (15, 0), Delta_2 = (-12, 9); weights w = (2/3, 1/3) (e.g. f = (2, 1), both norms 15).
DELTAS = torch.tensor([[[15.0, 0.0]], [[-12.0, 9.0]]], dtype=torch.float64)  # (K=2, E=1, D=2)
WEIGHTS = torch.tensor([[2 / 3], [1 / 3]], dtype=torch.float64)


def test_eq3_consensus_direction():
    # g = 2/3 (15, 0) + 1/3 (-12, 9) = (10 - 4, 3) = (6, 3)
    g = consensus_direction(DELTAS, WEIGHTS)
    torch.testing.assert_close(g, torch.tensor([[6.0, 3.0]], dtype=torch.float64))


def test_eq4_projection_removes_only_the_conflicting_component():
    g = torch.tensor([[6.0, 3.0]], dtype=torch.float64)
    projected, a = project_onto_consensus(DELTAS, g)
    # <Delta_1, g> = 90 > 0: unchanged, a_1 = 0.
    # <Delta_2, g> = -72 + 27 = -45 < 0, ||g||^2 = 45: a_2 = -1, Delta_2' = (-12, 9) + (6, 3) = (-6, 12).
    torch.testing.assert_close(a, torch.tensor([[0.0], [-1.0]], dtype=torch.float64))
    torch.testing.assert_close(projected[0], DELTAS[0])
    torch.testing.assert_close(projected[1], torch.tensor([[-6.0, 12.0]], dtype=torch.float64))
    # The projected update is orthogonal to the consensus: (-6)(6) + (12)(3) = 0.
    assert float((projected[1] * g).sum()) == 0.0


def test_eq5_merge_is_scaled_consensus():
    # sum_i w Delta' = 2/3 (15, 0) + 1/3 (-6, 12) = (8, 4) = s g with s = 1 - (1/3)(-1) = 4/3.
    merged, a, diag = consensus_merge(DELTAS, WEIGHTS)
    torch.testing.assert_close(merged, torch.tensor([[8.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(projected_merge_scale(WEIGHTS, a), torch.tensor([4 / 3], dtype=torch.float64))
    # Diagnostics: one of two contributing clients conflicts; cosines 90/(15 sqrt 45) = 2/sqrt 5 and -1/sqrt 5;
    # removed norm ||1/3 (Delta_2 - Delta_2')|| = ||1/3 (-6, -3)|| = sqrt(45)/3 = sqrt 5.
    assert diag.conflict.tolist() == [[False], [True]]
    assert diag.conflict_share.tolist() == [0.5]
    torch.testing.assert_close(diag.cosine[:, 0], torch.tensor([2 / math.sqrt(5), -1 / math.sqrt(5)], dtype=torch.float64))
    torch.testing.assert_close(diag.mean_cosine, torch.tensor([0.5 / math.sqrt(5)], dtype=torch.float64))
    torch.testing.assert_close(diag.removed_norm, torch.tensor([math.sqrt(5)], dtype=torch.float64))
    torch.testing.assert_close(diag.consensus_norm, torch.tensor([math.sqrt(45)], dtype=torch.float64))


def test_statistics_form_matches_vector_form():
    # What the streaming merge computes from norms and dot products alone equals the explicit projection.
    torch.manual_seed(0)
    deltas = torch.randn(5, 3, 7, dtype=torch.float64)
    weights = torch.rand(5, 3, dtype=torch.float64)
    weights[1, 2] = 0.0
    weights = weights / weights.sum(0)
    g = consensus_direction(deltas, weights)
    projected, a = project_onto_consensus(deltas, g)
    explicit = torch.einsum("ke,ked->ed", weights, projected)
    dots = torch.einsum("ked,ed->ke", deltas, g)
    a2, scale, _ = consensus_statistics(weights, deltas.norm(dim=-1), dots, g.square().sum(-1))
    torch.testing.assert_close(a2, a)
    torch.testing.assert_close(scale.unsqueeze(-1) * g, explicit)


def test_no_conflict_when_consensus_is_zero():
    a = conflict_coefficients(torch.tensor([[-1.0], [1.0]]), torch.tensor([0.0]))
    assert a.tolist() == [[0.0], [0.0]]


def test_pairwise_pcgrad_two_clients():
    # <Delta_1, Delta_2> = -180 < 0: each is projected off the other (PCGrad), ||Delta_j||^2 = 225:
    #   Delta_1' = (15, 0) + 180/225 (-12, 9) = (5.4, 7.2); Delta_2' = (-12, 9) + 0.8 (15, 0) = (0, 9)
    #   merged = 2/3 (5.4, 7.2) + 1/3 (0, 9) = (3.6, 7.8)
    merged, m, diag = consensus_merge(DELTAS, WEIGHTS, mode="pairwise")
    torch.testing.assert_close(merged, torch.tensor([[3.6, 7.8]], dtype=torch.float64))
    torch.testing.assert_close(m[0], torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64))
    assert diag.conflict.tolist() == [[True], [True]]


def test_pairwise_skips_non_participants():
    # A client with weight 0 is neither projected nor a projection target.
    deltas = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    weights = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    gram = torch.einsum("ied,jed->eij", deltas, deltas)
    m, combination, _ = pairwise_statistics(weights, gram)
    assert torch.equal(m[0], torch.eye(3, dtype=torch.float64))
    assert combination[:, 0].tolist() == [1.0, 0.0, 0.0]


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        consensus_merge(DELTAS, WEIGHTS, mode="nope")
