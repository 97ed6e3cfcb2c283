"""How one cell of the paper protocol runs (`paper_protocol.py` runs the grid): the federated methods through
[`~fcmoe_hf.simulation.FederatedSimulation`] (with an attack and the defences when asked), the local-only and
centralized bounds, and Flower's own strategies through fcmoe_hf's Flower app. Every function takes the grid's
`Protocol` and returns the cell's per-round records."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

#: method -> (aggregator, aggregator config). `local` and `centralized` are run without a server.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "fedprox": ("fedprox", {}),
    "fedmoe": ("fedmoe", {}),
    "pfl_moe": ("pfl_moe", {}),
    "fedalign_moe": ("fedalign_moe", {}),
    "fcmoe": ("fcmoe", {}),
    "fcmoe_no_projection": ("fcmoe", {"use_projection": False}),
    "fcmoe_no_retention": ("fcmoe", {"use_retention": False}),
    "fcmoe_no_importance": ("fcmoe", {"use_importance": False}),
    "local": ("fedavg", {}),
    "centralized": ("fedavg", {}),
    # Flower's own strategies, run through fcmoe_hf's Flower app (a peer's implementation of the baselines, not ours).
    # FedProx gets our default mu (Flower's is 0); FedAdam a server learning rate sized for LoRA deltas, tau as ours.
    "flwr_fedavg": ("flwr:fedavg", {}),
    "flwr_fedprox": ("flwr:fedprox", {"proximal_mu": 0.01}),
    "flwr_fedadam": ("flwr:fedadam", {"eta": 1e-2, "tau": 1e-3}),
}


#: attack scenario -> (attacked client, what it does to its update every round). One client of ten attacks.
ATTACKS: dict[str, tuple[str, str]] = {
    "sign_flip_x100": ("client_3", "sends -100 x its honest update"),
    "inflate_counts_x1e6": ("client_7", "claims 10**6 x its activation counts and num_samples"),
}

#: The server's defences: "on" the defaults (counts beyond the round's bounds capped), "reject" the defaults but such
#: an update rejected, "off" no norm bound and no round bounds (the static checks on update metadata stay on).
DEFENCES: dict[str, dict[str, Any]] = {
    "on": {}, "reject": {"bounds_action": "reject"}, "off": {"norm_bound_factor": None, "enforce_bounds": False},
}


def attack_transform(attack: str):
    from fcmoe_hf.federated.attacks import attack_clients, inflate_counts, sign_flip_update

    client, _ = ATTACKS[attack]
    if attack == "sign_flip_x100":
        return attack_clients({client: lambda update: sign_flip_update(update, 100.0)})
    return attack_clients({client: lambda update: inflate_counts(update, 10**6)})


def splits_for(protocol, alpha: float, seed: int):
    from fcmoe_hf.data import PartitionConfig, load_bundled_fortunes, load_text_dataset, partition_dataset
    from fcmoe_hf.simulation.round_metrics import first_rows

    corpus = load_bundled_fortunes() if protocol.dataset is None else load_text_dataset(protocol.dataset)
    config = PartitionConfig(
        num_clients=protocol.num_clients, scheme="dirichlet", alpha=alpha, partition_seed=seed,
        min_partition_size=protocol.min_partition_size, local_test_fraction=protocol.local_test_fraction,
    )
    splits = partition_dataset(corpus, config)
    for client in splits.clients:
        client["train"] = first_rows(client["train"], protocol.max_train_samples_per_client)
    return splits


def peft_model(protocol, task, seed: int):
    from peft import get_peft_model
    from transformers import set_seed

    from fcmoe_hf import MoELoraConfig

    set_seed(seed)
    model, tokenizer = task.load_model(protocol.model)
    set_seed(seed)
    config = MoELoraConfig(
        task_type=task.task_type, r=protocol.r, lora_alpha=protocol.lora_alpha, num_experts=protocol.num_experts,
        top_k=protocol.top_k,
    )
    return get_peft_model(model, config), tokenizer


def simulation_for(protocol, model, tokenizer, splits, task, aggregator, aggregator_config, seed, run_dir, eval_every=1):
    import torch

    from fcmoe_hf import FederatedSimulation, FederationArguments
    from fcmoe_hf.trainer import FederatedMoETrainingArguments

    args = FederationArguments(
        aggregator=aggregator, aggregator_config=aggregator_config, num_rounds=protocol.num_rounds, task=protocol.task,
        max_length=protocol.max_length, eval_batch_size=64, eval_every=eval_every,
        max_global_eval_samples=protocol.max_global_eval_samples, max_local_eval_samples=protocol.max_local_eval_samples,
        save_client_adapters=False, min_fit_clients=1,
    )
    training_args = FederatedMoETrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=protocol.batch_size, num_train_epochs=1,
        learning_rate=protocol.learning_rate, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10, seed=seed,
        use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", disable_tqdm=True,
    )
    return FederatedSimulation(model, tokenizer, splits, args, training_args, task=task)


def compact(history: list[dict[str, Any]], client_ids: list[str]) -> list[dict[str, Any]]:
    """Per-round metrics without the per-client keys, plus the clients' local accuracies as one list."""
    rounds = []
    for record in history:
        out = {k: v for k, v in record.items() if "/" not in k}
        local = [record.get(f"{cid}/local_accuracy") for cid in client_ids]
        if any(v is not None for v in local):
            out["local_accuracy_per_client"] = local
        rounds.append(out)
    return rounds


def federated(protocol, method, alpha, seed, workdir, attack=None, defences="on") -> list[dict[str, Any]]:
    from fcmoe_hf.tasks import build_task

    splits = splits_for(protocol, alpha, seed)
    task = build_task(protocol.task, label_column=splits.label_column, label_names=splits.label_names, max_length=protocol.max_length)
    model, tokenizer = peft_model(protocol, task, seed)
    aggregator, overrides = METHODS[method]
    config = dict(overrides)
    if aggregator == "fcmoe" and config.get("use_retention", True):
        config["retention_lambda"] = protocol.retention_lambda
    config.update(DEFENCES[defences])
    simulation = simulation_for(protocol, model, tokenizer, splits, task, aggregator, config or None, seed, workdir / "run")
    if attack is not None:
        simulation.update_transform = attack_transform(attack)
    return compact(simulation.run(), simulation.client_ids)


def local_only(protocol, alpha, seed, workdir) -> list[dict[str, Any]]:
    """Each client alone for the same rounds: a one-client federation per client, averaged round by round."""
    from fcmoe_hf.data import ClientSplits
    from fcmoe_hf.tasks import build_task
    from fcmoe_hf.trainer import get_federated_state, set_federated_state

    splits = splits_for(protocol, alpha, seed)
    task = build_task(protocol.task, label_column=splits.label_column, label_names=splits.label_names, max_length=protocol.max_length)
    model, tokenizer = peft_model(protocol, task, seed)
    initial = get_federated_state(model)
    per_client = []
    for i, client in enumerate(splits.clients):
        set_federated_state(model, initial)
        alone = ClientSplits([client], splits.global_test, splits.label_column, splits.label_names, splits.config)
        simulation = simulation_for(protocol, model, tokenizer, alone, task, "fedavg", None, seed, workdir / f"client_{i}")
        per_client.append(simulation.run())
    rounds = []
    for r in range(protocol.num_rounds):
        records = [history[r] for history in per_client]
        out = {"round": r + 1}
        for key in records[0]:
            if key.startswith("global_") and isinstance(records[0][key], float):
                out[key] = float(np.mean([rec[key] for rec in records]))
        local = [rec["client_0/local_accuracy"] for rec in records]
        out.update(local_accuracy_mean=float(np.mean(local)), local_accuracy_min=float(np.min(local)),
                   local_accuracy_max=float(np.max(local)), local_accuracy_per_client=local)
        out["train_loss_mean"] = float(np.mean([rec.get("train_loss_mean", np.nan) for rec in records]))
        rounds.append(out)
    return rounds


def centralized(protocol, alpha, seed, workdir) -> list[dict[str, Any]]:
    """One model on the union of the clients' training data; its local accuracy on every client's test split."""
    from datasets import DatasetDict, concatenate_datasets

    from fcmoe_hf.data import ClientSplits
    from fcmoe_hf.simulation.round_metrics import first_rows
    from fcmoe_hf.tasks import build_task

    splits = splits_for(protocol, alpha, seed)
    task = build_task(protocol.task, label_column=splits.label_column, label_names=splits.label_names, max_length=protocol.max_length)
    model, tokenizer = peft_model(protocol, task, seed)
    union = DatasetDict(
        train=concatenate_datasets([c["train"] for c in splits.clients]),
        test=concatenate_datasets([c["test"] for c in splits.clients]),
    )
    central = ClientSplits([union], splits.global_test, splits.label_column, splits.label_names, splits.config)
    local_tests = [c["test"] for c in splits.clients]
    per_round_local: list[list[float]] = []

    simulation = simulation_for(protocol, model, tokenizer, central, task, "fedavg", None, seed, workdir / "run")

    def local_accuracies(round_index, metrics):
        limit = protocol.max_local_eval_samples
        per_round_local.append([
            task.evaluate(model, first_rows(t, limit), batch_size=64)["accuracy"]
            for t in local_tests
        ])

    simulation.on_round_end = local_accuracies
    history = simulation.run()
    rounds = []
    for record, local in zip(history, per_round_local):
        out = {k: v for k, v in record.items() if "/" not in k and not k.startswith("local_")}
        out.update(local_accuracy_mean=float(np.mean(local)), local_accuracy_min=float(np.min(local)),
                   local_accuracy_max=float(np.max(local)), local_accuracy_per_client=local)
        rounds.append(out)
    return rounds


def flower(protocol, method, alpha, seed, workdir) -> list[dict[str, Any]]:
    """The cell as a Flower simulation (`run_flower_simulation`: the same model, data, partition and seeds as
    [`federated`], clients as Ray actors given one CPU in all, so they train one after another)."""
    from fcmoe_hf.flower import FlowerRunConfig, run_flower_simulation

    strategy, overrides = METHODS[method]
    config = FlowerRunConfig(
        aggregator=strategy, aggregator_config=json.dumps(overrides) if overrides else "",
        num_server_rounds=protocol.num_rounds, num_clients=protocol.num_clients,
        min_train_clients=protocol.num_clients, min_available_clients=protocol.num_clients,
        model=protocol.model, task=protocol.task, dataset=protocol.dataset or "fortunes",
        partition_scheme="dirichlet", alpha=alpha, partition_seed=seed, seed=seed,
        min_partition_size=protocol.min_partition_size, local_test_fraction=protocol.local_test_fraction,
        max_train_samples_per_client=protocol.max_train_samples_per_client or 0, max_length=protocol.max_length,
        moe_num_experts=protocol.num_experts, moe_top_k=protocol.top_k, moe_r=protocol.r, moe_lora_alpha=protocol.lora_alpha,
        batch_size=protocol.batch_size, learning_rate=protocol.learning_rate, lr_scheduler_type="constant",
        training_args='{"warmup_steps": 0, "logging_steps": 10}', eval_batch_size=64,
        max_global_eval_samples=protocol.max_global_eval_samples or 0,
        max_local_eval_samples=protocol.max_local_eval_samples or 0, save_client_adapters=False,
        run_dir=str(workdir / "run"),
    )
    history = run_flower_simulation(config, num_cpus_per_client=1, ray_init_args={"num_cpus": 1})
    return compact(history, [f"client_{i}" for i in range(protocol.num_clients)])
