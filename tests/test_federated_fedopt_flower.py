"""Server optimizers against Flower's own strategies: the same updates give the same global state.

Flower's `FedAdam`, `FedYogi`, `FedAdagrad` and `FedAvgM` (`flwr.serverapp.strategy`) are run on the FedAvg means
of the same client updates (their `FedAvg.aggregate_train`, which averages the clients' arrays, is replaced by the
same weighted mean), round after round, beside ours.
"""

import numpy as np
import pytest
import torch

from fcmoe_hf.federated import ClientUpdate, build_aggregator

strategy = pytest.importorskip("flwr.serverapp.strategy")
from flwr.app import Array, ArrayRecord  # noqa: E402
from flwr.serverapp.strategy import fedavg as flwr_fedavg  # noqa: E402

KEYS = ("base_model.model.layers.0.q_proj.moe_lora_A", "base_model.model.layers.0.q_proj.moe_lora_B", "base_model.model.score.weight")
SHAPES = ((4, 2, 6), (4, 6, 2), (3, 6))


def _round(global_state, round_index):
    g = torch.Generator().manual_seed(round_index)
    updates = []
    for i in range(3):
        deltas = {k: torch.randn(s, generator=g) * 0.05 * (i + 1) for k, s in zip(KEYS, SHAPES)}
        counts = {KEYS[0].rsplit(".", 1)[0]: torch.tensor([3, 0, 5, 1])}
        updates.append(ClientUpdate(f"c{i}", 10 * (i + 1), deltas, activation_counts=counts))
    sizes = np.array([u.num_samples for u in updates], dtype=np.float64)
    mean = {
        k: global_state[k].numpy() + sum(w * u.deltas[k].numpy() for w, u in zip(sizes / sizes.sum(), updates))
        for k in KEYS
    }
    return updates, {k: v.astype(np.float32) for k, v in mean.items()}


CASES = [
    ("fedadam", strategy.FedAdam, {}, {}),
    ("fedadam", strategy.FedAdam, {"server_learning_rate": 0.05, "beta_1": 0.8, "tau": 1e-2}, {"eta": 0.05, "beta_1": 0.8, "tau": 1e-2}),
    ("fedyogi", strategy.FedYogi, {}, {}),
    ("fedadagrad", strategy.FedAdagrad, {}, {}),
    ("fedavgm", strategy.FedAvgM, {"server_momentum": 0.9, "server_learning_rate": 0.7}, {"server_momentum": 0.9, "server_learning_rate": 0.7}),
]


@pytest.mark.parametrize("name,flwr_class,ours,theirs", CASES)
def test_server_optimizers_match_flower_arithmetic(monkeypatch, name, flwr_class, ours, theirs):
    aggregator = build_aggregator(name, **ours)
    flower = flwr_class(**theirs)
    g = torch.Generator().manual_seed(99)
    global_state = {k: torch.randn(s, generator=g) for k, s in zip(KEYS, SHAPES)}
    for server_round in (1, 2, 3):
        updates, mean = _round(global_state, server_round)
        monkeypatch.setattr(
            flwr_fedavg.FedAvg, "aggregate_train",
            lambda self, rnd, replies, mean=mean: (ArrayRecord({k: Array(v) for k, v in mean.items()}), None),
        )
        current = {k: v.numpy().copy() for k, v in global_state.items()}
        # What their configure_train records as the current arrays.
        flower.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()}) if name == "fedavgm" else current
        arrays, _ = flower.aggregate_train(server_round, [])
        expected = {k: a.numpy() for k, a in arrays.items()}
        result = aggregator.aggregate(global_state, updates)
        for k in KEYS:
            np.testing.assert_allclose(result.global_state[k].numpy(), expected[k], rtol=2e-5, atol=1e-6, err_msg=f"{name} round {server_round} {k}")
        global_state = {k: torch.from_numpy(np.asarray(expected[k], dtype=np.float32)) for k in KEYS}


def test_fedadam_defaults_are_flowers():
    config = build_aggregator("fedadam").config
    flower = strategy.FedAdam()
    assert (config.server_learning_rate, config.beta_1, config.beta_2, config.tau) == (flower.eta, flower.beta_1, flower.beta_2, flower.tau)
