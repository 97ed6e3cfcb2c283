"""The adapters of a run's latest checkpointed round, materialised without a model.

A run killed after round `N` (with `hub_strategy="end"` nothing was written but the checkpoints) can still publish
round `N`: its checkpoint holds the global state, the adapter's `adapter_config.json` and the model cards' fields, and
the run directory keeps every client's last update. [`export_checkpoint`] writes from them the directory
[`~fcmoe_hf.simulation.outputs.write_outputs`] would have written for round `N` (same tensors, bit for bit): the global
adapter, each client's personalized adapter (global state plus lambda x its retained residual, from the same
[`~fcmoe_hf.federated.retained_start`] the federation uses), the cards, the plots of rounds `1..N` and `outputs.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..federated import ClientUpdate, build_aggregator, retained_start
from ..hub.cards import render_card
from ..hub.push import OUTPUTS_FILE
from ..reporting import DIAGNOSTICS_FILE, METRICS_FILE, read_jsonl
from .checkpoints import CheckpointError, CheckpointStore, check_client_id
from .outputs import CHECKPOINT_ADAPTER_CONFIG, CHECKPOINT_RECORD, NOT_EVALUATED, write_plots


def latest_checkpoint_round(run_dir: str | os.PathLike) -> Optional[int]:
    """The round of `run_dir`'s latest complete checkpoint, or `None` when it has none."""
    return CheckpointStore(Path(run_dir)).latest_round()


def personalized_checkpoint_state(
    run_dir: Path,
    global_state: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    client_id: str,
) -> Mapping[str, torch.Tensor]:
    """Client `client_id`'s personalized adapter after the checkpointed round `state["round"]`, computed as
    [`~fcmoe_hf.simulation.FederatedSimulation.personalized_state`] does: the global state, plus lambda x the retained
    residual of its last update (`rounds/round_NNNN/updates/<client_id>/`) when it has one.

    Args:
        run_dir (`Path`): the run directory.
        global_state (`Mapping[str, torch.Tensor]`): the checkpoint's global state.
        state (`Mapping[str, Any]`): the checkpoint's `state.json` (round, aggregator and its config, the clients'
            last update rounds and update scales).
        client_id (`str`): the client.
    """
    check_client_id(client_id, f"{run_dir}: client to personalize")
    aggregator = build_aggregator(state["aggregator"], state.get("aggregator_config"))
    config = aggregator.configure_client(int(state["round"]) + 1)
    last_round = state.get("last_update_round", {}).get(client_id)
    if last_round is None or config.retention_lambda == 0:
        return global_state
    round_dir = run_dir / "rounds" / f"round_{int(last_round):04d}"
    previous = ClientUpdate.load(round_dir / "updates" / client_id)
    previous_global = None
    if config.retention_mode == "filtered":
        path = round_dir / "global_start.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: 'filtered' retention of {client_id} needs it.")
        previous_global = load_file(str(path))
    return retained_start(
        global_state, previous.deltas, lam=config.retention_lambda, mode=config.retention_mode,
        previous_global=previous_global, scale=float(state.get("update_scales", {}).get(client_id, 1.0)),
    )


def _write_adapter(directory: Path, tensors: Mapping[str, torch.Tensor], config: bytes, card) -> Path:
    # As `fcmoe_hf.hub.save_adapter` writes it, with the checkpoint's config bytes (no peft config object needed).
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (directory / CHECKPOINT_ADAPTER_CONFIG).write_bytes(config)
    card.save(str(directory / "README.md"))
    return directory


def _fallback_record(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    # A checkpoint with an adapter config but no cards' fields: what state.json and the config say, no metrics.
    targets = config.get("target_modules")
    common = {
        "aggregator": state["aggregator"], "aggregator_config": json.dumps(state.get("aggregator_config")),
        "num_experts": config.get("num_experts"), "top_k": config.get("top_k"), "r": config.get("r"),
        "target_modules": ", ".join(sorted(targets)) if isinstance(targets, list) else targets,
        "final_round": int(state["round"]), "num_rounds": state.get("federation_args", {}).get("num_rounds"),
        "num_clients": "unknown", "clients_per_round": "unknown", "partition": "unknown", "task": "unknown",
        "bytes_uploaded": "unknown", "bytes_downloaded": "unknown",
    }
    clients = sorted(state.get("last_update_round", {}))
    return {
        "round": int(state["round"]), "base_model": config.get("base_model_name_or_path"), "aggregator": state["aggregator"],
        "task_type": config.get("task_type"), "dataset": state.get("federation_args", {}).get("dataset_id"),
        "clients": clients, "plotted_metrics": [],
        "cards": {"global": {"metrics": dict(NOT_EVALUATED), "model_name": "global adapter", **common},
                  "clients": {c: {"metrics": dict(NOT_EVALUATED), "model_name": f"{c} adapter", "client_id": c,
                                  "num_train_samples": "unknown", "num_test_samples": "unknown",
                                  "retention_lambda": "unknown", **common} for c in clients}},
    }


def export_checkpoint(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    round: Optional[int] = None,
    clients: bool = True,
) -> dict[str, Any]:
    """Write the adapters of `run_dir`'s latest checkpointed round into `output_dir`, laid out as a finished run's.

    `output_dir` gets `global_adapter/`, `clients/<client_id>/adapter/` (with `clients=True`), their model cards,
    `plots/` (from the run's logs up to that round) and `outputs.json`: what
    [`~fcmoe_hf.hub.push_federated_adapters`] publishes. The tensors are those `write_outputs` writes for that round.
    Only the latest checkpoint's round is exported.

    Args:
        run_dir (`str` or `os.PathLike`): a run directory of [`~fcmoe_hf.simulation.FederatedSimulation`].
        output_dir (`str` or `os.PathLike`): where to write (created; existing adapter files are replaced).
        round (`int`, *optional*): the round expected; a `ValueError` if the latest checkpoint holds another one.
        clients (`bool`, *optional*, defaults to `True`): also write the clients' personalized adapters.

    Returns:
        `dict[str, Any]`: the `outputs.json` record written (round, base model, clients, the cards' fields).

    Raises:
        `FileNotFoundError`: if `run_dir` has no checkpoint, or one written before checkpoints kept the adapter's
            config.
        [`~fcmoe_hf.simulation.checkpoints.CheckpointError`]: the latest checkpoint fails its check (a file missing,
            truncated, altered or holding non-finite values, or a client id that is not a plain name; the message
            names the file and the id). Nothing is written then.
    """
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    store = CheckpointStore(run_dir)
    directory = store.latest()
    if directory is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint (no latest_checkpoint): there is no round to export.")
    # Checked as a resume checks it (checksums, finite values): a damaged checkpoint is never published.
    state, global_state, *_ = store.read(directory)
    checkpoint_round = int(state["round"])
    if round is not None and round != checkpoint_round:
        raise ValueError(
            f"{run_dir}'s latest checkpoint holds round {checkpoint_round}, not round {round}: only the latest "
            "checkpoint is exported, and earlier rounds are available only where they were pushed (tags round-<N>)."
        )
    config_path = directory / CHECKPOINT_ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: this checkpoint predates checkpoints that keep the adapter's config. Resume the "
            "run (--resume) to checkpoint its next round, or finish it."
        )
    config = config_path.read_bytes()
    record_path = directory / CHECKPOINT_RECORD
    record = (json.loads(record_path.read_text()) if record_path.is_file()
              else _fallback_record(state, json.loads(config)))
    # Client ids become paths (clients/<client_id>/): each is checked before anything is written.
    source = record_path if record_path.is_file() else directory / "state.json"
    if not isinstance(record.get("clients"), list):
        raise CheckpointError(f"{source}: 'clients' is not a list of client ids.")
    for client_id in record["clients"]:
        check_client_id(client_id, f"{source}: clients")
    if not clients:
        record["clients"], record["cards"]["clients"] = [], {}
        record["cards"]["global"]["clients_repo_id"] = None
    global_dir = output_dir / "global_adapter"
    _write_adapter(global_dir, global_state, config, render_card(record, "global", repo_id=str(global_dir)))
    for client_id in record["clients"]:
        adapter_dir = output_dir / "clients" / client_id / "adapter"
        card = render_card(record, client_id, repo_id=str(adapter_dir), global_repo_id=str(global_dir))
        _write_adapter(adapter_dir, personalized_checkpoint_state(run_dir, global_state, state, client_id), config, card)
    # The plots of rounds 1..N only: a run killed between logging a round and checkpointing it has logged one more.
    output_dir.mkdir(parents=True, exist_ok=True)
    logs = output_dir / "logs"
    logs.mkdir(exist_ok=True)
    for name in (METRICS_FILE, DIAGNOSTICS_FILE):
        rows = [r for r in read_jsonl(run_dir / name) if int(r.get("round", 0)) <= checkpoint_round]
        (logs / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_plots(logs, output_dir, state["aggregator"], record.get("plotted_metrics") or [])
    (output_dir / OUTPUTS_FILE).write_text(json.dumps(record, indent=2, default=str))
    return record
