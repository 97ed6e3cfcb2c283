"""FC-MoE and the baselines behind one interface: hand-computed rounds, ablations, state, streaming from disk."""

import copy
import math

import pytest
import torch
from transformers import HfArgumentParser

from fcmoe_hf.federated import (
    AggregationResult,
    ClientUpdate,
    FCMoEAggregator,
    FCMoEConfig,
    FedAdamAggregator,
    FedAvgAggregator,
    FedProxConfig,
    aggregator_config_class,
    available_aggregators,
    build_aggregator,
)
from fcmoe_hf.federated.aggregators import AGGREGATORS
from fcmoe_hf.federated.functional.retention import retention_residual

GROUP = "model.layers.0.mlp.experts"
X, Y, GATE = f"{GROUP}.gate_up_proj", f"{GROUP}.down_proj", "model.layers.0.mlp.gate.weight"


def state(e0, e1=(0.0, 0.0), gate=(0.0, 0.0)):
    """Two experts whose vectors (x, y) are split over two tensors of one group, plus a shared router."""
    return {X: torch.tensor([[e0[0]], [e1[0]]]), Y: torch.tensor([[e0[1]], [e1[1]]]), GATE: torch.tensor(list(gate))}


def update(cid, n, e0, e1=(0.0, 0.0), gate=(0.0, 0.0), counts=(1.0, 1.0), mean_gate=None):
    return ClientUpdate(
        cid,
        n,
        state(e0, e1, gate),
        activation_counts={GROUP: torch.tensor(counts)},
        mean_gate={} if mean_gate is None else {GROUP: torch.tensor(mean_gate)},
    )


def expert(result, k):
    return torch.tensor([result.global_state[X][k, 0].item(), result.global_state[Y][k, 0].item()])


# ------------------------------------------------------------------------------------------------ FC-MoE, Eq. 1-6


def hand_round():
    # Theta_old: expert 0 = (-5, -1), expert 1 = (1, 2); router (0, 0).
    # Client 1: |D| = 30, Delta = (15, 0) on expert 0, (7, 7) on expert 1, router (1, -1); f = (2, 0)
    # Client 2: |D| = 10, Delta = (-12, 9) on expert 0, (3, 3) on expert 1, router (-3, 5); f = (1, 0)
    # Client 3: |D| = 20, Delta = (100, 100) on expert 0, (0, 0) on expert 1, router (0, 0); f = (0, 0)
    old = state((-5.0, -1.0), (1.0, 2.0))
    updates = [
        update("c1", 30, (15.0, 0.0), (7.0, 7.0), gate=(1.0, -1.0), counts=(2.0, 0.0)),
        update("c2", 10, (-12.0, 9.0), (3.0, 3.0), gate=(-3.0, 5.0), counts=(1.0, 0.0)),
        update("c3", 20, (100.0, 100.0), counts=(0.0, 0.0)),
    ]
    return old, updates


def test_fcmoe_eq1_to_eq6_hand_computed():
    old, updates = hand_round()
    result = FCMoEAggregator().aggregate(old, updates)
    # Eq. 2: c = f ||Delta||: expert 0: (2*15, 1*15, 0*sqrt(20000)) = (30, 15, 0). Eq. 3: w = (2/3, 1/3, 0),
    #   g = 2/3 (15, 0) + 1/3 (-12, 9) = (6, 3). Client 3 never activated expert 0: weight 0, its huge update ignored.
    torch.testing.assert_close(result.expert_weights[GROUP][:, 0], torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    # Eq. 4: <Delta_2, g> = -45 < 0, ||g||^2 = 45 -> a_2 = -1, Delta_2' = (-6, 12).
    # Eq. 5: Theta_0 = (-5, -1) + 2/3 (15, 0) + 1/3 (-6, 12) = (-5, -1) + (8, 4) = (3, 3).
    torch.testing.assert_close(expert(result, 0), torch.tensor([3.0, 3.0]))
    # Expert 1: every f is 0 -> left unchanged although clients moved it.
    assert torch.equal(expert(result, 1), torch.tensor([1.0, 2.0]))
    # Router (shared): FedAvg by |D| = (1/2, 1/6, 1/3): (1/2 - 1/2 + 0, -1/2 + 5/6 + 0) = (0, 1/3).
    torch.testing.assert_close(result.global_state[GATE], torch.tensor([0.0, 1 / 3]))
    # Eq. 5 (retention), Theta_0 = (3, 3), ||Theta_0||^2 = 18: client 1: <(15, 0), (3, 3)>/18 = 2.5;
    #   client 2: <(-12, 9), (3, 3)>/18 = -0.5; client 3: <(100, 100), (3, 3)>/18 = 100/3.
    #   Expert 1, Theta = (1, 2), ||.||^2 = 5: client 1: 21/5, client 2: 9/5, client 3: 0.
    # (Computed on the float32 Theta_new, hence the float32 tolerance.)
    f32 = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(result.residuals["c1"][GROUP], torch.tensor([2.5, 4.2], dtype=torch.float64), **f32)
    torch.testing.assert_close(result.residuals["c2"][GROUP], torch.tensor([-0.5, 1.8], dtype=torch.float64), **f32)
    torch.testing.assert_close(result.residuals["c3"][GROUP], torch.tensor([100 / 3, 0.0], dtype=torch.float64), **f32)
    assert list(result.residuals) == ["c1", "c2", "c3"]
    # Eq. 6: personalized = Theta + 0.5 R: client 2, expert 0: (3, 3) + 0.5 * -0.5 (3, 3) = (2.25, 2.25).
    personal = result.personalized_state("c2")
    torch.testing.assert_close(torch.tensor([personal[X][0, 0], personal[Y][0, 0]]), torch.tensor([2.25, 2.25]))
    assert personal[GATE] is result.global_state[GATE]
    # Diagnostics: expert 0 has one conflicting client of two contributing; expert 1 had no contributor.
    diag = result.diagnostics[GROUP]
    assert diag.conflict[:, 0].tolist() == [False, True, False]
    assert diag.conflict_share[0].item() == 0.5 and math.isnan(diag.conflict_share[1].item())
    torch.testing.assert_close(diag.removed_norm[0], torch.tensor(math.sqrt(5), dtype=torch.float64))
    summary = result.summary()
    assert summary["num_clients"] == 3 and summary["conflict_share"] == 0.5 and summary["active_expert_share"] == 0.5


def test_personalized_state_is_global_plus_lambda_r_exactly():
    old, updates = hand_round()
    for lam in (0.5, 0.3):
        result = FCMoEAggregator(retention_lambda=lam).aggregate(old, updates)
        for cid in ("c1", "c2", "c3"):
            personal = result.personalized_state(cid)
            coef = result.residuals[cid][GROUP]
            for key in (X, Y):
                theta = result.global_state[key]
                assert torch.equal(personal[key], theta + lam * retention_residual(coef, theta))
            assert torch.equal(personal[GATE], result.global_state[GATE])
    with pytest.raises(KeyError, match="not merged"):
        result.personalized_state("nobody")


def test_opposite_updates_fedavg_cancels_fcmoe_keeps_consensus():
    old = state((0.0, 0.0))
    # Same data size, exactly opposite updates of expert 0; client a routed 3 tokens there, client b 1.
    updates = [
        update("a", 10, (1.0, 1.0), counts=(3.0, 0.0)),
        update("b", 10, (-1.0, -1.0), counts=(1.0, 0.0)),
    ]
    fedavg = FedAvgAggregator().aggregate(old, updates)
    assert torch.equal(expert(fedavg, 0), torch.tensor([0.0, 0.0]))  # (1, 1)/2 + (-1, -1)/2: cancelled
    result = FCMoEAggregator().aggregate(old, updates)
    # w = (3/4, 1/4), g = (1/2, 1/2); b conflicts: a_b = <(-1,-1), g>/||g||^2 = -2, Delta_b' = (0, 0).
    # Theta = 3/4 (1, 1) + 1/4 (0, 0) = (0.75, 0.75): the direction the consensus supports survives.
    torch.testing.assert_close(expert(result, 0), torch.tensor([0.75, 0.75]))
    diag = result.diagnostics[GROUP]
    assert diag.conflict[:, 0].tolist() == [False, True]
    assert diag.conflict_share[0].item() == 0.5
    torch.testing.assert_close(diag.mean_cosine[0], torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(diag.removed_norm[0], torch.tensor(math.sqrt(2) / 4, dtype=torch.float64))


def test_zero_activation_client_contributes_nothing():
    old = state((1.0, 1.0), (2.0, 2.0))
    base = [update("a", 10, (1.0, 2.0), (3.0, 4.0), counts=(5.0, 1.0))]
    lazy_client = update("z", 1000, (50.0, -70.0), (9.0, 9.0), counts=(0.0, 2.0))
    alone = FCMoEAggregator().aggregate(old, base)
    both = FCMoEAggregator().aggregate(old, base + [lazy_client])
    # Expert 0: z has f = 0, so the result equals the merge without z; expert 1 differs (z activated it).
    assert torch.equal(expert(both, 0), expert(alone, 0))
    assert not torch.equal(expert(both, 1), expert(alone, 1))
    assert both.expert_weights[GROUP][1, 0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ablations_off_is_fedavg_bit_for_bit(dtype):
    torch.manual_seed(0)
    group = "base_model.model.model.layers.0.self_attn.q_proj"
    theta = {f"{group}.moe_lora_A": torch.randn(4, 3, 8), f"{group}.moe_lora_B": torch.randn(4, 6, 3), f"{group}.moe_lora_router": torch.randn(4, 8)}
    updates = [
        ClientUpdate(
            f"c{i}", 7 + 3 * i, {k: torch.randn_like(v).to(dtype) for k, v in theta.items()}, activation_counts={group: torch.randint(0, 9, (4,)).float()}
        )
        for i in range(5)
    ]
    ablated = FCMoEAggregator(use_importance=False, use_projection=False, use_retention=False).aggregate(theta, updates)
    fedavg = FedAvgAggregator().aggregate(theta, updates)
    assert list(ablated.global_state) == list(theta)
    for key in theta:
        assert torch.equal(ablated.global_state[key], fedavg.global_state[key]), key
    # ... and it is FedAvg: Theta + sum_i |D_i|/sum|D| Delta_i (up to float32 rounding).
    sizes = torch.tensor([u.num_samples for u in updates], dtype=torch.float32)
    for key in theta:
        reference = theta[key] + sum(s / sizes.sum() * u.deltas[key].float() for s, u in zip(sizes, updates))
        torch.testing.assert_close(fedavg.global_state[key], reference)
    assert ablated.residuals == {} and ablated.retention_lambda == 0.0
    assert ablated.personalized_state("c0")[f"{group}.moe_lora_A"] is ablated.global_state[f"{group}.moe_lora_A"]


@pytest.mark.parametrize(
    "overrides",
    [{"use_projection": False}, {"use_retention": False}, {"use_importance": False}, {"projection_mode": "pairwise"}],
)
def test_each_ablation_alone_against_reference(overrides):
    # Same hand round; the reference applies the paper's rules with the switched part replaced.
    old, updates = hand_round()
    result = FCMoEAggregator(**overrides).aggregate(old, updates)
    if overrides.get("use_projection") is False:
        # No projection: Theta_0 = (-5, -1) + g = (1, 2).
        torch.testing.assert_close(expert(result, 0), torch.tensor([1.0, 2.0]))
        assert result.diagnostics == {}  # one read of each update: no dot products with the consensus
        assert set(result.residuals) == {"c1", "c2", "c3"}
    elif overrides.get("use_retention") is False:
        torch.testing.assert_close(expert(result, 0), torch.tensor([3.0, 3.0]))
        assert result.residuals == {}
        assert result.personalized_state("c2")[X] is result.global_state[X]
    elif overrides.get("use_importance") is False:
        # Data-size weights (1/2, 1/6, 1/3) on every expert, client 3 included:
        #   g = 1/2 (15, 0) + 1/6 (-12, 9) + 1/3 (100, 100) = (7.5 - 2 + 100/3, 1.5 + 100/3) = (38.8333, 34.8333)
        #   <Delta_2, g> = -466 + 313.5 < 0 -> client 2 projected; expert 1 now changes too.
        weights = torch.tensor([0.5, 1 / 6, 1 / 3], dtype=torch.float64)
        torch.testing.assert_close(result.expert_weights[GROUP][:, 0], weights)
        deltas = torch.tensor([[15.0, 0.0], [-12.0, 9.0], [100.0, 100.0]], dtype=torch.float64)
        g = weights @ deltas
        a2 = float(deltas[1] @ g) / float(g @ g)
        expected = torch.tensor([-5.0, -1.0], dtype=torch.float64) + (1 - weights[1] * a2) * g
        torch.testing.assert_close(expert(result, 0).double(), expected, rtol=1e-6, atol=1e-5)
        assert not torch.equal(expert(result, 1), torch.tensor([1.0, 2.0]))
    else:
        # Pairwise: c1 and c2 conflict (<(15,0),(-12,9)> = -180); c3 has weight 0 and takes no part.
        #   Delta_1' = (5.4, 7.2), Delta_2' = (0, 9): Theta_0 = (-5, -1) + 2/3 (5.4, 7.2) + 1/3 (0, 9) = (-1.4, 6.8)
        torch.testing.assert_close(expert(result, 0), torch.tensor([-1.4, 6.8]))
        assert result.diagnostics[GROUP].conflict[:, 0].tolist() == [True, True, False]


def test_fcmoe_config_validation_and_hf_argument_parser():
    with pytest.raises(ValueError, match="projection_mode"):
        FCMoEConfig(projection_mode="random")
    with pytest.raises(ValueError, match="filtered"):
        FCMoEConfig(retention_mode="filtered", projection_mode="pairwise")
    with pytest.raises(ValueError, match="nothing is removed"):
        FCMoEConfig(retention_mode="filtered", use_projection=False)
    FCMoEConfig(retention_mode="filtered", use_projection=False, use_retention=False)  # retention off: no conflict
    with pytest.raises(ValueError, match="min_clients"):
        FCMoEConfig(min_clients=0)
    with pytest.raises(ValueError, match="max_update_norm"):
        FCMoEConfig(max_update_norm=-1.0)
    (config,) = HfArgumentParser(FCMoEConfig).parse_args_into_dataclasses(
        ["--use_importance", "false", "--retention_mode", "filtered", "--retention_lambda", "0.25", "--max_update_norm", "10"]
    )
    assert config == FCMoEConfig(use_importance=False, retention_mode="filtered", retention_lambda=0.25, max_update_norm=10.0)
    with pytest.raises(SystemExit):
        HfArgumentParser(FCMoEConfig).parse_args_into_dataclasses(["--projection_mode", "random"])
    defaults = FCMoEConfig()
    assert (defaults.use_importance, defaults.use_projection, defaults.use_retention) == (True, True, True)
    assert (defaults.projection_mode, defaults.retention_mode, defaults.retention_lambda) == ("consensus", "projection", 0.5)


def test_registry():
    assert available_aggregators() == sorted(
        ["fcmoe", "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "ties", "fedmoe", "pfl_moe",
         "fedalign_moe", "fedmedian", "fedtrimmedavg"]
    )
    for name in available_aggregators():
        aggregator = build_aggregator(name)
        assert aggregator.name == name and isinstance(aggregator.config, aggregator_config_class(name))
        assert AGGREGATORS[name] is type(aggregator)
        for field_ in aggregator.config.__dataclass_fields__.values():
            assert field_.metadata.get("help"), (name, field_.name)
    assert build_aggregator("fedprox", proximal_mu=0.1).config == FedProxConfig(proximal_mu=0.1)
    assert build_aggregator("fcmoe", {"retention_lambda": 0.2}).config.retention_lambda == 0.2
    with pytest.raises(ValueError, match="Unknown aggregator 'fedsgd'.*fcmoe"):
        build_aggregator("fedsgd")
    with pytest.raises(TypeError, match="FCMoEConfig"):
        FCMoEAggregator(FedProxConfig())


# ---------------------------------------------------------------------------------------------------- baselines
# Two clients on a two-expert group with one parameter per expert (x only; y = 0) and a two-entry router:
#   Theta: experts (1, 2), router (0, 0)
#   A: |D| = 30, Delta experts (4, -2), router (1, -1), f = (3, 0), mean gate (0.9, 0.1)
#   B: |D| = 10, Delta experts (8, 6),  router (-3, 5), f = (1, 4), mean gate (0.2, 0.8)


def baseline_round():
    old = state((1.0, 0.0), (2.0, 0.0))
    updates = [
        update("A", 30, (4.0, 0.0), (-2.0, 0.0), gate=(1.0, -1.0), counts=(3.0, 0.0), mean_gate=(0.9, 0.1)),
        update("B", 10, (8.0, 0.0), (6.0, 0.0), gate=(-3.0, 5.0), counts=(1.0, 4.0), mean_gate=(0.2, 0.8)),
    ]
    return old, updates


def xs(result):
    return result.global_state[X][:, 0].tolist()


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "pfl_moe"])
def test_fedavg_family(name):
    # p = (3/4, 1/4): experts (1, 2) + (3 + 2, -1.5 + 1.5) = (6, 2); router (0.75 - 0.75, -0.75 + 1.25) = (0, 0.5).
    old, updates = baseline_round()
    result = build_aggregator(name).aggregate(old, updates)
    assert xs(result) == [6.0, 2.0]
    assert result.global_state[GATE].tolist() == [0.0, 0.5]
    assert result.residuals == {}
    assert result.personalized_state("A")[X] is result.global_state[X]  # personal parts stay on the clients


def test_fcmoe_baseline_round():
    # Expert 0: c = (3*4, 1*8) = (12, 8) -> w = (0.6, 0.4): 1 + 2.4 + 3.2 = 6.6 (no conflict).
    # Expert 1: c = (0, 4*6) -> only B: 2 + 6 = 8.
    old, updates = baseline_round()
    assert xs(build_aggregator("fcmoe").aggregate(old, updates)) == pytest.approx([6.6, 8.0])


def test_fedmoe_usage_threshold():
    # tau = 0.5 * 1/E = 0.25. Expert 0: A (0.9) in, B (0.2) out -> 1 + 4 = 5; expert 1: only B (0.8) -> 2 + 6 = 8.
    old, updates = baseline_round()
    result = build_aggregator("fedmoe").aggregate(old, updates)
    assert xs(result) == [5.0, 8.0]
    assert result.global_state[GATE].tolist() == [0.0, 0.5]  # router: FedAvg
    # Absolute tau = 0.1: both clients pass on expert 0 -> FedAvg weights (3/4, 1/4): 1 + 3 + 2 = 6;
    # expert 1: A's 0.1 passes too -> 2 - 1.5 + 1.5 = 2.
    assert xs(build_aggregator("fedmoe", usage_threshold=0.1, threshold_relative=False).aggregate(old, updates)) == [6.0, 2.0]
    # Without mean_gate the usage is the activation-count share: A (1, 0), B (0.2, 0.8) -> same as the first case.
    for u in updates:
        u.mean_gate = {}
    assert xs(build_aggregator("fedmoe").aggregate(old, updates)) == [5.0, 8.0]


def test_ties():
    old, updates = baseline_round()
    # density 1 (no trimming): expert 0: (4, 8) elect +, mean 6 -> 7; expert 1: (-2, 6) sum 4 -> +, only 6 -> 8;
    # router entry 0: (1, -3) -> -, only -3; entry 1: (-1, 5) -> +, only 5.
    result = build_aggregator("ties", density=1.0).aggregate(old, updates)
    assert xs(result) == [7.0, 8.0]
    assert result.global_state[GATE].tolist() == [-3.0, 5.0]
    # density 0.5: each client keeps the larger-magnitude expert entry: A (4, 0), B (8, 0) -> expert 0: 1 + 6 = 7,
    # expert 1: nothing left -> 2. scaling 0.5 halves the merged update: expert 0: 1 + 3 = 4.
    assert xs(build_aggregator("ties", density=0.5).aggregate(old, updates)) == [7.0, 2.0]
    assert xs(build_aggregator("ties", density=0.5, scaling=0.5).aggregate(old, updates)) == [4.0, 2.0]


def test_fedavgm_two_rounds():
    # d = FedAvg step: experts (5, 0). Round 1: m = d -> (6, 2). Round 2 (same updates): m = 0.9 d + d = 1.9 d ->
    # (6 + 9.5, 2) = (15.5, 2).
    old, updates = baseline_round()
    aggregator = build_aggregator("fedavgm")
    first = aggregator.aggregate(old, updates)
    assert xs(first) == [6.0, 2.0]
    assert xs(aggregator.aggregate(first.global_state, updates)) == pytest.approx([15.5, 2.0])


def _fedadam_eta(t, eta=0.1, beta_1=0.9, beta_2=0.99):
    """Flower's FedAdam step size in round t (1-based)."""
    return eta * math.sqrt(1 - beta_2 ** (t + 1)) / (1 - beta_1 ** (t + 1))


@pytest.mark.parametrize(
    "name, expected",
    [
        # d = 5 on expert 0, 0 on expert 1. FedAdam (eta 0.1, beta1 0.9, beta2 0.99, tau 1e-3, Flower's bias
        # correction eta_1 = eta sqrt(1 - beta2^2) / (1 - beta1^2)): m = 0.5, v = 0.01 * 25 = 0.25,
        # step = eta_1 * 0.5 / 0.501; expert 1: m = v = 0 -> 2.
        ("fedadam", [1.0 + _fedadam_eta(1) * 0.5 / 0.501, 2.0]),
        # FedYogi (eta 0.01, tau 1e-3): v = 0 - 0.01 * 25 * sign(0 - 25) = 0.25, step = 0.01 * 0.5 / 0.501.
        ("fedyogi", [1.0 + 0.01 * 0.5 / 0.501, 2.0]),
        # FedAdagrad (eta 0.1, beta1 0, tau 1e-3): m = 5, v = 25, step = 0.1 * 5 / 5.001.
        ("fedadagrad", [1.0 + 0.1 * 5 / 5.001, 2.0]),
    ],
)
def test_adaptive_server_optimizers_first_round(name, expected):
    old, updates = baseline_round()
    assert xs(build_aggregator(name).aggregate(old, updates)) == pytest.approx(expected, rel=1e-6)


def test_server_optimizer_state_round_trips():
    old, updates = baseline_round()
    first = FedAdamAggregator()
    state1 = first.aggregate(old, updates).global_state
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    assert saved["step"].item() == 1 and {k.split("/")[0] for k in saved if k != "step"} == {"m", "v"}
    resumed = FedAdamAggregator()
    resumed.load_state_dict(saved)
    a = first.aggregate(state1, updates)
    b = resumed.aggregate(state1, updates)
    for key in old:
        assert torch.equal(a.global_state[key], b.global_state[key])
    # Round 2 by hand: m = 0.9 * 0.5 + 0.1 * 5 = 0.95, v = 0.99 * 0.25 + 0.01 * 25 = 0.4975,
    # expert 0: (round 1's value) + eta_2 * 0.95 / (sqrt(0.4975) + 1e-3).
    first_value = 1.0 + _fedadam_eta(1) * 0.5 / 0.501
    assert xs(b)[0] == pytest.approx(first_value + _fedadam_eta(2) * 0.95 / (math.sqrt(0.4975) + 1e-3), rel=1e-6)
    assert torch.equal(first.state_dict()["m/" + X], resumed.state_dict()["m/" + X])
    # A fresh aggregator differs: the state matters.
    assert xs(FedAdamAggregator().aggregate(state1, updates)) != xs(b)
    with pytest.raises(ValueError, match="Unexpected key"):
        FedAdamAggregator().load_state_dict({"step": torch.tensor(1), "w/x": torch.zeros(1)})
    with pytest.raises(ValueError, match="keeps no server state"):
        FedAvgAggregator().load_state_dict({"step": torch.tensor(1)})
    assert FCMoEAggregator().state_dict() == {}
    # A state for other tensors is refused rather than silently mixed in.
    other = FedAdamAggregator()
    other.load_state_dict({"step": torch.tensor(1), "m/other": torch.zeros(1), "v/other": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not match"):
        other.aggregate(old, updates)


# -------------------------------------------------------------------------------------------- inputs, streaming


def random_round(k=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for layer in range(2):
        for module in ("self_attn.q_proj", "mlp.down_proj"):
            layers.append(f"base_model.model.model.layers.{layer}.{module}")
    theta = {}
    for group in layers:
        theta[f"{group}.moe_lora_A"] = torch.randn(4, 2, 6, generator=gen)
        theta[f"{group}.moe_lora_B"] = torch.randn(4, 5, 2, generator=gen)
        theta[f"{group}.moe_lora_router"] = torch.randn(4, 6, generator=gen)
    updates = []
    for i in range(k):
        deltas = {key: (torch.randn(v.shape, generator=gen) * 0.1).to(dtype) for key, v in theta.items()}
        counts = {g: torch.randint(0, 4, (4,), generator=gen).double() for g in layers}
        gates = {g: torch.rand(4, generator=gen) for g in layers}
        updates.append(ClientUpdate(f"client{i}", 5 + i, deltas, activation_counts=counts, mean_gate=gates))
    return theta, updates


ALL_CONFIGS = [(name, {}) for name in sorted(AGGREGATORS)] + [
    ("fcmoe", {"projection_mode": "pairwise"}),
    ("fcmoe", {"retention_mode": "filtered"}),
    ("fcmoe", {"clip_update_norm": 1.0}),
    ("fcmoe", {"merge_buffer_mb": 0}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, overrides", ALL_CONFIGS)
def test_inputs_never_mutated(name, overrides, dtype):
    theta, updates = random_round(dtype=dtype)
    theta_copy = copy.deepcopy(theta)
    updates_copy = copy.deepcopy(updates)
    aggregator = build_aggregator(name, **overrides)
    for _ in range(2):  # twice: server state must not alias the inputs either
        result = aggregator.aggregate(theta, updates)
    for key in theta:
        assert torch.equal(theta[key], theta_copy[key])
        assert result.global_state[key] is not theta[key]
    for u, c in zip(updates, updates_copy):
        assert all(torch.equal(u.deltas[k], c.deltas[k]) for k in c.deltas)
        assert all(torch.equal(u.activation_counts[g], c.activation_counts[g]) for g in c.activation_counts)


@pytest.mark.parametrize("name, overrides", ALL_CONFIGS)
def test_streaming_from_saved_updates_equals_in_memory(name, overrides, tmp_path):
    from safetensors.torch import save_file

    from fcmoe_hf.federated.io import LazySafetensors

    theta, updates = random_round(dtype=torch.bfloat16)
    save_file(theta, str(tmp_path / "adapter_model.safetensors"))
    lazy_theta = LazySafetensors(tmp_path / "adapter_model.safetensors")
    loaded = [ClientUpdate.load(u.save(tmp_path / u.client_id)) for u in updates]
    assert isinstance(loaded[0].deltas, LazySafetensors)
    in_memory = build_aggregator(name, **overrides).aggregate(theta, updates)
    streamed = build_aggregator(name, **overrides).aggregate(lazy_theta, loaded)
    assert set(streamed.global_state) == set(theta)
    for key in theta:
        assert torch.equal(in_memory.global_state[key], streamed.global_state[key]), key
    for cid, groups in in_memory.residuals.items():
        for group, coef in groups.items():
            assert torch.equal(coef, streamed.residuals[cid][group])


def test_result_residuals_flatten_for_checkpoints():
    theta, updates = random_round()
    result = FCMoEAggregator().aggregate(theta, updates)
    flat = result.residual_tensors()
    assert len(flat) == len(updates) * 4 and all(v.shape == (4,) for v in flat.values())
    restored = AggregationResult.residuals_from_tensors(flat)
    assert restored.keys() == result.residuals.keys()
    for cid in restored:
        assert all(torch.equal(restored[cid][g], result.residuals[cid][g]) for g in restored[cid])
    with pytest.raises(ValueError, match="client_id"):
        AggregationResult.residuals_from_tensors({"nogroup": torch.zeros(1)})


def test_merge_buffer_size_changes_nothing_but_reads():
    """Chunked one-read merges agree bit for bit whatever the chunk; the two-read fallback agrees to rounding."""
    theta, updates = random_round(k=6, dtype=torch.bfloat16)
    # One expert of one client: A (2x6) + B (5x2) = 22 floats; a whole group of one client: 4 experts.
    expert_bytes = 22 * 4
    chunked = {
        experts: FCMoEAggregator(merge_buffer_mb=6 * experts * expert_bytes / 2**20).aggregate(theta, updates)
        for experts in (1, 3, 4)  # 3: chunks of 3 and 1 expert
    }
    two_reads = {
        cached: FCMoEAggregator(merge_buffer_mb=cached * 4 * expert_bytes / 2**20).aggregate(theta, updates)
        for cached in (0, 1)  # the fallback (one expert of every client does not fit), keeping 0 or 1 client's group
    }
    reference = chunked[4]
    for key in theta:
        for result in chunked.values():
            assert torch.equal(result.global_state[key], reference.global_state[key]), key
        assert torch.equal(two_reads[1].global_state[key], two_reads[0].global_state[key]), key
        torch.testing.assert_close(two_reads[0].global_state[key], reference.global_state[key], rtol=1e-6, atol=1e-7)
    for group, diag in reference.diagnostics.items():
        assert torch.equal(chunked[1].diagnostics[group].conflict, diag.conflict)
        torch.testing.assert_close(two_reads[0].diagnostics[group].weights, diag.weights)
        torch.testing.assert_close(two_reads[0].diagnostics[group].cosine, diag.cosine, equal_nan=True)
    for cid in reference.residuals:
        for g, c in reference.residuals[cid].items():
            assert torch.equal(chunked[1].residuals[cid][g], c)
            torch.testing.assert_close(two_reads[0].residuals[cid][g], c)


def test_update_stream_cache_respects_its_budget():
    from fcmoe_hf.federated.io.stream import UpdateStream

    _, updates = random_round(k=3)
    stream = UpdateStream(updates, cache_bytes=100)
    assert stream.keep(0, [torch.zeros(20)])  # 80 bytes: kept
    assert not stream.keep(1, [torch.zeros(20)])  # would make 160: not kept
    assert list(stream._cache) == [0] and stream._cached_bytes == 80
    key = next(iter(updates[0].deltas))
    served = dict(stream.clients([0, 1], [key], torch.device("cpu"), expert_rows=True))
    assert torch.equal(served[0][0], torch.zeros(20)) and served[1][0].shape == (4, updates[1].deltas[key][0].numel())
    assert stream._cache == {} and stream._cached_bytes == 0


def test_update_stream_recycles_only_its_own_buffers():
    from fcmoe_hf.federated.io.stream import UpdateStream

    _, updates = random_round(k=2)
    half = [ClientUpdate(u.client_id, u.num_samples, {k: v.bfloat16() for k, v in u.deltas.items()}) for u in updates]
    key = next(iter(updates[0].deltas))
    cpu = torch.device("cpu")
    stream = UpdateStream(updates + half)
    (own,) = stream.read(0, [key], cpu, expert_rows=True)  # float32 already: the caller's tensor, not a copy
    assert own.data_ptr() == updates[0].deltas[key].data_ptr()
    stream.release([own])
    assert stream._free == {}  # never recycled: it is not the stream's
    (converted,) = stream.read(2, [key], cpu, expert_rows=True)
    assert converted.dtype == torch.float32 and converted.data_ptr() != half[0].deltas[key].data_ptr()
    stream.release([converted])
    (again,) = stream.read(3, [key], cpu, expert_rows=True)
    assert again is converted  # the buffer is reused for the next conversion of the same shape
    torch.testing.assert_close(again, half[1].deltas[key].float().reshape(again.shape))


def test_lazy_safetensors_row_reads(tmp_path):
    import pickle

    from safetensors.torch import save_file

    from fcmoe_hf.federated.io import LazySafetensors

    tensors = {"a": torch.arange(24, dtype=torch.float32).view(4, 3, 2), "b": torch.arange(6).bfloat16().view(3, 2)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    lazy = LazySafetensors(path)
    assert torch.equal(lazy["a"], tensors["a"]) and torch.equal(lazy["b"], tensors["b"])
    assert torch.equal(lazy.read_rows("a", 1, 3), tensors["a"][1:3])
    buffer = torch.empty(1, 2, dtype=torch.bfloat16)
    assert lazy.read_rows("b", 2, 3, out=buffer).data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, tensors["b"][2:3])
    with pytest.raises(IndexError, match="out of range"):
        lazy.read_rows("a", 3, 5)
    with pytest.raises(ValueError, match="out"):
        lazy.read_rows("a", 0, 1, out=torch.empty(5))
    copy_ = pickle.loads(pickle.dumps(lazy))  # descriptors do not travel; the copy reopens the file
    assert copy_._fd is None and torch.equal(copy_.read_rows("a", 0, 1), tensors["a"][:1])
    lazy.close()
    save_file({"a": torch.zeros(2)}, str(path))  # replaced on disk after its header was read
    with pytest.raises(ValueError, match="changed on disk"):
        lazy["a"]


def test_fcmoe_reads_each_saved_update_once(tmp_path, monkeypatch):
    """The consensus merge reads every byte of every update once (a fixed buffer of expert chunks), not twice."""
    from safetensors.torch import save_file

    from fcmoe_hf.federated.io import LazySafetensors

    theta, updates = random_round(k=5, dtype=torch.bfloat16)
    save_file(theta, str(tmp_path / "adapter_model.safetensors"))
    loaded = [ClientUpdate.load(u.save(tmp_path / u.client_id)) for u in updates]
    read = {}
    original = LazySafetensors._read_into

    def counting(self, offset, view, key):
        read[self.path] = read.get(self.path, 0) + len(view)
        return original(self, offset, view, key)

    monkeypatch.setattr(LazySafetensors, "_read_into", counting)
    # one expert of every client fits, the whole group does not: chunks of 2 and 2 experts
    expert_bytes = 22 * 4
    result = FCMoEAggregator(merge_buffer_mb=5 * 2 * expert_bytes / 2**20, use_retention=False).aggregate(
        LazySafetensors(tmp_path / "adapter_model.safetensors"), loaded
    )
    update_bytes = sum(t.numel() * t.element_size() for t in updates[0].deltas.values())
    for u in loaded:
        assert read[u.deltas.path] == update_bytes
    reference = FCMoEAggregator(use_retention=False).aggregate(theta, updates)
    for key in theta:
        assert torch.equal(result.global_state[key], reference.global_state[key])


def test_lazy_safetensors_without_offsets_reads_through_safetensors(tmp_path, monkeypatch):
    """Hosts where the header offsets are not used (big-endian) read rows through safetensors' own loader."""
    from safetensors.torch import save_file

    from fcmoe_hf.federated.io import LazySafetensors

    tensors = {"a": torch.arange(12, dtype=torch.float32).view(3, 4).bfloat16()}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    lazy = LazySafetensors(tmp_path / "t.safetensors")
    monkeypatch.setattr(lazy, "_offsets", {})
    assert torch.equal(lazy.read_rows("a", 1, 3), tensors["a"][1:3])
    out = torch.empty(2, 4, dtype=torch.bfloat16)
    lazy.readinto_rows("a", 1, 3, memoryview(out.view(torch.uint8).reshape(-1).numpy()))
    assert torch.equal(out, tensors["a"][1:3])


def test_merge_closes_descriptors_and_stays_within_the_budget(tmp_path, monkeypatch):
    """A merge of lazily read updates leaves no descriptor open, and never keeps more than the process budget."""
    from safetensors.torch import save_file

    from fcmoe_hf.federated.io import LazySafetensors
    from fcmoe_hf.federated.io import safetensors as updates_module

    theta, updates = random_round(k=6, dtype=torch.bfloat16)
    save_file(theta, str(tmp_path / "adapter_model.safetensors"))
    loaded = [ClientUpdate.load(u.save(tmp_path / u.client_id)) for u in updates]
    monkeypatch.setattr(updates_module._DESCRIPTORS, "limit", 3)  # fewer than the 7 files of the merge
    kept = []
    original = LazySafetensors._read_into

    def watching(self, offset, view, key):
        original(self, offset, view, key)
        kept.append(updates_module._DESCRIPTORS.held)

    monkeypatch.setattr(LazySafetensors, "_read_into", watching)
    result = FCMoEAggregator().aggregate(LazySafetensors(tmp_path / "adapter_model.safetensors"), loaded)
    assert max(kept) == 3 and updates_module._DESCRIPTORS.held == 0
    assert all(u.deltas._fd is None for u in loaded)
    reference = FCMoEAggregator().aggregate(theta, updates)
    for key in theta:
        assert torch.equal(result.global_state[key], reference.global_state[key])
    result.residuals[loaded[0].client_id]  # computed on demand: reads the update again, then closes it
    assert loaded[0].deltas._fd is None and updates_module._DESCRIPTORS.held == 0


def test_one_aggregator_shared_between_threads():
    """Merge buffers are per call: concurrent merges on one aggregator give the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    rounds = [random_round(k=4, dtype=torch.bfloat16, seed=s) for s in range(4)]
    aggregator = FCMoEAggregator()
    expected = [aggregator.aggregate(theta, ups).global_state for theta, ups in rounds]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: aggregator.aggregate(*r).global_state, rounds * 3))
    for i, got in enumerate(results):
        for key, value in expected[i % 4].items():
            assert torch.equal(got[key], value), key
