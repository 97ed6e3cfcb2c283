"""What a resumed run must agree on with its checkpoint, and what it may change.

A checkpoint records the run's configuration ([`run_config`]: the federation, the aggregator's resolved config, the
partition, a digest of the clients' data and the local training's hyperparameters). On `--resume` the configuration
of the new invocation is compared with it ([`config_differences`]) and a difference is refused, naming every field,
unless `FederationArguments.resume_allow_config_change=True` (then it is logged and the new configuration is recorded
by the next checkpoint). Fields not recorded may change freely on resume: `num_rounds` (extending a run), evaluation
(`eval_every`, `eval_batch_size`, `max_*_eval_samples`), `save_client_adapters`, `dataset_id`, logging and Hub
publishing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..hub.push import OUTPUTS_FILE
from ..reporting import METRICS_FILE, read_jsonl
from .checkpoints import STATE_FILE, CheckpointStore

if TYPE_CHECKING:
    from .loop import FederatedSimulation

logger = logging.getLogger(__name__)

#: `FederationArguments` fields that decide the federation's result, compared on resume.
FEDERATION_FIELDS = ("aggregator", "fraction_fit", "min_fit_clients", "task", "max_length", "base_model_id")
#: `TrainingArguments` fields of the clients' local training, compared on resume (`seed` seeds sampling and training).
TRAINING_FIELDS = (
    "seed", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "max_grad_norm",
)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def data_digest(summary: Mapping[str, Any]) -> str:
    """A digest of the clients' data as the partition summary describes it (sizes and label counts per client)."""
    body = {k: v for k, v in summary.items() if k != "config"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_config(simulation: FederatedSimulation) -> dict[str, Any]:
    """The configuration a checkpoint records and a resume must match (flat, JSON-ready; keys are the fields' names).

    `aggregator_config` is the aggregator's resolved config (defaults included), the partition's fields are
    [`~fcmoe_hf.data.PartitionConfig`]'s, and `client_data` is a digest of every client's train and local test sizes
    and label counts (it changes with the dataset or `max_train_samples_per_client`).
    """
    args, training = simulation.args, simulation.training_args
    config: dict[str, Any] = {name: getattr(args, name) for name in FEDERATION_FIELDS}
    config["aggregator_config"] = simulation.aggregator.config.to_dict()
    config.update(dataclasses.asdict(simulation.splits.config))
    config["client_data"] = data_digest(simulation.splits.summary())
    config.update({name: getattr(training, name, None) for name in TRAINING_FIELDS})
    return _jsonable(config)


#: Aggregator config fields added after checkpoints began recording configurations -> the behaviour a checkpoint
#: that does not record the field ran with. Any other unrecorded field is taken to have run with its default.
BEHAVIOUR_BEFORE_FIELD: dict[str, Any] = {"bounds_action": "reject"}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`field: checkpoint value -> current value` for every field that differs (aggregator config keys as
    `aggregator_config.<key>`).

    An aggregator config field the checkpoint does not record was added by a later fcmoe_hf. It is compared with the
    behaviour the checkpoint ran with ([`BEHAVIOUR_BEFORE_FIELD`]), so a default that changed what the run does is a
    difference; a field whose default keeps the old behaviour is not ([`check_resume_config`] logs it)."""
    current = _jsonable(current)
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if key == "aggregator_config" and isinstance(old, dict) and isinstance(new, dict):
            recorded = {**{k: v for k, v in BEHAVIOUR_BEFORE_FIELD.items() if k in new}, **old}
            for k in sorted(recorded):
                if recorded[k] != new.get(k, "<absent>"):
                    before = repr(recorded[k]) if k in old else f"{recorded[k]!r} (not recorded: the behaviour then)"
                    lines.append(f"aggregator_config.{k}: {before} -> {new.get(k, '<absent>')!r}")
        elif old != new:
            lines.append(f"{key}: {old!r} -> {new!r}")
    return lines


def check_resume_config(simulation: FederatedSimulation, state: Mapping[str, Any], checkpoint: str) -> None:
    """Refuse to resume `simulation` from a checkpoint with another configuration, naming every differing field.

    Raises:
        `ValueError`: the configurations differ and `resume_allow_config_change` is not set, or the checkpoint's round
            is past `num_rounds` (the run did more rounds than asked for: nothing to run).
    """
    round_index, num_rounds = int(state["round"]), simulation.args.num_rounds
    if round_index > num_rounds:
        raise ValueError(
            f"Cannot resume {simulation.run_dir}: its checkpoint {checkpoint} holds round {round_index}, past "
            f"num_rounds={num_rounds}; nothing would run. Pass num_rounds >= {round_index} to extend the run."
        )
    if state.get("aggregator") != simulation.args.aggregator:  # its state would not load into another aggregator
        raise ValueError(
            f"Cannot resume {simulation.run_dir}: it was run with aggregator {state.get('aggregator')!r}, not "
            f"{simulation.args.aggregator!r} (checkpoint {checkpoint})."
        )
    saved = state.get("run_config")
    if saved is None:  # a checkpoint from before configurations were recorded: only the aggregator is known
        saved = {"aggregator": state.get("aggregator")}
        current = {"aggregator": simulation.args.aggregator}
        logger.warning("%s predates recorded run configurations: only its aggregator is compared.", checkpoint)
    else:
        current = run_config(simulation)
    # Unrecorded fields with a known earlier behaviour are compared (config_differences), not merely logged.
    added = sorted(set(current.get("aggregator_config") or {}) - set(saved.get("aggregator_config") or {})
                   - set(BEHAVIOUR_BEFORE_FIELD))
    if added and isinstance(saved.get("aggregator_config"), dict):
        logger.warning("%s does not record aggregator_config field(s) %s (added since it was written); resuming "
                       "with their current values.", checkpoint, ", ".join(added))
    differences = config_differences(saved, current)
    if not differences:
        return
    listed = "\n  ".join(differences)
    if simulation.args.resume_allow_config_change:
        logger.warning("Resuming %s with a changed configuration (resume_allow_config_change):\n  %s", checkpoint, listed)
        return
    raise ValueError(
        f"Cannot resume {simulation.run_dir} from {checkpoint}: the configuration differs from the checkpoint's "
        f"in:\n  {listed}\nRun with the checkpoint's values, or pass --resume_allow_config_change true to continue "
        "with the new ones."
    )


def referenced_rounds(store: CheckpointStore, last_update_round: Mapping[str, int]) -> set[str]:
    """The `rounds/round_NNNN` directories (client updates, `global_start`) that `last_update_round` or any checkpoint
    kept in `store` refers to: they must outlive the checkpoints, the fallback one included."""
    rounds = set(last_update_round.values())
    for directory in store._round_dirs():
        try:
            state = json.loads((directory / STATE_FILE).read_text())
            rounds.update(int(r) for r in state.get("last_update_round", {}).values())
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # an incomplete or damaged checkpoint is never resumed from
    return {f"round_{r:04d}" for r in rounds}


def restore_history(run_dir: Path, last_round: int) -> list[dict[str, Any]]:
    """The per-round metrics of rounds `1..last_round` as `metrics.jsonl` holds them (what the run's `history` held),
    so that a resumed run's cards, byte counts and round-dependent client configs are an uninterrupted run's."""
    rows = read_jsonl(run_dir / METRICS_FILE)
    return [r for r in rows if 1 <= int(r.get("round", 0)) <= last_round]


def finished_message(run_dir: Path, round_index: int, num_rounds: int) -> Optional[str]:
    """Why a resume has nothing to do (the checkpoint holds the last round and its outputs are written), or `None`.

    A run killed after checkpointing its last round but before its outputs were complete resumes to write them.
    """
    if round_index < num_rounds:
        return None
    try:
        written = json.loads((run_dir / OUTPUTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(written, dict) or written.get("round") != round_index:
        return None
    return (
        f"{run_dir}: the run already finished at round {round_index} of num_rounds {num_rounds}; nothing to do (its "
        f"adapters and cards are left as they are). Pass a larger num_rounds to extend it."
    )
