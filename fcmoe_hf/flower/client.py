"""The client side of a Flower run: local training with `FederatedMoETrainer` on the node's own partition.

A training message carries the global state and the round's [`~fcmoe_hf.federated.ClientConfig`]; the client starts
from the global state plus its retained residual (FC-MoE's local knowledge retention, computed by
[`~fcmoe_hf.trainer.FederatedMoETrainer.start_round`]), trains one round, and replies with its
[`~fcmoe_hf.federated.ClientUpdate`] (deltas and activation counts, never data). An evaluation message has it score
its personalized adapter (the global state plus lambda x its residual) on its local test split; after the last round
it writes that adapter to `<client_output_dir>/<client_id>/adapter` and, with `push_to_hub`, pushes it (private).

What a client remembers between rounds (its last merged update, the one awaiting the server's verdict, and for the
`"filtered"` residual the global states they started from) lives in Flower's per-node `context.state`, mirrored to
`<client_output_dir>/<client_id>/flower_state/` (safetensors + JSON) so that a resumed run continues where it stopped.
It never leaves the node.

With one of Flower's own strategies (`aggregator="flwr:<name>"`) the client follows Flower's convention instead: it
replies with its trained arrays (`"arrays"`) and `num-examples`, and reads FedProx's `proximal-mu` from the config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file
from transformers.trainer_callback import PrinterCallback

from ..federated import ClientConfig, ClientUpdate, retained_start
from ..simulation.round_metrics import first_rows
from ..trainer import FederatedMoETrainer, FederatedMoETrainingArguments, get_federated_state, set_federated_state
from .components import ComponentsBuilder, FederationComponents, resolve_builder
from .config import FlowerRunConfig
from .records import (
    NUM_EXAMPLES,
    arrays_to_state,
    arrays_to_tensors,
    state_to_arrays,
    tensors_to_arrays,
    update_to_content,
)
from .strategy import CLIENT_ID_KEY, MERGED_CLIENTS_KEY, MERGED_ROUNDS_KEY, REPLY_KEY, TRANSPORT_KEY, UPDATE_SCALES_KEY

logger = logging.getLogger(__name__)

_CLIENT_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ClientConfig))
_MEMORY = "fcmoe.memory"
_SLOTS = ("last", "pending")


class ClientMemory:
    """A client's state between rounds, in `context.state` (mirrored to `directory` on disk).

    Two slots, `last` (its last update the server merged: the basis of its retained residual) and `pending` (the
    update it sent and whose verdict has not arrived), each the update's deltas, its round and, for the `"filtered"`
    residual, the global state it started from.
    """

    def __init__(self, context: Context, directory: Path, resume: bool):
        self.state = context.state
        self.directory = directory
        if _MEMORY not in self.state.config_records:
            self.state[_MEMORY] = ConfigRecord({"last-round": 0, "pending-round": 0, "scale": 1.0})
            if resume and (directory / "memory.json").is_file():
                self._load_disk()

    def _round(self, slot: str) -> int:
        return int(self.state.config_records[_MEMORY][f"{slot}-round"])

    def deltas(self, slot: str) -> Optional[dict[str, torch.Tensor]]:
        if not self._round(slot):
            return None
        return arrays_to_tensors(self.state.array_records[f"fcmoe.{slot}-deltas"])

    def start_global(self, slot: str) -> Optional[dict[str, torch.Tensor]]:
        key = f"fcmoe.{slot}-global"
        return arrays_to_tensors(self.state.array_records[key]) if self._round(slot) and key in self.state.array_records else None

    @property
    def scale(self) -> float:
        return float(self.state.config_records[_MEMORY]["scale"])

    def _set(self, slot: str, round_index: int, deltas=None, start_global=None) -> None:
        self.state.config_records[_MEMORY][f"{slot}-round"] = int(round_index)
        self.state[f"fcmoe.{slot}-deltas"] = tensors_to_arrays(deltas)
        self.state[f"fcmoe.{slot}-global"] = tensors_to_arrays(start_global)

    def set_pending(self, round_index: int, deltas, start_global=None) -> None:
        self._set("pending", round_index, deltas, start_global)
        self._save_disk()

    def settle(self, client_id: str, config: Mapping[str, Any]) -> None:
        """Apply the server's bookkeeping: the round of this client's last merged update and the scale applied."""
        clients = list(config.get(MERGED_CLIENTS_KEY, []))
        merged_round = int(config[MERGED_ROUNDS_KEY][clients.index(client_id)]) if client_id in clients else 0
        scale = float(config[UPDATE_SCALES_KEY][clients.index(client_id)]) if client_id in clients else 1.0
        last, pending = self._round("last"), self._round("pending")
        if merged_round and merged_round == pending:
            self._set("last", pending, self.deltas("pending"), self.start_global("pending"))
        elif merged_round != last:
            if merged_round:
                logger.warning(
                    f"{client_id}: the server merged its update of round {merged_round}, which this node no longer holds "
                    "(its state was lost): it restarts from the global state, without a retained residual."
                )
            self._set("last", 0)
        self._set("pending", 0)  # merged (now `last`), rejected, or from a round that never completed
        self.state.config_records[_MEMORY]["scale"] = scale
        self._save_disk()

    def last_update(self, client_id: str) -> Optional[ClientUpdate]:
        deltas = self.deltas("last")
        return None if deltas is None else ClientUpdate(client_id, 0, deltas, round=self._round("last"))

    def _save_disk(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for slot in _SLOTS:
            for kind in ("deltas", "global"):
                key = f"fcmoe.{slot}-{kind}"
                tensors = arrays_to_tensors(self.state.array_records[key]) if key in self.state.array_records else {}
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.directory / f"{slot}_{kind}.safetensors"))
        tmp = self.directory / "memory.json.tmp"
        tmp.write_text(json.dumps(dict(self.state.config_records[_MEMORY])))
        os.replace(tmp, self.directory / "memory.json")

    def _load_disk(self) -> None:
        self.state[_MEMORY] = ConfigRecord(json.loads((self.directory / "memory.json").read_text()))
        for slot in _SLOTS:
            for kind in ("deltas", "global"):
                path = self.directory / f"{slot}_{kind}.safetensors"
                self.state[f"fcmoe.{slot}-{kind}"] = tensors_to_arrays(load_file(str(path)) if path.is_file() else {})


def local_training_arguments(config: FlowerRunConfig, output_dir: str) -> FederatedMoETrainingArguments:
    """The clients' local training arguments of the run config (before a client's seed and the server's
    [`~fcmoe_hf.federated.ClientConfig`]); the server reads them too (resume check, update bounds)."""
    return FederatedMoETrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=config.batch_size, num_train_epochs=config.local_epochs,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
        use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", disable_tqdm=True,
        **{"logging_steps": 10, "seed": config.seed, **config.training_overrides},
    )


class FlowerClient:
    """One node's client: its components, partition and local training arguments.

    Args:
        config ([`FlowerRunConfig`]): the run config.
        components ([`FederationComponents`]): model, tokenizer, task and partition (shared by the clients a
            simulation process serves; each message sets the model's whole trainable state).
        partition_id (`int`): which partition is this node's (`node_config["partition-id"]`).
    """

    def __init__(self, config: FlowerRunConfig, components: FederationComponents, partition_id: int):
        if not 0 <= partition_id < components.splits.num_clients:
            raise ValueError(f"partition-id {partition_id} is outside the {components.splits.num_clients} partitions (num-clients).")
        self.config, self.components, self.partition_id = config, components, partition_id
        self.client_id = f"client_{partition_id}"
        data = components.splits.clients[partition_id]
        train = data["train"]
        self.train_set = components.task.tokenize(first_rows(train, config.optional("max_train_samples_per_client")))
        self.test_set = first_rows(data["test"], config.optional("max_local_eval_samples"))
        self.output_dir = Path(config.client_output_dir or os.path.join(config.run_dir, "clients")) / self.client_id

    def training_args(self, server_round: int, client_config: ClientConfig) -> FederatedMoETrainingArguments:
        """The local training arguments of `server_round`: the run config's, the client's seed, the server's config."""
        cfg = self.config
        args = local_training_arguments(cfg, tempfile.mkdtemp(prefix="fcmoe-flower-"))
        # The in-process federation's seed of this client and round (FederatedSimulation.train_client).
        args = dataclasses.replace(
            args, client_id=self.client_id, federated_round=server_round, seed=cfg.seed + 1000 * server_round + self.partition_id
        )
        return client_config.apply(args)

    def memory(self, context: Context) -> ClientMemory:
        return ClientMemory(context, self.output_dir / "flower_state", resume=self.config.resume)

    # -- messages -----------------------------------------------------------------------------------------------------

    def train(self, message: Message, context: Context) -> Message:
        """Train one round from the message's global state; reply with the update (or Flower-style arrays)."""
        config = message.content.config_records["config"]
        server_round = int(config["server-round"])
        global_state = arrays_to_state(message.content.array_records["arrays"])
        fcmoe = config.get(REPLY_KEY) == "update"
        if fcmoe:
            client_config = ClientConfig.from_dict({k: config[k] for k in _CLIENT_CONFIG_FIELDS if k in config})
        else:  # Flower's own strategies: FedProx sends "proximal-mu"; nothing else reaches the client.
            client_config = ClientConfig(proximal_mu=float(config.get("proximal-mu", 0.0)))
        if client_config.personalization != "none":
            raise NotImplementedError(f"personalization={client_config.personalization!r} is not supported on Flower yet.")
        memory = self.memory(context) if fcmoe else None
        if memory is not None:
            memory.settle(self.client_id, config)
        model = self.components.model
        trainer = FederatedMoETrainer(
            model=model, args=self.training_args(server_round, client_config), train_dataset=self.train_set,
            data_collator=self.components.task.data_collator, processing_class=self.components.tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.start_round(
            global_state, memory.last_update(self.client_id) if memory is not None else None,
            previous_global=memory.start_global("last") if memory is not None else None,
            residual_scale=memory.scale if memory is not None else 1.0,
        )
        trainer.train()
        update = trainer.client_update()
        trainer.accelerator.free_memory()
        if not fcmoe:
            metrics = MetricRecord({NUM_EXAMPLES: update.num_samples, "train_loss": float(update.metrics.get("train_loss", 0.0))})
            content = RecordDict({"arrays": state_to_arrays(get_federated_state(model)), "metrics": metrics})
            return Message(content=content, reply_to=message)
        filtered = client_config.retention_mode == "filtered"
        memory.set_pending(server_round, update.deltas, global_state if filtered else None)
        return Message(content=update_to_content(update, str(config.get(TRANSPORT_KEY, "float32"))), reply_to=message)

    def personalized_state(self, global_state: Mapping[str, torch.Tensor], client_config: ClientConfig, memory: Optional[ClientMemory]):
        """The global state plus lambda x this client's retained residual (the global state without one)."""
        deltas = memory.deltas("last") if memory is not None else None
        if deltas is None or client_config.retention_lambda == 0:
            return global_state
        return retained_start(
            global_state, deltas, lam=client_config.retention_lambda, mode=client_config.retention_mode,
            previous_global=memory.start_global("last") if client_config.retention_mode == "filtered" else None,
            scale=memory.scale,
        )

    def evaluate(self, message: Message, context: Context) -> Message:
        """Score the personalized adapter on the local test split; after the last round, save (and push) it."""
        config = message.content.config_records["config"]
        server_round = int(config["server-round"])
        global_state = arrays_to_state(message.content.array_records["arrays"])
        memory, client_config = None, ClientConfig()
        if config.get(REPLY_KEY) == "update":
            client_config = ClientConfig.from_dict({k: config[k] for k in _CLIENT_CONFIG_FIELDS if k in config})
            memory = self.memory(context)
            memory.settle(self.client_id, config)
        state = self.personalized_state(global_state, client_config, memory)
        model, task = self.components.model, self.components.task
        set_federated_state(model, state)
        scores = task.evaluate(model, self.test_set, batch_size=self.config.eval_batch_size)
        if server_round >= self.config.num_server_rounds and self.config.save_client_adapters:
            self.save_adapter(state)
        metrics = MetricRecord({**{k: float(v) for k, v in scores.items()}, NUM_EXAMPLES: self.test_set.num_rows})
        content = RecordDict({"metrics": metrics, "client": ConfigRecord({CLIENT_ID_KEY: self.client_id})})
        return Message(content=content, reply_to=message)

    def save_adapter(self, state: Mapping[str, torch.Tensor]) -> Path:
        """Write the personalized adapter to `<client_output_dir>/<client_id>/adapter`; push it with `push_to_hub`."""
        from ..hub import save_adapter

        model = self.components.model
        peft_config = dataclasses.replace(model.peft_config[model.active_adapter], inference_mode=True)
        peft_config.base_model_name_or_path = self.config.base_model_id or peft_config.base_model_name_or_path
        directory = save_adapter(self.output_dir / "adapter", state, peft_config)
        if self.config.push_to_hub:
            push_client_adapter(directory, self.config.hub_model_id or Path(self.config.run_dir).absolute().name, self.client_id)
        return directory


def push_client_adapter(directory: Union[str, os.PathLike], repo_id: str, client_id: str, token: Optional[str] = None) -> str:
    """Push one client's personalized adapter to `<repo_id>-clients/<client_id>/`, a private repository (a
    personalized adapter carries information about its client's data). Returns the commit id."""
    from huggingface_hub import HfApi

    from ..hub import check_hub_access, clients_repo_for
    from ..hub.push import with_retries

    api = HfApi(token=token)
    repo = check_hub_access(clients_repo_for(check_hub_access(repo_id, token, api)), token, api)
    with_retries(f"create_repo {repo}", lambda: api.create_repo(repo, private=True, exist_ok=True))
    info = with_retries(
        f"upload {client_id} to {repo}",
        lambda: api.upload_folder(repo_id=repo, folder_path=str(directory), path_in_repo=client_id,
                                  commit_message=f"{client_id} personalized adapter"),
    )
    logger.info(f"Pushed {client_id}'s personalized adapter to {repo}/{client_id}")
    return getattr(info, "oid", str(info))


# -- the ClientApp ------------------------------------------------------------------------------------------------------

_CLIENTS: dict[tuple, FlowerClient] = {}
_COMPONENTS: dict[tuple, FederationComponents] = {}


def client_for(context: Context, config: Optional[FlowerRunConfig] = None, components: Union[str, ComponentsBuilder, None] = None) -> FlowerClient:
    """The node's [`FlowerClient`], built once per process and partition (components once per process)."""
    config = config or FlowerRunConfig.from_run_config(context.run_config)
    builder = resolve_builder(components or config.components)
    key = (id(builder), json.dumps(config.to_run_config(), sort_keys=True))
    if key not in _COMPONENTS:
        _COMPONENTS.clear()  # one run's components per process
        _CLIENTS.clear()
        _COMPONENTS[key] = builder(config)
    if "partition-id" not in context.node_config:
        raise ValueError("The SuperNode has no 'partition-id' in its node config: start it with --node-config 'partition-id=<i>'.")
    partition_id = int(context.node_config["partition-id"])
    client_key = (*key, partition_id)
    if client_key not in _CLIENTS:
        _CLIENTS[client_key] = FlowerClient(config, _COMPONENTS[key], partition_id)
    return _CLIENTS[client_key]


def make_client_app(config: Optional[FlowerRunConfig] = None, components: Union[str, ComponentsBuilder, None] = None):
    """A Flower `ClientApp` of fcmoe_hf clients.

    Args:
        config ([`FlowerRunConfig`], *optional*): the run config; read from the run's `context.run_config` when omitted
            (`flwr run`).
        components (`str` or callable, *optional*): the components builder, overriding `config.components`.
    """
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return client_for(context, config, components).train(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return client_for(context, config, components).evaluate(message, context)

    return app
