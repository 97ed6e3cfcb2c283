"""`FCMoEStrategy` and `FlowerServer` at unit level: a fake Flower `Grid`, hand-made replies (no Ray, no SuperLink).

Identity (a reply bound to the client id its node is pinned to: a spoofed one is rejected), the server-known bounds,
a round with fewer valid updates than `min_clients` failing clearly, the run-directory lock and the resume check.
"""

import pytest
import torch

pytest.importorskip("flwr")
from flwr.app import ConfigRecord, Error, Message  # noqa: E402

from fcmoe_hf.federated import ClientUpdate  # noqa: E402
from fcmoe_hf.flower import FCMoEStrategy, FlowerServer, RoundFailedError  # noqa: E402
from fcmoe_hf.flower.records import arrays_to_state, state_to_arrays, update_to_content  # noqa: E402
from fcmoe_hf.simulation.lock import RunDirectoryLocked, RunLock  # noqa: E402
from fcmoe_hf.trainer import get_federated_state  # noqa: E402

from .test_flower_components import tiny_components, tiny_config  # noqa: E402

GROUP = "base_model.model.layers.0.q_proj"
STATE = {
    f"{GROUP}.moe_lora_A": torch.zeros(4, 2, 6), f"{GROUP}.moe_lora_B": torch.zeros(4, 6, 2),
    "base_model.model.score.weight": torch.zeros(3, 6),
}


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    """The run, node and task ids Flower stamps on every message (set by the runtime these tests do without)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """The part of Flower's `Grid` a strategy's `configure_*` calls: the connected nodes."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None):  # every node fails
        return [Message(Error(code=0, reason="node died"), reply_to=m) for m in messages]


def update(client_id, num_samples=8, value=0.1, activations=16):
    deltas = {k: torch.full_like(v, value) for k, v in STATE.items()}
    return ClientUpdate(client_id, num_samples, deltas, activation_counts={GROUP: torch.tensor([activations, 0, 0, activations])})


def run_round(strategy, grid, server_round, claims):
    """Configure a round on `grid`; every node replies with `claims[node_id]` (an update, or an error string)."""
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, state_to_arrays(STATE), ConfigRecord(), grid)}
    replies = []
    for node_id, claim in claims.items():
        if isinstance(claim, str):
            replies.append(Message(Error(code=0, reason=claim), reply_to=messages[node_id]))
        else:
            replies.append(Message(content=update_to_content(claim), reply_to=messages[node_id]))
    return strategy.aggregate_train(server_round, replies)


def strategy(min_clients=1, sizes=None):
    s = FCMoEStrategy("fedavg", {"min_clients": min_clients}, min_train_nodes=1, min_available_nodes=1)
    if sizes is not None:
        s.expect_clients(sizes, max_length=8, passes=1.0, top_k=2)
    return s


def rejected(s):
    return {r.client_id: r.reason for r in s.last_result.rejected}


def test_a_reply_is_bound_to_the_client_id_its_node_is_pinned_to():
    s, grid = strategy(sizes={"client_0": 10, "client_1": 10}), FakeGrid([11, 12])
    run_round(s, grid, 1, {11: update("client_0"), 12: update("client_1")})
    assert s.node_clients == {11: "client_0", 12: "client_1"} and s.last_result.client_ids == ["client_0", "client_1"]

    # Round 2: node 12 claims client_0 (pinned to node 11), a new node 13 claims client_1 (pinned to node 12).
    grid.node_ids.append(13)
    arrays, _ = run_round(s, grid, 2, {11: update("client_0", value=0.2), 12: update("client_0"), 13: update("client_1")})
    assert s.last_result.client_ids == ["client_0"]
    reasons = rejected(s)
    assert "claims client_id 'client_0' but was received from 'client_1'" in reasons["client_1"]
    assert "claims client_id 'client_1' but was received from 'node 13'" in reasons["node 13"]
    # Only node 11's update (0.2 everywhere) is merged.
    assert all(torch.allclose(v, torch.full_like(v, 0.2)) for v in arrays_to_state(arrays).values())
    assert s.node_clients == {11: "client_0", 12: "client_1"}

    # A node that left the federation frees its id: a restarted SuperNode (new node id) takes it back.
    grid.node_ids = [11, 14]
    run_round(s, grid, 3, {11: update("client_0"), 14: update("client_1")})
    assert s.node_clients == {11: "client_0", 14: "client_1"} and s.last_result.client_ids == ["client_0", "client_1"]


def test_server_known_bounds_reject_unassigned_ids_and_cap_inflated_counts():
    s, grid = strategy(sizes={"client_0": 10, "client_1": 10}), FakeGrid([1, 2, 3, 4])
    run_round(s, grid, 1, {
        1: update("client_0"), 2: update("client_1", num_samples=11), 3: update("client_7"),
        4: update("client_0", activations=10**6),
    })
    reasons = rejected(s)
    assert s.last_result.client_ids == ["client_0", "client_1"]  # client_1's claim capped (bounds_action="cap")
    assert [(c.client_id, c.reason) for c in s.last_result.capped] == [
        ("client_1", "num_samples 11 capped to the assigned partition size 10")
    ]
    assert "'client_7' was not assigned" in reasons["client_7"]
    assert "but was received from 'node 4'" in reasons["node 4"]  # client_0 is node 1's
    assert s.node_clients == {1: "client_0", 2: "client_1"}  # an unknown id pins nothing


@pytest.mark.parametrize("num_examples", [float("inf"), 3.7, 12.0, 10**400, True, 0])
def test_a_malformed_num_examples_fails_its_node_not_the_round(num_examples):
    s, grid = strategy(sizes={"client_0": 10, "client_1": 10}), FakeGrid([1, 2])
    messages = {m.metadata.dst_node_id: m for m in s.configure_train(1, state_to_arrays(STATE), ConfigRecord(), grid)}
    bad = update_to_content(update("client_1"))
    metrics = bad.metric_records["metrics"]
    try:
        metrics["num-examples"] = num_examples
    except (TypeError, ValueError, OverflowError):
        pytest.skip(f"a MetricRecord cannot hold {num_examples!r}, so no reply can carry it")
    replies = [Message(content=update_to_content(update("client_0")), reply_to=messages[1]),
               Message(content=bad, reply_to=messages[2])]
    s.aggregate_train(1, replies)
    assert s.last_result.client_ids == ["client_0"]
    (failure,) = s.failures
    assert failure["node_id"] == 2 and "num-examples" in failure["reason"] and "client_1" in failure["reason"]


def test_a_round_with_fewer_valid_updates_than_min_clients_fails_clearly():
    s, grid = strategy(min_clients=2), FakeGrid([1, 2, 3])
    run_round(s, grid, 1, {1: update("client_0"), 2: update("client_1"), 3: update("client_2")})
    messages = {m.metadata.dst_node_id: m for m in s.configure_train(2, state_to_arrays(STATE), ConfigRecord(), grid)}
    replies = [Message(content=update_to_content(update("client_0")), reply_to=messages[1]),
               Message(Error(code=0, reason="ClientApp raised"), reply_to=messages[2])]  # node 3: no reply
    with pytest.raises(RoundFailedError) as raised:
        s.aggregate_train(2, replies)
    message = str(raised.value)
    assert "Round 2 failed" in message and "min_clients=2" in message
    assert "node 2: ClientApp raised" in message and "node 3: no reply within the round timeout" in message
    assert s.last_update_round == {"client_0": 1, "client_1": 1, "client_2": 1}  # nothing of round 2 recorded


def test_server_refuses_a_locked_run_dir_and_a_changed_config_on_resume_and_stops_on_a_failed_round(tmp_path):
    config = tiny_config(tmp_path / "run", "fcmoe", num_server_rounds=2)
    server = FlowerServer(config, tiny_components(config))
    # What the server knows of its clients: the partition it builds as they do, and the activation bound.
    sizes = server.partition_sizes()
    assert set(sizes) == {"client_0", "client_1"} and all(n > 0 for n in sizes.values())
    assert server.strategy.update_bounds(["client_0"]).clients["client_0"].max_num_samples == sizes["client_0"]

    with RunLock(server.run_dir):  # another run holds the directory
        with pytest.raises(RunDirectoryLocked, match="run.lock"):
            server.run(FakeGrid([]))
    assert not server.checkpoints.exists()

    server.checkpoint(1, get_federated_state(server.model))
    changed = tiny_config(tmp_path / "run", "fcmoe", num_server_rounds=2, resume=True, learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"learning_rate: 0\.005 -> 0\.001"):
        FlowerServer(changed, tiny_components(changed)).resume()
    allowed = tiny_config(tmp_path / "run", "fcmoe", num_server_rounds=2, resume=True, learning_rate=1e-3,
                          resume_allow_config_change=True)
    assert FlowerServer(allowed, tiny_components(allowed)).resume()[0] == 1

    # A round that fails (every node here) stops the run clearly; the rounds before it stay checkpointed.
    resumed = tiny_config(tmp_path / "run", "fcmoe", num_server_rounds=2, resume=True)
    with pytest.raises(RoundFailedError, match=r"Round 2 failed: 0 client update\(s\) arrived, 2 client\(s\) failed") as raised:
        FlowerServer(resumed, tiny_components(resumed)).run(FakeGrid([1, 2]))
    assert "node 1: node died" in str(raised.value) and "min_clients=1" in str(raised.value)
    assert (tmp_path / "run" / "latest_checkpoint").read_text() == "round_0001"
