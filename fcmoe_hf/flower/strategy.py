"""`FCMoEStrategy`: any fcmoe_hf aggregator as a Flower Message-API strategy.

Flower's `FedAvg` samples the nodes and builds the messages; this subclass puts into every training message what the
aggregator asks of the clients ([`~fcmoe_hf.federated.Aggregator.configure_client`]: FedProx's proximal term,
FC-MoE's retention) and merges the replies with the aggregator (validation and rejections included) instead of
Flower's array mean. What the server knows of each client's past (the round of its last merged update and the scale
the server applied to it) travels in every message, so a client re-anchors its retained residual exactly as the
in-process [`~fcmoe_hf.simulation.FederatedSimulation`] does.

Identity: a reply is bound to the Flower node it came from (the SuperLink's node id, authenticated when the
federation runs with Flower's node authentication). A client's id is assigned where its node is provisioned (the
SuperNode's `--node-config "partition-id=<i>"`, or the simulation's partition mapping) and reaches the server with
the node's first reply; the server pins that node to that id for the rest of its run ([`FCMoEStrategy.node_clients`]).
A reply claiming an id pinned to another node, or a pinned node claiming another id, is rejected as spoofed; an id
outside the server's partition is rejected as unassigned. A pin is released when its node leaves the federation, so
a restarted SuperNode can take its id back. The merge is also bounded by what the server knows of each client
([`~fcmoe_hf.federated.UpdateBounds`]: partition sizes, activations per sample), see [`FCMoEStrategy.expect_clients`].
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..federated import AggregationResult, Aggregator, ClientUpdate, UpdateBounds, build_aggregator
from ..simulation.round_metrics import local_summary
from .config import TRANSPORT_DTYPES
from .records import NUM_EXAMPLES, arrays_to_state, content_to_update, state_to_arrays

logger = logging.getLogger(__name__)

#: Config keys of the fcmoe_hf protocol (besides the `ClientConfig` fields).
REPLY_KEY = "fcmoe.reply"
TRANSPORT_KEY = "fcmoe.transport-dtype"
MERGED_CLIENTS_KEY = "fcmoe.merged-clients"
MERGED_ROUNDS_KEY = "fcmoe.merged-rounds"
UPDATE_SCALES_KEY = "fcmoe.update-scales"
CLIENT_ID_KEY = "client-id"


class RoundFailedError(RuntimeError):
    """A round could not be merged: too few valid client updates arrived (the message says which failed and why)."""


class FCMoEStrategy(FedAvg):
    """A Flower strategy that merges with an fcmoe_hf aggregator.

    `configure_train` is Flower's `FedAvg.configure_train` (node sampling by `fraction_train` / `min_train_nodes`)
    with the aggregator's [`~fcmoe_hf.federated.ClientConfig`] and the clients' merge bookkeeping added to the config;
    `aggregate_train` decodes the replies into [`~fcmoe_hf.federated.ClientUpdate`]s and calls
    [`~fcmoe_hf.federated.Aggregator.aggregate`]. Replies that carry an error (a node that died, a client that
    raised) and nodes that did not reply are logged and left out; the merge goes on while at least the aggregator's
    `min_clients` valid updates remain, else [`RoundFailedError`] is raised and the global state is unchanged.

    Args:
        aggregator ([`~fcmoe_hf.federated.Aggregator`] or `str`): the merge, or a registered aggregator name.
        aggregator_config (`dict`, *optional*): config overrides when `aggregator` is a name.
        transport_dtype (`str`, *optional*, defaults to `"float32"`): dtype of the clients' deltas on the wire
            (`"bfloat16"` halves the upload).
        **kwargs: Flower `FedAvg` arguments (`fraction_train`, `min_train_nodes`, `min_available_nodes`, ...).

    Example:

    ```python
    >>> from fcmoe_hf.flower import FCMoEStrategy
    >>> strategy = FCMoEStrategy("fcmoe", min_train_nodes=2, fraction_evaluate=1.0)
    >>> result = strategy.start(grid, initial_arrays=state_to_arrays(global_state), num_rounds=3)
    ```
    """

    def __init__(
        self,
        aggregator: Union[Aggregator, str],
        aggregator_config: Optional[Mapping[str, Any]] = None,
        transport_dtype: str = "float32",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if isinstance(aggregator, str):
            aggregator = build_aggregator(aggregator, aggregator_config)
        elif aggregator_config:
            raise ValueError("aggregator_config is for an aggregator given by name; configure the Aggregator instance instead.")
        if transport_dtype not in TRANSPORT_DTYPES:
            raise ValueError(f"transport_dtype must be one of {TRANSPORT_DTYPES}, got {transport_dtype!r}.")
        self.aggregator = aggregator
        self.transport_dtype = transport_dtype
        #: Per client: the round of its last merged update, and the factor the server scaled it by.
        self.last_update_round: dict[str, int] = {}
        self.update_scales: dict[str, float] = {}
        #: The last round's merge, updates, failures and bytes on the wire.
        self.last_result: Optional[AggregationResult] = None
        self.last_updates: list[ClientUpdate] = []
        self.failures: list[dict[str, Any]] = []
        self._current_state: Optional[dict[str, torch.Tensor]] = None
        self._sent_nodes: list[int] = []
        #: Flower node id -> the client id it is pinned to (from its first reply; see the module docstring).
        self.node_clients: dict[int, str] = {}
        self._expected: Optional[dict[str, Optional[int]]] = None
        self._bounds_args: dict[str, Any] = {}

    def expect_clients(
        self,
        partition_sizes: Optional[Mapping[str, Optional[int]]] = None,
        *,
        max_length: Optional[int] = None,
        passes: float = 1.0,
        top_k: Optional[int] = None,
    ) -> None:
        """What the server knows of the clients, enforced on every merge ([`~fcmoe_hf.federated.UpdateBounds`]).

        Args:
            partition_sizes (`Mapping[str, Optional[int]]`, *optional*): every valid client id and its training
                partition's size (`None`: unknown). An id outside it is never pinned, and its updates are rejected.
                Without it any id may be pinned and sample counts are only statically checked.
            max_length (`int`, *optional*), passes (`float`), top_k (`int`, *optional*): tokens per sample, local
                passes over the data and experts per token, bounding the activation counts (unbounded without
                `max_length`).
        """
        self._expected = None if partition_sizes is None else dict(partition_sizes)
        self._bounds_args = {"max_length": max_length, "passes": passes, "top_k": top_k}

    def update_bounds(self, client_ids: Sequence[str]) -> UpdateBounds:
        """The round's [`~fcmoe_hf.federated.UpdateBounds`]: `client_ids` (the ids pinned to the replying nodes), their
        partition sizes when known, and the activation bound."""
        sizes = {cid: (self._expected or {}).get(cid) for cid in client_ids}
        return UpdateBounds.for_round(sizes, **self._bounds_args)

    def bind_updates(self, received: Sequence[tuple[int, ClientUpdate]]) -> dict[str, ClientUpdate]:
        """`{sender: update}` for [`~fcmoe_hf.federated.Aggregator.aggregate`]: each update keyed by the client id its
        node is pinned to, a node's first valid claim pinning it. An update claiming an id it does not hold is keyed by
        its sender (its pinned id, or `"node <id>"`) and so rejected as spoofed by the aggregator."""
        pinned = {cid: node for node, cid in self.node_clients.items()}
        out: dict[str, ClientUpdate] = {}
        for node_id, update in received:
            claimed = update.client_id
            known = self._expected is None or claimed in self._expected
            if node_id not in self.node_clients and isinstance(claimed, str) and claimed not in pinned and known:
                self.node_clients[node_id], pinned[claimed] = claimed, node_id
            sender = self.node_clients.get(node_id, claimed if not known and claimed not in pinned else f"node {node_id}")
            if sender in out:  # never two updates under one key: the later one is spoofed
                sender = f"node {node_id}"
            out[str(sender)] = update
        return out

    def summary(self) -> None:
        logger.info(f"FCMoEStrategy: {self.aggregator!r}, updates in {self.transport_dtype}")
        super().summary()

    # -- to the clients -----------------------------------------------------------------------------------------------

    def bookkeeping(self) -> dict[str, Any]:
        """What every message tells the clients about their past updates (round merged, scale applied)."""
        clients = sorted(self.last_update_round)
        return {
            MERGED_CLIENTS_KEY: clients,
            MERGED_ROUNDS_KEY: [int(self.last_update_round[c]) for c in clients],
            UPDATE_SCALES_KEY: [float(self.update_scales.get(c, 1.0)) for c in clients],
        }

    def _with_config(self, messages: Iterable[Message], extra: Mapping[str, Any]) -> list[Message]:
        out = []
        for message in messages:
            content = message.content
            config = ConfigRecord({**dict(content.config_records[self.configrecord_key]), **extra})
            record = RecordDict({self.arrayrecord_key: content.array_records[self.arrayrecord_key], self.configrecord_key: config})
            out.append(Message(content=record, message_type=message.metadata.message_type, dst_node_id=message.metadata.dst_node_id))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's sampling and messages, with the aggregator's client config and the merge bookkeeping."""
        self._current_state = arrays_to_state(arrays)
        online = set(grid.get_node_ids())
        for node_id in [n for n in self.node_clients if n not in online]:  # it left: its id may be taken again
            logger.info(f"Node {node_id} left the federation: {self.node_clients.pop(node_id)} may be claimed again.")
        extra = {
            **self.aggregator.configure_client(server_round).to_dict(), REPLY_KEY: "update",
            TRANSPORT_KEY: self.transport_dtype, **self.bookkeeping(),
        }
        messages = self._with_config(super().configure_train(server_round, arrays, config, grid), extra)
        self._sent_nodes = [m.metadata.dst_node_id for m in messages]
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Flower's evaluation messages, with the client config of the next round (the personalized adapter a
        client evaluates is the point it would start that round from) and the merge bookkeeping."""
        extra = {**self.aggregator.configure_client(server_round + 1).to_dict(), REPLY_KEY: "update", **self.bookkeeping()}
        return self._with_config(super().configure_evaluate(server_round, arrays, config, grid), extra)

    # -- from the clients ---------------------------------------------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Merge the valid replies with the aggregator; log and leave out the failed ones.

        Raises:
            [`RoundFailedError`]: when fewer than the aggregator's `min_clients` valid updates remain.
        """
        replies = list(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        failures = reply_failures(self._sent_nodes, replies)
        received = []
        for message in valid:
            try:
                received.append((message.metadata.src_node_id, content_to_update(message.content)))
            except (KeyError, ValueError, TypeError, OverflowError) as err:  # a malformed reply fails its node only
                failures.append({"node_id": message.metadata.src_node_id, "reason": f"malformed reply: {err}"})
        for failure in failures:
            logger.warning(f"Round {server_round}: node {failure['node_id']} failed ({failure['reason']}); left out of the merge.")
        self.failures = failures
        if self._current_state is None:
            raise RuntimeError("aggregate_train() before configure_train(): the global state of the round is unknown.")
        bound = self.bind_updates(received)  # each update under its node's pinned client id
        updates = list(bound.values())
        try:
            result = self.aggregator.aggregate(self._current_state, bound, self.update_bounds(sorted(set(self.node_clients.values()) & set(bound))))
        except ValueError as err:
            failed = "; ".join(f"node {f['node_id']}: {f['reason']}" for f in failures) or "none"
            raise RoundFailedError(
                f"Round {server_round} failed: {len(updates)} client update(s) arrived, {len(failures)} client(s) "
                f"failed ({failed}), and the aggregator needs min_clients={self.aggregator.config.min_clients}: {err}"
            ) from err
        for client_id in result.client_ids:
            self.last_update_round[client_id] = server_round
            self.update_scales[client_id] = float(result.update_scales.get(client_id, 1.0))
        self.last_result, self.last_updates = result, updates
        metrics = MetricRecord({k: float(v) for k, v in result.summary().items() if np.isfinite(v)})
        return state_to_arrays(result.global_state), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """Every client's local metrics (`<client_id>/local_<metric>`) and their mean, min and max over clients."""
        metrics = local_metrics(replies, self.node_clients)
        return MetricRecord(metrics) if metrics else None

    # -- checkpoints --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The aggregator's server state (momentum, moments), for checkpoints."""
        return self.aggregator.state_dict() or {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.aggregator.load_state_dict(state)


def reply_failures(sent_nodes: Iterable[int], replies: Iterable[Message]) -> list[dict[str, Any]]:
    """`{"node_id", "reason"}` of every node of `sent_nodes` whose reply is an error or that did not reply."""
    replies = list(replies)
    failures = [{"node_id": m.metadata.src_node_id, "reason": m.error.reason} for m in replies if m.has_error()]
    replied = {m.metadata.src_node_id for m in replies}
    return failures + [{"node_id": n, "reason": "no reply within the round timeout"} for n in sent_nodes if n not in replied]


def local_metrics(replies: Iterable[Message], node_clients: Optional[Mapping[int, str]] = None) -> dict[str, float]:
    """The clients' evaluation replies as the in-process run logs them: `<client_id>/local_<metric>` per client and
    `local_<metric>_mean` / `_min` / `_max` over the clients that replied (failed replies are logged and skipped). A
    node pinned to a client id (`node_clients`) is reported under that id, whatever its reply claims."""
    per_metric: dict[str, list[float]] = {}
    out: dict[str, float] = {}
    for message in replies:
        if message.has_error():
            logger.warning(f"Evaluation on node {message.metadata.src_node_id} failed: {message.error.reason}")
            continue
        client_id = (node_clients or {}).get(message.metadata.src_node_id)
        client_id = client_id or str(message.content.config_records["client"][CLIENT_ID_KEY])
        for key, value in message.content.metric_records["metrics"].items():
            if key == NUM_EXAMPLES:
                continue
            out[f"{client_id}/local_{key}"] = float(value)
            per_metric.setdefault(key, []).append(float(value))
    out.update(local_summary(per_metric))
    return out
