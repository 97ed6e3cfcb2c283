"""A finished federation's outputs: the global and per-client adapters with model cards, and the plots."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..hub import save_adapter
from ..hub.cards import render_card
from ..hub.push import OUTPUTS_FILE
from ..reporting import plot_conflict_heatmap, plot_metrics

if TYPE_CHECKING:
    from .loop import FederatedSimulation


#: What a checkpoint holds besides the states for its round to be published ([`checkpoint_files`]).
CHECKPOINT_ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_RECORD = "outputs_record.json"
#: A card's results when its round was not evaluated (`eval_every`): said, never invented.
NOT_EVALUATED = {"evaluation": "not recorded for this round (it was not evaluated, or its metrics were not kept)"}


def adapter_config(simulation: FederatedSimulation):
    """The published adapters' peft config: the model's, with `inference_mode=True` and the base model id set."""
    model = simulation.model
    peft_config = dataclasses.replace(model.peft_config[model.active_adapter], inference_mode=True)
    peft_config.base_model_name_or_path = simulation.args.base_model_id or peft_config.base_model_name_or_path
    return peft_config


def outputs_record(simulation: FederatedSimulation, peft_config) -> dict[str, Any]:
    """The `outputs.json` record of the simulation's last round: which round, base model, clients, and every model
    card's fields (metrics of that round, or [`NOT_EVALUATED`])."""
    run_dir, args = simulation.run_dir, simulation.args
    final = simulation.history[-1] if simulation.history else {}
    common = card_fields(simulation, peft_config)
    record: dict[str, Any] = {
        "round": common["final_round"], "base_model": peft_config.base_model_name_or_path, "aggregator": args.aggregator,
        "task_type": simulation.task.task_type, "dataset": simulation.args.dataset_id,
        "clients": list(simulation.client_ids) if args.save_client_adapters else [],
    }
    plotted = [f"global_{m}" for m in simulation.task.headline_metrics[:1]]
    record["plotted_metrics"] = plotted + [f"local_{m}_mean" for m in simulation.task.headline_metrics[:1]] + ["train_loss_mean"]
    global_metrics = {k: v for k, v in final.items() if k.startswith(("global_", "local_")) and isinstance(v, float)}
    record["cards"] = {"global": {"metrics": global_metrics or dict(NOT_EVALUATED),
                                  "model_name": f"{run_dir.name} global adapter",
                                  "clients_repo_id": str(run_dir / "clients") if args.save_client_adapters else None,
                                  **common}, "clients": {}}
    for index, client_id in enumerate(record["clients"]):
        client_metrics = {
            k.split("/", 1)[1]: v for k, v in final.items() if k.startswith(f"{client_id}/") and isinstance(v, float)
        }
        client = simulation.splits.clients[index]
        record["cards"]["clients"][client_id] = {
            "metrics": client_metrics or dict(NOT_EVALUATED), "model_name": f"{run_dir.name} {client_id} adapter",
            "client_id": client_id, "num_train_samples": client["train"].num_rows,
            "num_test_samples": client["test"].num_rows,
            "retention_lambda": simulation.client_config(final.get("round", args.num_rounds)).retention_lambda,
            **common,
        }
    return record


def checkpoint_files(simulation: FederatedSimulation) -> dict[str, bytes]:
    """What a checkpoint of the simulation's last round needs, besides the states, for its adapters to be exported
    without a model ([`~fcmoe_hf.simulation.export.export_checkpoint`]): the adapter's `adapter_config.json` (as
    [`write_outputs`] writes it) and the `outputs.json` record of that round (the model cards' fields)."""
    peft_config = adapter_config(simulation)
    with tempfile.TemporaryDirectory() as tmp:
        peft_config.save_pretrained(tmp)
        config = (Path(tmp) / CHECKPOINT_ADAPTER_CONFIG).read_bytes()
    record = outputs_record(simulation, peft_config)
    return {CHECKPOINT_ADAPTER_CONFIG: config, CHECKPOINT_RECORD: json.dumps(record, indent=2, default=str).encode()}


def write_outputs(simulation: FederatedSimulation, global_state: Mapping[str, torch.Tensor]) -> dict[str, Path]:
    """Write the final global adapter, the clients' personalized adapters, their model cards and the plots.

    Returns:
        `dict[str, Path]`: what was written (`global_adapter`, `client_adapters`, `metrics_plot`, `conflict_heatmap`,
        `metrics`).
    """
    run_dir = simulation.run_dir
    outputs: dict[str, Path] = {}
    peft_config = adapter_config(simulation)
    record = outputs_record(simulation, peft_config)
    card = render_card(record, "global", repo_id=str(run_dir / "global_adapter"))
    outputs["global_adapter"] = save_adapter(run_dir / "global_adapter", global_state, peft_config, card)
    for client_id in record["clients"]:
        card = render_card(record, client_id, repo_id=str(run_dir / "clients" / client_id / "adapter"),
                           global_repo_id=str(run_dir / "global_adapter"))
        save_adapter(
            run_dir / "clients" / client_id / "adapter", simulation.personalized_state(global_state, client_id),
            peft_config, card,
        )
    if record["clients"]:
        outputs["client_adapters"] = run_dir / "clients"
    outputs.update(write_plots(run_dir, run_dir, simulation.args.aggregator, record["plotted_metrics"]))
    outputs["metrics"] = run_dir / "metrics.jsonl"
    # Written last, atomically: which round the adapters above hold, and their cards' fields (what
    # `fcmoe_hf.hub.push_federated_adapters` reads to publish them).
    tmp = run_dir / f"{OUTPUTS_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, run_dir / OUTPUTS_FILE)
    outputs["outputs"] = run_dir / OUTPUTS_FILE
    return outputs


def write_plots(run_dir: Path, output_dir: Path, label: str, metrics: list[str]) -> dict[str, Path]:
    """The metrics-per-round plot and the conflict heatmap of `run_dir`'s logs, under `output_dir/plots/`."""
    metrics_plot = plot_metrics({label: run_dir}, output_dir / "plots" / "metrics.png", metrics=metrics)
    heatmap = plot_conflict_heatmap(run_dir, output_dir / "plots" / "conflict_heatmap.png")
    return {k: v for k, v in (("metrics_plot", metrics_plot), ("conflict_heatmap", heatmap)) if v is not None}


def card_fields(simulation: FederatedSimulation, peft_config) -> dict[str, Any]:
    """The federation's configuration as the model card templates' fields."""
    partition = simulation.splits.config
    scheme = partition.scheme + (f" (alpha={partition.alpha})" if partition.scheme == "dirichlet" else "")
    targets = peft_config.target_modules
    return {
        "aggregator": simulation.args.aggregator,
        "aggregator_config": json.dumps(simulation.aggregator.config.to_dict()),
        "num_experts": peft_config.num_experts,
        "top_k": peft_config.top_k,
        "r": peft_config.r,
        "target_modules": ", ".join(sorted(targets)) if not isinstance(targets, str) else targets,
        "num_clients": len(simulation.client_ids),
        "num_rounds": simulation.args.num_rounds,
        "clients_per_round": len(simulation.sample_clients(1)),
        "partition": scheme,
        "task": simulation.task.model_card_description,
        "final_round": simulation.history[-1]["round"] if simulation.history else 0,
        "local_epochs": simulation.training_args.num_train_epochs,
        "learning_rate": simulation.training_args.learning_rate,
        # Bytes communicated over the rounds of this run: the clients' updates up, the global state down.
        "bytes_uploaded": format_bytes(sum(
            h.get("bytes_uploaded_per_client_mean") or 0 for h in simulation.history
        ) * len(simulation.sample_clients(1))),
        "bytes_downloaded": format_bytes(sum(
            h.get("bytes_downloaded_per_client") or 0 for h in simulation.history
        ) * len(simulation.sample_clients(1))),
    }


def format_bytes(count: float) -> str:
    """`count` bytes, human-readable (`"12.3 MB"`)."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
