"""Local knowledge retention (FC-MoE, arXiv:2606.15625, Eq. 5-6): hand-computed examples, client and server agreeing."""

import pytest
import torch

from fcmoe_hf.federated import ClientUpdate, build_aggregator, retained_start
from fcmoe_hf.federated.functional.retention import (
    apply_retention,
    residual_coefficients,
    retention_coefficients,
    retention_residual,
)

GROUP = "model.layers.0.mlp.experts"
X, Y, GATE = f"{GROUP}.gate_up_proj", f"{GROUP}.down_proj", "model.layers.0.mlp.gate.weight"


def state(x0, y0, x1=0.0, y1=0.0, gate=(0.0, 0.0)):
    """An expert group of two experts whose vectors are (x, y), split over two tensors, plus a shared router."""
    return {X: torch.tensor([[x0], [x1]]), Y: torch.tensor([[y0], [y1]]), GATE: torch.tensor([list(gate)])}


def test_eq5_projection_coefficient_hand_computed():
    # New global expert 0: Theta = (3, 3), ||Theta||^2 = 18. Client update Delta = (15, 0):
    #   R = <Delta, Theta> / ||Theta||^2 Theta = 45/18 Theta = 2.5 (3, 3) = (7.5, 7.5).
    # Expert 1 has Theta = (0, 0): its coefficient is 0 (nothing to project onto).
    theta = state(3.0, 3.0)
    delta = state(15.0, 0.0, 1.0, 1.0)
    coef = retention_coefficients(delta, theta)
    assert coef[GROUP].tolist() == [2.5, 0.0]
    assert torch.equal(retention_residual(coef[GROUP], theta[X]), torch.tensor([[7.5], [0.0]]))
    assert torch.equal(residual_coefficients([delta[X], delta[Y]], [theta[X], theta[Y]]), coef[GROUP])


def test_eq6_start_is_theta_plus_lambda_r():
    # lambda = 0.5: start = (3, 3) + 0.5 (7.5, 7.5) = (6.75, 6.75); shared tensors stay the global ones.
    theta = state(3.0, 3.0, gate=(1.0, 2.0))
    start = retained_start(theta, state(15.0, 0.0), lam=0.5)
    assert start[X].tolist() == [[6.75], [0.0]] and start[Y].tolist() == [[6.75], [0.0]]
    assert start[GATE] is theta[GATE]
    # lambda = 0 and "no previous update" both start from the global state itself.
    for start in (retained_start(theta, state(15.0, 0.0), lam=0.0), retained_start(theta, None)):
        assert all(start[k] is theta[k] for k in theta)


def test_filtered_mode_is_the_removed_component():
    # Round: Theta_old = (-5, -1); two clients Delta_1 = (15, 0) (f = 2), Delta_2 = (-12, 9) (f = 1), both norm 15,
    # so w = (2/3, 1/3), g = (6, 3), a_2 = -1, s = 4/3, Theta_new = (-5, -1) + 4/3 (6, 3) = (3, 3).
    # Filtered residual of client 2: Delta_2 - Delta_2' = a_2 g = (-6, -3) = -3/4 (Theta_new - Theta_old).
    old = state(-5.0, -1.0)
    updates = [
        ClientUpdate("c1", 10, state(15.0, 0.0), activation_counts={GROUP: torch.tensor([2.0, 0.0])}),
        ClientUpdate("c2", 10, state(-12.0, 9.0), activation_counts={GROUP: torch.tensor([1.0, 0.0])}),
    ]
    result = build_aggregator("fcmoe", retention_mode="filtered").aggregate(old, updates)
    torch.testing.assert_close(result.global_state[X][0], torch.tensor([3.0]))
    torch.testing.assert_close(result.global_state[Y][0], torch.tensor([3.0]))
    torch.testing.assert_close(result.residuals["c2"][GROUP], torch.tensor([-0.75, 0.0], dtype=torch.float64))
    torch.testing.assert_close(result.residuals["c1"][GROUP], torch.tensor([0.0, 0.0], dtype=torch.float64))
    # The client computes the same coefficients from the two global states and its own update.
    client = retention_coefficients(updates[1].deltas, result.global_state, mode="filtered", previous_global=old)
    torch.testing.assert_close(client[GROUP], result.residuals["c2"][GROUP])
    # Personalized state of client 2: (3, 3) + 0.5 (-6, -3) = (0, 1.5).
    personal = result.personalized_state("c2")
    torch.testing.assert_close(personal[X][0], torch.tensor([0.0]))
    torch.testing.assert_close(personal[Y][0], torch.tensor([1.5]))


def test_server_and_client_coefficients_agree_on_random_round():
    torch.manual_seed(0)
    group = "base_model.model.model.layers.1.self_attn.q_proj"
    keys = [f"{group}.moe_lora_A", f"{group}.moe_lora_B"]
    theta = {keys[0]: torch.randn(4, 2, 6), keys[1]: torch.randn(4, 5, 2), f"{group}.moe_lora_router": torch.randn(4, 6)}
    updates = [
        ClientUpdate(f"c{i}", 5 + i, {k: torch.randn_like(v) for k, v in theta.items()}, activation_counts={group: torch.randint(0, 10, (4,)).float()})
        for i in range(4)
    ]
    result = build_aggregator("fcmoe").aggregate(theta, updates)
    for u in updates:
        client = retention_coefficients(u.deltas, result.global_state)
        assert torch.equal(client[group], result.residuals[u.client_id][group])
        # The trainer's start point and the server's personalized adapter coincide exactly.
        start = retained_start(result.global_state, u.deltas, lam=0.5)
        personal = result.personalized_state(u.client_id)
        for key in theta:
            assert torch.equal(start[key], personal[key])


def test_apply_retention_checks_its_inputs():
    theta = state(3.0, 3.0)
    with pytest.raises(ValueError, match="previous_global"):
        apply_retention(theta, {GROUP: torch.zeros(2)}, 0.5, mode="filtered")
    with pytest.raises(ValueError, match="retention mode"):
        apply_retention(theta, {GROUP: torch.zeros(2)}, 0.5, mode="other")
    with pytest.raises(KeyError, match="unknown|does not have"):
        apply_retention(theta, {"model.layers.9.mlp.experts": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        apply_retention(theta, {GROUP: torch.zeros(3)}, 0.5)
    with pytest.raises(KeyError, match="lacks"):
        retention_coefficients({X: torch.zeros(2, 1)}, theta)
