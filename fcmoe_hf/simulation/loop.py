"""The in-process federation: rounds, client sampling, local training, merge, evaluation, checkpoint and resume.

Clients are trained one after another on one model in one job; under `accelerate launch` each client's training is
data-parallel over the launched processes. Every process runs the same loop: the main process writes the clients'
updates to disk, every process streams them back and merges them (deterministically, so the global states agree), and
the main process evaluates, logs and checkpoints.

What the clients' training needs from the server (FedProx's proximal term, FC-MoE's retention) is the aggregator's
[`~fcmoe_hf.federated.Aggregator.configure_client`], applied to every client's training arguments. A client's
personalized adapter, the point it starts its next round from, and the adapter that is saved come from one function,
[`~fcmoe_hf.federated.retained_start`], with the scale the server applied to its update.

Memory stays flat in the number of clients: updates live on disk (safetensors, read lazily when merged), a client's
personalized adapter is recomputed from the global state and its last update when needed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import PartialState
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.trainer_callback import PrinterCallback

from ..data import ClientSplits
from ..federated import (
    Aggregator,
    ClientConfig,
    ClientUpdate,
    UpdateBounds,
    build_aggregator,
    load_update,
    retained_start,
)
from ..federated.bounds import local_passes, routing_top_k
from ..hub.push import HubPublisher
from ..reporting import RoundLogger, truncate_jsonl
from ..tasks import Task, build_task
from ..trainer import FederatedMoETrainer, FederatedMoETrainingArguments, get_federated_state, set_federated_state
from .arguments import FederationArguments
from .checkpoints import CheckpointStore, check_client_id
from .evaluation import evaluate_federation
from .lock import acquire_run_lock
from .outputs import write_outputs
from .progress import ClientProgress
from .resume import check_resume_config, finished_message, referenced_rounds, restore_history, run_config
from .round_metrics import merge_outcome, merge_round_metrics

logger = logging.getLogger(__name__)

#: Round metrics shown on the round bar.
_SHOWN = ("global_accuracy", "local_accuracy_mean", "global_loss", "train_loss_mean", "conflict_share")


class FederatedSimulation:
    """Runs a federation of `splits.num_clients` clients on one model.

    Args:
        model (`PeftModel`): the base model with its (MoE-)LoRA adapter; its trainable tensors are the federated state.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer (with a pad token).
        splits ([`~fcmoe_hf.data.ClientSplits`]): every client's train / local test data and the global test set.
        args ([`FederationArguments`]): rounds, sampling, aggregator, task, evaluation.
        training_args ([`~fcmoe_hf.trainer.FederatedMoETrainingArguments`]): the clients' local training; its
            `output_dir` is the run directory. `client_id`, `federated_round` and `seed` are set per client and round,
            and the aggregator's [`~fcmoe_hf.federated.ClientConfig`] is applied on top.
        aggregator ([`~fcmoe_hf.federated.Aggregator`], *optional*): built from `args.aggregator` when omitted.
        on_round_end (`Callable[[int, dict], None]`, *optional*): called on every process after each round is
            checkpointed, with the round and its metrics.
        task ([`~fcmoe_hf.tasks.Task`], *optional*): built from `args.task` (with `tokenizer`, the splits' label
            column and names, and `args.max_length`) when omitted.
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        splits: ClientSplits,
        args: FederationArguments,
        training_args: FederatedMoETrainingArguments,
        aggregator: Optional[Aggregator] = None,
        on_round_end: Optional[Callable[[int, dict], None]] = None,
        task: Optional[Task] = None,
    ):
        self.model, self.tokenizer, self.splits, self.args = model, tokenizer, splits, args
        self.training_args = training_args
        self.aggregator = aggregator or build_aggregator(args.aggregator, args.aggregator_config)
        self.task = task or build_task(
            args.task, tokenizer, label_column=splits.label_column, label_names=splits.label_names,
            max_length=args.max_length,
        )
        self.on_round_end = on_round_end
        self.run_dir = Path(training_args.output_dir)
        self.checkpoints = CheckpointStore(self.run_dir)
        self.seed = training_args.seed
        self.report_to = [r for r in (training_args.report_to or []) if r != "none"]
        self.state = PartialState()
        self.client_ids = [f"client_{i}" for i in range(splits.num_clients)]
        self.train_sets = [self.task.tokenize(client["train"]) for client in splits.clients]
        # Which round's update directory holds each client's last update (the basis of its retained residual), and
        # the factor the server scaled that update by.
        self.last_update_round: dict[str, int] = {}
        self.update_scales: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        #: Set by [`run`] when a resumed run had already finished: why nothing was done.
        self.nothing_to_do: Optional[str] = None

    # -- paths ------------------------------------------------------------------------------------------------------

    def _round_dir(self, round_index: int) -> Path:
        return self.run_dir / "rounds" / f"round_{round_index:04d}"

    def _update_dir(self, round_index: int, client_id: str) -> Path:
        # Ids come from state.json on resume: a path component only when plain (no `..`, no separator).
        return self._round_dir(round_index) / "updates" / check_client_id(client_id, f"{self.run_dir}: update directory")

    def _last_update(self, client_id: str) -> Optional[ClientUpdate]:
        round_index = self.last_update_round.get(client_id)
        return None if round_index is None else ClientUpdate.load(self._update_dir(round_index, client_id))

    def _previous_global(self, client_id: str, mode: str) -> Optional[dict[str, torch.Tensor]]:
        # Only the "filtered" residual needs the global state the client's last update started from.
        round_index = self.last_update_round.get(client_id)
        if mode != "filtered" or round_index is None:
            return None
        return load_file(str(self._round_dir(round_index) / "global_start.safetensors"))

    # -- one round --------------------------------------------------------------------------------------------------

    #: `update_transform(round, client_id, update) -> update`, applied to every update the server receives before the
    #: merge (e.g. [`~fcmoe_hf.federated.attacks.attack_clients`] to benchmark the defences); `None`: none.
    update_transform: Optional[Callable[[int, str, ClientUpdate], ClientUpdate]] = None

    def update_bounds(self, sampled: list[str]) -> UpdateBounds:
        """What the server knows of round's clients ([`UpdateBounds`]): the ids it sampled, their partition sizes,
        and the activations a sample can produce (`max_length` x local passes x `top_k`)."""
        sizes = {cid: len(self.train_sets[self.client_ids.index(cid)]) for cid in sampled}
        passes = local_passes(self.training_args, sizes, self.state.num_processes)
        top_k = routing_top_k(self.model)
        return UpdateBounds.for_round(sizes, max_length=self.args.max_length, passes=passes, top_k=top_k)

    def client_config(self, round_index: int) -> ClientConfig:
        """What the aggregator asks of the clients' local training in `round_index`."""
        return self.aggregator.configure_client(round_index)

    def sample_clients(self, round_index: int) -> list[str]:
        """The clients of `round_index`: a seeded sample of `max(min_fit_clients, fraction_fit * N)`, same on every
        process and independent of earlier rounds (so a resumed run samples what an uninterrupted one would)."""
        num = min(len(self.client_ids), max(self.args.min_fit_clients, round(self.args.fraction_fit * len(self.client_ids))))
        if num == len(self.client_ids):
            return list(self.client_ids)
        rng = np.random.default_rng([self.seed, round_index])
        return [self.client_ids[i] for i in sorted(rng.choice(len(self.client_ids), size=num, replace=False))]

    def personalized_state(
        self, global_state: Mapping[str, torch.Tensor], client_id: str, round_index: Optional[int] = None
    ) -> Mapping[str, torch.Tensor]:
        """Client `client_id`'s personalized adapter: the point it starts `round_index` from (by default the round
        after the last one run): the global state plus lambda x its retained residual.

        With PFL-MoE personalization this is the global state: the client's personal adapter and gate are apart,
        under `clients/<client_id>/personal/` ([`~fcmoe_hf.personalization.PersonalStateStore`]), and its local model
        is their mixture with this state ([`evaluate`]).
        """
        config = self.client_config(round_index if round_index is not None else len(self.history) + 1)
        previous = self._last_update(client_id)
        if previous is None or config.retention_lambda == 0:
            return global_state
        return retained_start(
            global_state, previous.deltas, lam=config.retention_lambda, mode=config.retention_mode,
            previous_global=self._previous_global(client_id, config.retention_mode),
            scale=self.update_scales.get(client_id, 1.0),
        )

    def train_client(
        self, client_id: str, round_index: int, global_state: Mapping[str, torch.Tensor],
        progress: Optional[ClientProgress] = None,
    ) -> Optional[ClientUpdate]:
        """One client's local round; returns its update on the main process (`None` elsewhere)."""
        index = self.client_ids.index(client_id)
        config = self.client_config(round_index)
        args = config.apply(
            dataclasses.replace(
                self.training_args,
                client_id=client_id,
                federated_round=round_index,
                seed=self.seed + 1000 * round_index + index,
                output_dir=str(self.run_dir / "scratch"),
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
            )
        )
        trainer = FederatedMoETrainer(
            model=self.model, args=args, train_dataset=self.train_sets[index], data_collator=self.task.data_collator,
            processing_class=self.tokenizer, callbacks=[progress.callback(client_id)] if progress is not None else None,
        )
        # The bars report progress; per-step log lines of every client would drown them (they stay in log_history).
        trainer.remove_callback(PrinterCallback)
        trainer.start_round(
            global_state, self._last_update(client_id),
            previous_global=self._previous_global(client_id, config.retention_mode),
            residual_scale=self.update_scales.get(client_id, 1.0),
        )
        trainer.train()
        update = trainer.client_update()
        # Release the wrapped engine: a DeepSpeed engine keeps gradient hooks on the shared model's parameters, which
        # would fire again (double reduction) under the next client's engine.
        trainer.accelerator.free_memory()
        if args.personalization == "pfl_moe":
            # PFL-MoE (arXiv:2012.15589): with the round's global adapter frozen, the client's personal adapter and
            # gate train on its data. They stay with the client (clients/<id>/personal/), never in its update.
            from ..personalization import PersonalStateStore, train_pfl_moe_client

            store = PersonalStateStore(self.run_dir / "clients")
            kept = store.load(client_id, before_round=round_index)
            set_federated_state(self.model, global_state)
            personal, losses = train_pfl_moe_client(
                self.model, self.train_sets[index], args, self.task.data_collator,
                personal=kept[1] if kept is not None else None, split_seed=self.seed + index,
            )
            logger.info(f"{client_id} round {round_index}: PFL-MoE personal training {losses}")
            if self.state.is_main_process:
                peft_config = dataclasses.replace(self.model.peft_config[self.model.active_adapter], inference_mode=True)
                peft_config.base_model_name_or_path = self.args.base_model_id or peft_config.base_model_name_or_path
                store.save(client_id, round_index, personal, peft_config)
        return update

    def evaluate(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Global adapter on the global test set, each client's personalized adapter on its local test set
        ([`~fcmoe_hf.simulation.evaluation.evaluate_federation`])."""
        return evaluate_federation(self, global_state)

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def _checkpoint(self, round_index: int, global_state: Mapping[str, torch.Tensor]) -> None:
        # With the states, what the round's adapter directories need besides weights (their adapter_config.json and
        # cards' fields): a run killed later can still publish this round (fcmoe_hf.simulation.export).
        from .outputs import checkpoint_files

        self.checkpoints.save(
            round_index, global_state, self.aggregator.state_dict() or {},
            {
                "last_update_round": self.last_update_round,
                "update_scales": self.update_scales,
                "aggregator": self.args.aggregator,
                "aggregator_config": self.aggregator.config.to_dict(),
                "federation_args": dataclasses.asdict(self.args),
                "run_config": run_config(self),
            },
            files=checkpoint_files(self),
        )
        # Client updates stay while a kept checkpoint (the previous one too: the fallback) refers to them.
        referenced = referenced_rounds(self.checkpoints, self.last_update_round)
        for old in (self.run_dir / "rounds").glob("round_*"):
            if old.name not in referenced:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> tuple[int, Optional[dict[str, torch.Tensor]]]:
        # The newest checkpoint passing its check (the previous one, with a warning, when the latest fails it).
        loaded = self.checkpoints.load(repair=self.state.is_main_process)
        if loaded is None:
            return 0, None
        state, global_state, aggregator_state = loaded
        check_resume_config(self, state, str(self.checkpoints.root / f"round_{int(state['round']):04d}"))
        self.aggregator.load_state_dict(aggregator_state)
        self.last_update_round = {k: int(v) for k, v in state["last_update_round"].items()}
        self.update_scales = {k: float(v) for k, v in state.get("update_scales", {}).items()}
        if self.state.is_main_process:  # the rounds already run, as an uninterrupted run would hold them
            self.history = restore_history(self.run_dir, int(state["round"]))
        return int(state["round"]), global_state

    # -- the run ----------------------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Run (or resume) the federation; returns the per-round metrics (main process; `[]` elsewhere, and `[]` when
        a resumed run had already finished: `nothing_to_do` says so). The run directory is locked throughout
        ([`~fcmoe_hf.simulation.lock.RunLock`]): a second run there fails on every process, naming the holder."""
        lock = acquire_run_lock(self.state, self.run_dir)
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> list[dict[str, Any]]:
        main = self.state.is_main_process
        # The federation publishes (TrainingArguments' hub fields), checked before any training; the clients' Trainers
        # never push nor create a repo: a client's checkpoint is built from its private data.
        publisher = HubPublisher.from_training_args(self.training_args, self.run_dir) if main else None
        self.training_args = dataclasses.replace(self.training_args, push_to_hub=False, hub_token=None)
        start_round, global_state = (0, None)
        if self.args.resume:
            start_round, global_state = self._load_checkpoint()
            self.nothing_to_do = finished_message(self.run_dir, start_round, self.args.num_rounds)
            if self.nothing_to_do is not None:  # its outputs are written: rewriting them would change nothing
                logger.warning(self.nothing_to_do)
                self.history = []
                return []
        elif self.checkpoints.exists():
            raise FileExistsError(f"{self.run_dir} already holds a run: pass --resume to continue it, or another run_dir.")
        if global_state is None:
            global_state = get_federated_state(self.model)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self.run_dir / "metrics.jsonl", start_round)
            truncate_jsonl(self.run_dir / "conflicts.jsonl", start_round)
            with open(self.run_dir / "partition.json", "w") as f:
                json.dump(self.splits.summary(), f)
        round_logger = RoundLogger(self.run_dir, self.report_to) if main else None
        bar = tqdm(range(start_round + 1, self.args.num_rounds + 1), desc=f"FL {self.args.aggregator}", disable=not main,
                   initial=start_round, total=self.args.num_rounds, unit="round", position=0)
        for round_index in bar:
            global_state, metrics, conflicts = self._run_round(round_index, global_state)
            if main:
                round_logger.log_round(round_index, metrics, conflicts)
                self.history.append({"round": round_index, **metrics})
                bar.set_postfix({k: round(v, 4) for k, v in metrics.items() if k in _SHOWN})
                self._checkpoint(round_index, global_state)
                if publisher is not None and publisher.every_round and round_index < self.args.num_rounds:
                    write_outputs(self, global_state)
                    publisher.push(self.run_dir)  # logs a failure; the next round's push carries the missing state
            self.state.wait_for_everyone()
            if self.on_round_end is not None:
                self.on_round_end(round_index, metrics)
        if main:
            round_logger.close()
            self.finalize(global_state)
            if publisher is not None:
                publisher.push(self.run_dir)
        self.state.wait_for_everyone()
        return self.history

    def _run_round(self, round_index: int, global_state: dict[str, torch.Tensor]):
        started = time.perf_counter()
        main = self.state.is_main_process
        sampled = self.sample_clients(round_index)
        if main and self.client_config(round_index).retention_mode == "filtered":
            self._round_dir(round_index).mkdir(parents=True, exist_ok=True)
            save_file(global_state, str(self._round_dir(round_index) / "global_start.safetensors"))
        train_metrics: dict[str, list[float]] = {}
        progress = ClientProgress(round_index, len(sampled), disable=not main)
        try:
            for client_id in sampled:
                update = self.train_client(client_id, round_index, global_state, progress)
                if update is not None:
                    update.save(self._update_dir(round_index, client_id))
                    for key in ("train_loss", "last_aux_loss", "last_proximal_loss"):
                        if key in update.metrics:
                            train_metrics.setdefault(key, []).append(float(update.metrics[key]))
        finally:
            progress.close()
        self.state.wait_for_everyone()
        update_dirs = [self._update_dir(round_index, cid) for cid in sampled]
        # Each update bound to the client the server assigned its directory to; an unreadable one is rejected.
        received = {cid: load_update(d, cid) for cid, d in zip(sampled, update_dirs)}
        if self.update_transform is not None:
            received = {c: self.update_transform(round_index, c, u) if isinstance(u, ClientUpdate) else u for c, u in received.items()}
        updates = [u for u in received.values() if isinstance(u, ClientUpdate)]
        result = self.aggregator.aggregate(global_state, received, self.update_bounds(sampled))
        # Cosine quantiles, expert usage and bytes: measured against the state the clients started from.
        round_metrics = merge_round_metrics(result, updates, update_dirs, global_state)
        # Materialise the new global state: the next round must not read the (pruned) update files lazily.
        global_state = {k: v.detach().clone() for k, v in result.global_state.items()}
        for client_id in result.client_ids:
            self.last_update_round[client_id] = round_index
            self.update_scales[client_id] = result.update_scales.get(client_id, 1.0)
        metrics: dict[str, Any] = {f"server_{k}": v for k, v in result.summary().items()}
        metrics["num_processes"] = self.state.num_processes
        metrics["conflict_share"] = metrics.pop("server_conflict_share", float("nan"))
        metrics.update(merge_outcome(result))
        metrics.update(round_metrics)
        for key, values in train_metrics.items():
            metrics[f"{key.removeprefix('last_')}_mean"] = float(np.mean(values))
        conflicts = {group: d.conflict_share.tolist() for group, d in result.diagnostics.items()}
        last = round_index == self.args.num_rounds
        if main and (round_index % self.args.eval_every == 0 or last):
            metrics.update(self.evaluate(global_state))
        metrics["round_wall_seconds"] = time.perf_counter() - started  # training + merge + evaluation
        return global_state, metrics, conflicts

    # -- outputs ----------------------------------------------------------------------------------------------------

    def finalize(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, Path]:
        """Write the final global adapter, the clients' personalized adapters, model cards and plots."""
        return write_outputs(self, global_state)
