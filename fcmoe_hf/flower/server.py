"""The server side of a Flower run: the rounds, global evaluation, checkpoints and resume, outputs and Hub push.

[`FlowerServer.run`] drives the rounds over a Flower `Grid` with a strategy ([`FCMoEStrategy`] around an fcmoe_hf
aggregator, or one of Flower's own), as `Strategy.start` does, and adds what the in-process
[`~fcmoe_hf.simulation.FederatedSimulation`] does around each round: the global adapter scored on the global test set,
the clients' local metrics, bytes on the wire, a checkpoint ([`~fcmoe_hf.simulation.checkpoints.CheckpointStore`]:
global state, aggregator state, bookkeeping) after every round, `metrics.jsonl`, and at the end the global adapter,
plots and `outputs.json` ([`~fcmoe_hf.simulation.outputs.write_outputs`]). The clients write their own personalized
adapters: the server never holds them.

As the in-process run, it locks its run directory ([`~fcmoe_hf.simulation.lock.RunLock`]: a second server there is
refused, naming the holder), refuses to resume with another configuration
([`~fcmoe_hf.simulation.resume.check_resume_config`]), and bounds every merge by what it knows of the clients: the
partition sizes (it builds the same partition as the clients) and the activations a sample can produce
([`FCMoEStrategy.expect_clients`]).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Union

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid

from ..federated import ClientConfig
from ..federated.bounds import local_passes, routing_top_k
from ..federated.validation import global_expert_sizes
from ..reporting import RoundLogger, read_jsonl, truncate_jsonl
from ..simulation.checkpoints import CheckpointStore
from ..simulation.lock import RunLock
from ..simulation.outputs import checkpoint_files, write_outputs
from ..simulation.resume import check_resume_config, run_config
from ..simulation.round_metrics import cosine_quantiles, expert_usage, first_rows, merge_outcome
from ..trainer import get_federated_state, set_federated_state
from .client import local_training_arguments, make_client_app
from .components import ComponentsBuilder, FederationComponents, resolve_builder
from .config import FlowerRunConfig
from .records import arrays_to_state, record_nbytes, state_to_arrays
from .strategy import FCMoEStrategy, RoundFailedError, local_metrics, reply_failures

logger = logging.getLogger(__name__)

#: Flower strategies' server state (numpy arrays per key) that a checkpoint keeps.
_FLOWER_STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def build_strategy(config: FlowerRunConfig):
    """The run's strategy: [`FCMoEStrategy`] around `config.aggregator`, or Flower's own for `flwr:<name>`."""
    sampling = dict(
        fraction_train=config.fraction_train, min_train_nodes=config.min_train_clients,
        min_available_nodes=config.min_available_clients, fraction_evaluate=1.0, min_evaluate_nodes=1,
    )
    if not config.is_flower_strategy:
        return FCMoEStrategy(config.aggregator, config.aggregator_overrides or None, transport_dtype=config.transport_dtype, **sampling)
    from flwr.serverapp import strategy as flwr_strategies

    classes = {
        "fedavg": flwr_strategies.FedAvg, "fedprox": flwr_strategies.FedProx, "fedadam": flwr_strategies.FedAdam,
        "fedyogi": flwr_strategies.FedYogi, "fedadagrad": flwr_strategies.FedAdagrad, "fedavgm": flwr_strategies.FedAvgM,
    }
    try:
        return classes[config.flower_strategy](**sampling, **config.aggregator_overrides)
    except TypeError as err:
        raise ValueError(f"aggregator-config {config.aggregator_config!r} does not fit {config.aggregator}: {err}") from err


@dataclass
class _StrategyConfig:
    # A Flower strategy's settings as the model cards read an aggregator's config.
    values: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)


class FlowerServer:
    """The `ServerApp`'s federation.

    It has what [`~fcmoe_hf.simulation.outputs.write_outputs`] reads of a federation (`model`, `task`, `splits`,
    `args`, `history`, `aggregator`, ...), so the outputs are written by the same code as the in-process run's.

    Args:
        config ([`FlowerRunConfig`]): the run config.
        components ([`FederationComponents`]): the model (for global evaluation and the adapter's config), the task,
            and the partition's global test set and configuration (the server reads no client's data).
        strategy (*optional*): the Flower strategy; [`build_strategy`] of `config` by default.
    """

    def __init__(self, config: FlowerRunConfig, components: FederationComponents, strategy=None):
        self.config = config
        self.model, self.tokenizer, self.task, self.splits = components.model, components.tokenizer, components.task, components.splits
        self.strategy = strategy or build_strategy(config)
        self.run_dir = Path(config.run_dir)
        self.checkpoints = CheckpointStore(self.run_dir)
        self.client_ids = [f"client_{i}" for i in range(self.splits.num_clients)]
        self.history: list[dict[str, Any]] = []
        # What the outputs writers and the resume check read of the federation's arguments (`FederationArguments`'
        # names for the run config's fields); the clients write their own adapters.
        self.args = SimpleNamespace(
            aggregator=config.aggregator, base_model_id=config.optional("base_model_id"), dataset_id=config.optional("dataset_id"),
            num_rounds=config.num_server_rounds, save_client_adapters=False, fraction_fit=config.fraction_train,
            min_fit_clients=config.min_train_clients, task=config.task, max_length=config.max_length,
            resume_allow_config_change=config.resume_allow_config_change,
        )
        self.training_args = local_training_arguments(config, str(self.run_dir))
        if isinstance(self.strategy, FCMoEStrategy):
            self.aggregator = self.strategy.aggregator
            self.strategy.expect_clients(self.partition_sizes(), **self.activation_bound())
        else:
            scalars = {k: v for k, v in vars(self.strategy).items() if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}
            self.aggregator = SimpleNamespace(config=_StrategyConfig(scalars))

    # -- what the server knows of the clients ---------------------------------------------------------------------------

    def partition_sizes(self) -> dict[str, int]:
        """Every client id and its training partition's size, as its [`~fcmoe_hf.flower.client.FlowerClient`] caps it."""
        cap = self.config.optional("max_train_samples_per_client")
        sizes = {cid: self.splits.clients[i]["train"].num_rows for i, cid in enumerate(self.client_ids)}
        return {cid: min(size, cap) if cap else size for cid, size in sizes.items()}

    def activation_bound(self) -> dict[str, Any]:
        """`max_length`, local passes over the data and `top_k`, for [`FCMoEStrategy.expect_clients`]."""
        passes = local_passes(self.training_args, self.partition_sizes())
        top_k = routing_top_k(self.model)
        return {"max_length": self.config.max_length, "passes": passes, "top_k": top_k}

    # -- what the outputs writers call ----------------------------------------------------------------------------------

    def sample_clients(self, round_index: int) -> list[str]:
        """As many client ids as a round samples (Flower samples the nodes themselves)."""
        num = max(self.config.min_train_clients, int(self.config.fraction_train * len(self.client_ids)))
        return self.client_ids[: min(num, len(self.client_ids))]

    def client_config(self, round_index: int) -> ClientConfig:
        return self.aggregator.configure_client(round_index) if isinstance(self.strategy, FCMoEStrategy) else ClientConfig()

    # -- checkpoints ---------------------------------------------------------------------------------------------------

    def _server_state(self) -> dict[str, torch.Tensor]:
        if isinstance(self.strategy, FCMoEStrategy):
            return self.strategy.state_dict()
        out = {}
        for name in _FLOWER_STATE_ATTRIBUTES:
            for key, value in (getattr(self.strategy, name, None) or {}).items():
                out[f"{name}/{key}"] = torch.from_numpy(np.ascontiguousarray(value))
        return out

    def _load_server_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if isinstance(self.strategy, FCMoEStrategy):
            self.strategy.load_state_dict(state)
            return
        for full_key, value in state.items():
            name, _, key = full_key.partition("/")
            if getattr(self.strategy, name, None) is None:
                setattr(self.strategy, name, {})
            getattr(self.strategy, name)[key] = value.numpy()

    def checkpoint(self, round_index: int, global_state: Mapping[str, torch.Tensor]) -> Path:
        """Checkpoint the round: global state, server state and bookkeeping, as the in-process run does."""
        strategy = self.strategy
        return self.checkpoints.save(
            round_index, global_state, self._server_state(),
            {
                "last_update_round": getattr(strategy, "last_update_round", {}),
                "update_scales": getattr(strategy, "update_scales", {}),
                "aggregator": self.config.aggregator,
                "aggregator_config": self.aggregator.config.to_dict(),
                "run_config": run_config(self),
                "flower_run_config": self.config.to_run_config(),
            },
            files=checkpoint_files(self),
        )

    def resume(self) -> tuple[int, Optional[dict[str, torch.Tensor]]]:
        """`(last complete round, its global state)` from `run_dir`'s latest checkpoint; `(0, None)` without one."""
        loaded = self.checkpoints.load()
        if loaded is None:
            return 0, None
        state, global_state, server_state = loaded
        check_resume_config(self, state, str(self.checkpoints.root / f"round_{int(state['round']):04d}"))
        self._load_server_state(server_state)
        if isinstance(self.strategy, FCMoEStrategy):
            self.strategy.last_update_round = {k: int(v) for k, v in state["last_update_round"].items()}
            self.strategy.update_scales = {k: float(v) for k, v in state["update_scales"].items()}
        self.history = [r for r in read_jsonl(self.run_dir / "metrics.jsonl") if r.get("round", 0) <= state["round"]] \
            if (self.run_dir / "metrics.jsonl").exists() else []
        return int(state["round"]), global_state

    # -- the run -------------------------------------------------------------------------------------------------------

    def evaluate_global(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The global adapter on the global test set (`global_<metric>`)."""
        test = first_rows(self.splits.global_test, self.config.optional("max_global_eval_samples"))
        set_federated_state(self.model, global_state)
        scores = self.task.evaluate(self.model, test, batch_size=self.config.eval_batch_size)
        return {f"global_{k}": v for k, v in scores.items()}

    def run(self, grid: Grid) -> list[dict[str, Any]]:
        """Run (or, with `resume`, continue) the federation over `grid`; returns the per-round metrics.

        Raises:
            [`~fcmoe_hf.simulation.lock.RunDirectoryLocked`]: another run holds `run_dir` (the error names it).
            `ValueError`: `resume` with a configuration that differs from the checkpoint's (naming every field).
            [`RoundFailedError`]: a round had too few valid updates (the rounds before it are checkpointed).
        """
        with RunLock(self.run_dir):
            return self._run(grid)

    def _run(self, grid: Grid) -> list[dict[str, Any]]:
        from ..hub.push import HubPublisher

        cfg = self.config
        publisher = None
        if cfg.push_to_hub:  # checked before any training
            publisher = HubPublisher.from_training_args(SimpleNamespace(
                push_to_hub=True, hub_model_id=cfg.optional("hub_model_id"), hub_token=None, hub_strategy="end",
                hub_private_repo=None, hub_revision=None,
            ), self.run_dir)
        start_round, global_state = self.resume() if cfg.resume else (0, None)
        if not cfg.resume and self.checkpoints.exists():
            raise FileExistsError(f"{self.run_dir} already holds a run: set resume=true to continue it, or another run-dir.")
        if global_state is None:
            global_state = get_federated_state(self.model)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.run_dir / "metrics.jsonl", start_round)
        truncate_jsonl(self.run_dir / "conflicts.jsonl", start_round)
        (self.run_dir / "partition.json").write_text(json.dumps(self.splits.summary()))
        round_logger = RoundLogger(self.run_dir, [])
        try:
            for round_index in range(start_round + 1, cfg.num_server_rounds + 1):
                logger.info(f"[ROUND {round_index}/{cfg.num_server_rounds}] {cfg.aggregator}")
                global_state, metrics, conflicts = self.run_round(grid, round_index, global_state)
                round_logger.log_round(round_index, metrics, conflicts)
                self.history.append({"round": round_index, **metrics})
                self.checkpoint(round_index, global_state)
        finally:
            round_logger.close()
        write_outputs(self, global_state)
        if publisher is not None:
            publisher.push(self.run_dir)
        return self.history

    def run_round(self, grid: Grid, round_index: int, global_state: dict[str, torch.Tensor]):
        """One round: train messages, merge, evaluation; returns `(global_state, metrics, conflicts)`."""
        started = time.perf_counter()
        cfg, strategy = self.config, self.strategy
        messages = list(strategy.configure_train(round_index, state_to_arrays(global_state), ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        arrays, train_metrics = strategy.aggregate_train(round_index, replies)
        failures = reply_failures([m.metadata.dst_node_id for m in messages], replies)
        if arrays is None:
            raise RoundFailedError(f"Round {round_index} failed: no client update arrived ({failures}).")
        new_state = arrays_to_state(arrays)
        received = [record_nbytes(m.content) for m in replies if not m.has_error()]
        metrics: dict[str, Any] = {}
        conflicts: dict[str, list] = {}
        if isinstance(strategy, FCMoEStrategy):
            result, updates = strategy.last_result, strategy.last_updates
            metrics.update({f"server_{k}": v for k, v in result.summary().items()})
            metrics["conflict_share"] = metrics.pop("server_conflict_share", float("nan"))
            metrics.update(merge_outcome(result))
            quantiles = cosine_quantiles(result.diagnostics)
            if quantiles is not None:
                metrics["cosine_quantiles"] = quantiles
            merged = set(result.client_ids)
            metrics.update(expert_usage([u.activation_counts for u in updates if u.client_id in merged], global_expert_sizes(global_state)))
            for key in ("train_loss", "last_aux_loss", "last_proximal_loss"):
                values = [float(u.metrics[key]) for u in updates if key in u.metrics]
                if values:
                    metrics[f"{key.removeprefix('last_')}_mean"] = float(np.mean(values))
            conflicts = {group: d.conflict_share.tolist() for group, d in result.diagnostics.items()}
        else:
            metrics["server_num_clients"] = float(len(received))
            if train_metrics is not None and "train_loss" in train_metrics:
                metrics["train_loss_mean"] = float(train_metrics["train_loss"])
        metrics["failed_clients"] = failures
        # Bytes on the wire: what each sampled client downloads, what each reply uploads.
        metrics["bytes_downloaded_per_client"] = record_nbytes(messages[0].content) if messages else 0
        metrics["bytes_uploaded_per_client_mean"] = float(np.mean(received)) if received else None
        metrics["bytes_uploaded_total"] = int(sum(received))
        metrics["bytes_downloaded_total"] = int(sum(record_nbytes(m.content) for m in messages))
        if round_index % cfg.eval_every == 0 or round_index == cfg.num_server_rounds:
            metrics.update(self.evaluate_global(new_state))
            # A node that failed this round's training is presumed down: it is not asked to evaluate (which would
            # wait for it until the timeout again).
            failed = {f["node_id"] for f in failures}
            evaluation = [m for m in strategy.configure_evaluate(round_index, state_to_arrays(new_state), ConfigRecord(), grid)
                          if m.metadata.dst_node_id not in failed]
            evaluated = grid.send_and_receive(evaluation, timeout=cfg.round_timeout)
            metrics.update(local_metrics(evaluated, getattr(strategy, "node_clients", None)))
        metrics["round_wall_seconds"] = time.perf_counter() - started
        return new_state, metrics, conflicts


def make_server_app(config: Optional[FlowerRunConfig] = None, components: Union[str, ComponentsBuilder, None] = None):
    """A Flower `ServerApp` running [`FlowerServer`].

    Args:
        config ([`FlowerRunConfig`], *optional*): the run config; read from `context.run_config` when omitted.
        components (`str` or callable, *optional*): the components builder, overriding `config.components`.
    """
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or FlowerRunConfig.from_run_config(context.run_config)
        FlowerServer(cfg, resolve_builder(components or cfg.components)(cfg)).run(grid)

    return app


def run_flower_simulation(
    config: FlowerRunConfig,
    components: Union[str, ComponentsBuilder, None] = None,
    num_cpus_per_client: float = 1.0,
    num_gpus_per_client: float = 0.0,
    ray_init_args: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Run a federation as a Flower simulation (`flwr.simulation.run_simulation`, clients as Ray actors, in parallel
    as far as `num_cpus_per_client` / `num_gpus_per_client` allow) with `config.num_clients` SuperNodes.

    Args:
        config ([`FlowerRunConfig`]): the run config (`run_dir` receives the outputs).
        components (`str` or callable, *optional*): the components builder, overriding `config.components`.
        num_cpus_per_client (`float`), num_gpus_per_client (`float`): each client actor's resources.
        ray_init_args (`dict`, *optional*): `ray.init` arguments (e.g. `{"num_cpus": 4}`).

    Returns:
        `list[dict]`: the per-round metrics, as [`~fcmoe_hf.simulation.FederatedSimulation.run`] returns them (read
        back from `metrics.jsonl`).

    Raises:
        `RuntimeError`: when the run did not complete every round (the Flower log says why).
    """
    from flwr.simulation import run_simulation

    backend_config: dict[str, Any] = {"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client}}
    if ray_init_args:
        backend_config["init_args"] = dict(ray_init_args)
    run_simulation(
        server_app=make_server_app(config, components), client_app=make_client_app(config, components),
        num_supernodes=config.num_clients, backend_config=backend_config,
    )
    path = Path(config.run_dir) / "metrics.jsonl"
    history = read_jsonl(path) if path.exists() else []
    if [h["round"] for h in history][-1:] != [config.num_server_rounds]:
        raise RuntimeError(f"The Flower simulation in {config.run_dir} stopped after round {len(history)} of {config.num_server_rounds}: see its log.")
    return history


__all__ = ["FlowerServer", "build_strategy", "make_server_app", "run_flower_simulation"]
