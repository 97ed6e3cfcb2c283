"""The in-process federation: rounds, client sampling, local training, merge, evaluation, checkpoint and resume.

Clients are trained one after another on one model in one job; under `accelerate launch` each client's training is
data-parallel over the launched processes. Every process runs the same loop: the main process writes the clients'
updates to disk, every process streams them back and merges them (deterministically, so the global states agree), and
the main process evaluates, logs and checkpoints.

Memory stays flat in the number of clients: updates live on disk (safetensors, memory-mapped when merged), a client's
personalized adapter is recomputed from the global state and its last update when needed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.trainer_callback import PrinterCallback

from .data import (
    ClientSplits,
    evaluate_category_prediction,
    get_data_collator,
    tokenize_for_category_prediction,
    tokenize_for_causal_lm,
)
from .federated import Aggregator, ClientUpdate, build_aggregator
from .federated import retained_start
from .hub import render_model_card, save_adapter
from .reporting import RoundLogger, plot_conflict_heatmap, plot_metrics, truncate_jsonl
from .trainer import FederatedMoETrainer, FederatedMoETrainingArguments, get_federated_state, set_federated_state

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpoint"


@dataclass
class FederationArguments:
    """The federation around the clients' local training (a dataclass `HfArgumentParser` reads).

    Local training itself (learning rate, batch size, epochs per round, ...) is configured by
    [`FederatedMoETrainingArguments`], whose `output_dir` is the run directory, `seed` the seed of client sampling and
    of the clients' training, and `report_to` where round metrics go besides `metrics.jsonl` (`tensorboard`); the
    partition of the data by [`~fcmoe_hf.data.PartitionConfig`].
    """

    aggregator: str = field(
        default="fcmoe",
        metadata={"help": "Server merge: fcmoe, fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, ties, fedmoe, pfl_moe."},
    )
    aggregator_config: Union[dict, str, None] = field(
        default=None, metadata={"help": "Aggregator config overrides, a dict (YAML) or a JSON string."}
    )
    num_rounds: int = field(default=5, metadata={"help": "Number of federated rounds."})
    fraction_fit: float = field(default=1.0, metadata={"help": "Fraction of clients sampled each round."})
    min_fit_clients: int = field(default=2, metadata={"help": "At least this many clients are sampled each round."})
    task: str = field(
        default="category",
        metadata={"help": "'category': instruction-style category prediction (accuracy); 'causal_lm': LM on the text."},
    )
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example."})
    eval_every: int = field(default=1, metadata={"help": "Evaluate every N rounds (and always after the last)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of evaluation."})
    max_global_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Evaluate the global adapter on at most this many global test examples."}
    )
    max_local_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Evaluate each personalized adapter on at most this many local test examples."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the last complete round in run_dir."})
    save_client_adapters: bool = field(default=True, metadata={"help": "Save every client's personalized adapter."})
    base_model_id: Optional[str] = field(
        default=None, metadata={"help": "Base model id written into adapter configs and model cards."}
    )

    def __post_init__(self):
        if isinstance(self.aggregator_config, str):
            try:
                self.aggregator_config = json.loads(self.aggregator_config)
            except json.JSONDecodeError as err:
                raise ValueError(f"aggregator_config is not valid JSON: {err}") from err
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}.")
        if not 0 < self.fraction_fit <= 1:
            raise ValueError(f"fraction_fit must be in (0, 1], got {self.fraction_fit}.")
        if self.min_fit_clients < 1:
            raise ValueError(f"min_fit_clients must be >= 1, got {self.min_fit_clients}.")
        if self.task not in ("category", "causal_lm"):
            raise ValueError(f"task must be 'category' or 'causal_lm', got {self.task!r}.")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}.")


def _retention_settings(aggregator: Aggregator) -> tuple[float, str]:
    """`(lambda, mode)` the clients use: FC-MoE's retention when it is on, none for the other aggregators."""
    config = aggregator.config
    if getattr(config, "use_retention", False):
        return float(config.retention_lambda), str(config.retention_mode)
    return 0.0, "projection"


class FederatedSimulation:
    """Runs a federation of `splits.num_clients` clients on one model.

    Args:
        model (`PeftModel`): the base model with its (MoE-)LoRA adapter; its trainable tensors are the federated state.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer (with a pad token).
        splits ([`~fcmoe_hf.data.ClientSplits`]): every client's train / local test data and the global test set.
        args ([`FederationArguments`]): rounds, sampling, aggregator, evaluation.
        training_args ([`FederatedMoETrainingArguments`]): the clients' local training; its `output_dir` is the run
            directory. `client_id`, `federated_round`, `seed` and the retention fields are set per client and round.
        aggregator ([`~fcmoe_hf.federated.Aggregator`], *optional*): built from `args.aggregator` when omitted.
        on_round_end (`Callable[[int, dict], None]`, *optional*): called on every process after each round is
            checkpointed, with the round and its metrics.
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
    ):
        self.model, self.tokenizer, self.splits, self.args = model, tokenizer, splits, args
        self.training_args = training_args
        self.aggregator = aggregator or build_aggregator(args.aggregator, args.aggregator_config)
        self.on_round_end = on_round_end
        self.run_dir = Path(training_args.output_dir)
        self.seed = training_args.seed
        self.report_to = [r for r in (training_args.report_to or []) if r != "none"]
        self.state = PartialState()
        self.client_ids = [f"client_{i}" for i in range(splits.num_clients)]
        self.retention_lambda, self.retention_mode = _retention_settings(self.aggregator)
        self.collator = get_data_collator(tokenizer)
        self.train_sets = [self._tokenize(client["train"]) for client in splits.clients]
        # Which round's update directory holds each client's last update (the basis of its retained residual).
        self.last_update_round: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []

    # -- data -------------------------------------------------------------------------------------------------------

    def _tokenize(self, dataset: Dataset) -> Dataset:
        if self.args.task == "category":
            return tokenize_for_category_prediction(
                dataset, self.tokenizer, label_column=self.splits.label_column, label_names=self.splits.label_names,
                max_length=self.args.max_length,
            )
        return tokenize_for_causal_lm(dataset, self.tokenizer, max_length=self.args.max_length)

    # -- paths ------------------------------------------------------------------------------------------------------

    def _round_dir(self, round_index: int) -> Path:
        return self.run_dir / "rounds" / f"round_{round_index:04d}"

    def _update_dir(self, round_index: int, client_id: str) -> Path:
        return self._round_dir(round_index) / "updates" / client_id

    def _last_update(self, client_id: str) -> Optional[ClientUpdate]:
        round_index = self.last_update_round.get(client_id)
        return None if round_index is None else ClientUpdate.load(self._update_dir(round_index, client_id))

    def _previous_global(self, client_id: str) -> Optional[dict[str, torch.Tensor]]:
        # Only the "filtered" residual needs the global state the client's last update started from.
        round_index = self.last_update_round.get(client_id)
        if self.retention_mode != "filtered" or round_index is None:
            return None
        return load_file(str(self._round_dir(round_index) / "global_start.safetensors"))

    # -- one round --------------------------------------------------------------------------------------------------

    def sample_clients(self, round_index: int) -> list[str]:
        """The clients of `round_index`: a seeded sample of `max(min_fit_clients, fraction_fit * N)`, same on every
        process and independent of earlier rounds (so a resumed run samples what an uninterrupted one would)."""
        num = min(len(self.client_ids), max(self.args.min_fit_clients, round(self.args.fraction_fit * len(self.client_ids))))
        if num == len(self.client_ids):
            return list(self.client_ids)
        rng = np.random.default_rng([self.seed, round_index])
        return [self.client_ids[i] for i in sorted(rng.choice(len(self.client_ids), size=num, replace=False))]

    def personalized_state(self, global_state: Mapping[str, torch.Tensor], client_id: str) -> Mapping[str, torch.Tensor]:
        """Client `client_id`'s personalized adapter: the global state plus lambda x its retained residual."""
        previous = self._last_update(client_id)
        if previous is None or self.retention_lambda == 0:
            return global_state
        return retained_start(
            global_state, previous.deltas, lam=self.retention_lambda, mode=self.retention_mode,
            previous_global=self._previous_global(client_id),
        )

    def train_client(self, client_id: str, round_index: int, global_state: Mapping[str, torch.Tensor]) -> Optional[ClientUpdate]:
        """One client's local round; returns its update on the main process (`None` elsewhere)."""
        index = self.client_ids.index(client_id)
        args = dataclasses.replace(
            self.training_args,
            client_id=client_id,
            federated_round=round_index,
            seed=self.seed + 1000 * round_index + index,
            output_dir=str(self.run_dir / "scratch"),
            retention_lambda=self.retention_lambda,
            retention_mode=self.retention_mode,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
        )
        trainer = FederatedMoETrainer(
            model=self.model, args=args, train_dataset=self.train_sets[index], data_collator=self.collator,
            processing_class=self.tokenizer,
        )
        # The round bar reports progress; per-step log lines of every client would drown it (they stay in log_history).
        trainer.remove_callback(PrinterCallback)
        trainer.start_round(global_state, self._last_update(client_id), previous_global=self._previous_global(client_id))
        trainer.train()
        update = trainer.client_update()
        # Release the wrapped engine: a DeepSpeed engine keeps gradient hooks on the shared model's parameters, which
        # would fire again (double reduction) under the next client's engine.
        trainer.accelerator.free_memory()
        return update

    def evaluate(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Global adapter on the global test set, each client's personalized adapter on its local test set."""
        metrics: dict[str, float] = {}
        global_test = self._limit(self.splits.global_test, self.args.max_global_eval_samples)
        set_federated_state(self.model, global_state)
        metrics.update({f"global_{k}": v for k, v in self._score(global_test).items()})
        local: dict[str, list[float]] = {}
        for index, client_id in enumerate(self.client_ids):
            test = self._limit(self.splits.clients[index]["test"], self.args.max_local_eval_samples)
            set_federated_state(self.model, self.personalized_state(global_state, client_id))
            for key, value in self._score(test).items():
                local.setdefault(key, []).append(value)
                metrics[f"{client_id}/local_{key}"] = value
        for key, values in local.items():
            metrics[f"local_{key}_mean"] = float(np.mean(values))
            metrics[f"local_{key}_min"] = float(np.min(values))
            metrics[f"local_{key}_max"] = float(np.max(values))
        set_federated_state(self.model, global_state)
        return metrics

    @staticmethod
    def _limit(dataset: Dataset, limit: Optional[int]) -> Dataset:
        return dataset if limit is None or dataset.num_rows <= limit else dataset.select(range(limit))

    def _score(self, dataset: Dataset) -> dict[str, float]:
        if self.args.task == "category":
            return evaluate_category_prediction(
                self.model, self.tokenizer, dataset, label_column=self.splits.label_column,
                label_names=self.splits.label_names, max_length=self.args.max_length, batch_size=self.args.eval_batch_size,
            )
        return self._lm_loss(self._tokenize(dataset))

    @torch.no_grad()
    def _lm_loss(self, dataset: Dataset) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        total, tokens = torch.zeros((), dtype=torch.float64), 0
        device = next(self.model.parameters()).device
        for start in range(0, dataset.num_rows, self.args.eval_batch_size):
            rows = [dataset[i] for i in range(start, min(start + self.args.eval_batch_size, dataset.num_rows))]
            batch = {k: v.to(device) for k, v in self.collator(rows).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += self.model(**batch).loss.double().cpu() * n
            tokens += n
        self.model.train(was_training)
        loss = float(total / max(tokens, 1))
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def _checkpoint(self, round_index: int, global_state: Mapping[str, torch.Tensor]) -> None:
        """Write round `round_index`'s checkpoint directory, then point `latest_checkpoint` at it atomically."""
        directory = self.run_dir / "checkpoints" / f"round_{round_index:04d}"
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(directory / "global_state.safetensors"))
        save_file(self.aggregator.state_dict() or {}, str(directory / "aggregator_state.safetensors"))
        torch.save(
            {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            directory / "rng_state.pt",
        )
        state = {
            "round": round_index,
            "last_update_round": self.last_update_round,
            "aggregator": self.args.aggregator,
            "aggregator_config": self.aggregator.config.to_dict(),
            "federation_args": dataclasses.asdict(self.args),
        }
        with open(directory / "state.json", "w") as f:
            json.dump(state, f, indent=2, default=str)
        tmp = self.run_dir / f"{LATEST_FILE}.tmp"
        tmp.write_text(directory.name)
        os.replace(tmp, self.run_dir / LATEST_FILE)  # the commit point: a kill before it keeps the previous round
        self._prune(keep=directory.name)

    def _prune(self, keep: str) -> None:
        for old in (self.run_dir / "checkpoints").glob("round_*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        referenced = {f"round_{r:04d}" for r in self.last_update_round.values()}
        for old in (self.run_dir / "rounds").glob("round_*"):
            if old.name not in referenced:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> tuple[int, Optional[dict[str, torch.Tensor]]]:
        latest = self.run_dir / LATEST_FILE
        if not latest.exists():
            return 0, None
        directory = self.run_dir / "checkpoints" / latest.read_text().strip()
        with open(directory / "state.json") as f:
            state = json.load(f)
        if state["aggregator"] != self.args.aggregator:
            raise ValueError(
                f"Cannot resume {self.run_dir}: it was run with aggregator {state['aggregator']!r}, not {self.args.aggregator!r}."
            )
        global_state = load_file(str(directory / "global_state.safetensors"))
        self.aggregator.load_state_dict(load_file(str(directory / "aggregator_state.safetensors")))
        rng = torch.load(directory / "rng_state.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        self.last_update_round = {k: int(v) for k, v in state["last_update_round"].items()}
        return int(state["round"]), global_state

    # -- the run ----------------------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Run (or resume) the federation; returns the per-round metrics (main process; `[]` elsewhere)."""
        main = self.state.is_main_process
        start_round, global_state = (0, None)
        if self.args.resume:
            start_round, global_state = self._load_checkpoint()
        elif main and (self.run_dir / LATEST_FILE).exists():
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
                   initial=start_round, total=self.args.num_rounds, unit="round")
        for round_index in bar:
            global_state, metrics, conflicts = self._run_round(round_index, global_state)
            if main:
                round_logger.log_round(round_index, metrics, conflicts)
                self.history.append({"round": round_index, **metrics})
                shown = {k: round(v, 4) for k, v in metrics.items() if k in ("global_accuracy", "local_accuracy_mean", "global_loss", "train_loss_mean", "conflict_share")}
                bar.set_postfix(shown)
                self._checkpoint(round_index, global_state)
            self.state.wait_for_everyone()
            if self.on_round_end is not None:
                self.on_round_end(round_index, metrics)
        if main:
            round_logger.close()
            self.finalize(global_state)
        self.state.wait_for_everyone()
        return self.history

    def _run_round(self, round_index: int, global_state: dict[str, torch.Tensor]):
        main = self.state.is_main_process
        sampled = self.sample_clients(round_index)
        if main and self.retention_mode == "filtered":
            self._round_dir(round_index).mkdir(parents=True, exist_ok=True)
            save_file(global_state, str(self._round_dir(round_index) / "global_start.safetensors"))
        train_metrics: dict[str, list[float]] = {}
        for client_id in sampled:
            update = self.train_client(client_id, round_index, global_state)
            if update is not None:
                update.save(self._update_dir(round_index, client_id))
                for key in ("train_loss", "last_aux_loss"):
                    if key in update.metrics:
                        train_metrics.setdefault(key, []).append(float(update.metrics[key]))
        self.state.wait_for_everyone()
        updates = [ClientUpdate.load(self._update_dir(round_index, cid)) for cid in sampled]
        result = self.aggregator.aggregate(global_state, updates)
        # Materialise the new global state: the next round must not read the (pruned) update files lazily.
        global_state = {k: v.detach().clone() for k, v in result.global_state.items()}
        for client_id in result.client_ids:
            self.last_update_round[client_id] = round_index
        metrics: dict[str, Any] = {f"server_{k}": v for k, v in result.summary().items()}
        metrics["num_processes"] = self.state.num_processes
        metrics["conflict_share"] = metrics.pop("server_conflict_share", float("nan"))
        metrics["rejected"] = [{"client_id": r.client_id, "reason": r.reason} for r in result.rejected]
        for key, values in train_metrics.items():
            metrics[f"{key.removeprefix('last_')}_mean"] = float(np.mean(values))
        conflicts = {group: d.conflict_share.tolist() for group, d in result.diagnostics.items()}
        last = round_index == self.args.num_rounds
        if main and (round_index % self.args.eval_every == 0 or last):
            metrics.update(self.evaluate(global_state))
        return global_state, metrics, conflicts

    # -- outputs ----------------------------------------------------------------------------------------------------

    def finalize(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, Path]:
        """Write the final global adapter, the clients' personalized adapters, model cards and plots."""
        outputs: dict[str, Path] = {}
        peft_config = dataclasses.replace(self.model.peft_config[self.model.active_adapter], inference_mode=True)
        base_model = self.args.base_model_id or peft_config.base_model_name_or_path
        peft_config.base_model_name_or_path = base_model
        final = self.history[-1] if self.history else {}
        common = self._card_fields(peft_config)
        global_metrics = {k: v for k, v in final.items() if k.startswith(("global_", "local_")) and isinstance(v, float)}
        card = render_model_card("global", base_model, global_metrics, model_name=f"{self.run_dir.name} global adapter",
                                 repo_id=str(self.run_dir / "global_adapter"), **common)
        outputs["global_adapter"] = save_adapter(self.run_dir / "global_adapter", global_state, peft_config, card)
        if self.args.save_client_adapters:
            for index, client_id in enumerate(self.client_ids):
                client_metrics = {
                    k.split("/", 1)[1]: v for k, v in final.items() if k.startswith(f"{client_id}/") and isinstance(v, float)
                }
                card = render_model_card(
                    "client", base_model, client_metrics, model_name=f"{self.run_dir.name} {client_id} adapter",
                    client_id=client_id, repo_id=str(self.run_dir / "clients" / client_id / "adapter"),
                    global_repo_id=str(self.run_dir / "global_adapter"),
                    num_train_samples=self.splits.clients[index]["train"].num_rows,
                    num_test_samples=self.splits.clients[index]["test"].num_rows,
                    retention_lambda=self.retention_lambda, **common,
                )
                save_adapter(self.run_dir / "clients" / client_id / "adapter",
                             self.personalized_state(global_state, client_id), peft_config, card)
            outputs["client_adapters"] = self.run_dir / "clients"
        metrics_plot = plot_metrics({self.args.aggregator: self.run_dir}, self.run_dir / "plots" / "metrics.png",
                                    metrics=self._plotted_metrics())
        heatmap = plot_conflict_heatmap(self.run_dir, self.run_dir / "plots" / "conflict_heatmap.png")
        outputs.update({k: v for k, v in (("metrics_plot", metrics_plot), ("conflict_heatmap", heatmap)) if v is not None})
        outputs["metrics"] = self.run_dir / "metrics.jsonl"
        return outputs

    def _plotted_metrics(self) -> Sequence[str]:
        if self.args.task == "category":
            return ("global_accuracy", "local_accuracy_mean", "train_loss_mean")
        return ("global_loss", "local_loss_mean", "train_loss_mean")

    def _card_fields(self, peft_config) -> dict[str, Any]:
        partition = self.splits.config
        scheme = partition.scheme + (f" (alpha={partition.alpha})" if partition.scheme == "dirichlet" else "")
        targets = peft_config.target_modules
        return {
            "aggregator": self.args.aggregator,
            "aggregator_config": json.dumps(self.aggregator.config.to_dict()),
            "num_experts": peft_config.num_experts,
            "top_k": peft_config.top_k,
            "r": peft_config.r,
            "target_modules": ", ".join(sorted(targets)) if not isinstance(targets, str) else targets,
            "num_clients": len(self.client_ids),
            "num_rounds": self.args.num_rounds,
            "clients_per_round": len(self.sample_clients(1)),
            "partition": scheme,
            "task": "category prediction (instruction-style)" if self.args.task == "category" else "causal LM",
            "final_round": self.history[-1]["round"] if self.history else 0,
            "local_epochs": self.training_args.num_train_epochs,
            "learning_rate": self.training_args.learning_rate,
        }
