"""FC-MoE's experimental protocol (arXiv:2606.15625, Section V), scaled to this machine, for every method side by side.

Runs a grid of cells (method x alpha x seed): 10 clients, all in every round, Dirichlet label skew (per class, split by
Dir(alpha), flwr-datasets' `DirichletPartitioner`), one local epoch per round, top-1 routing over 16 MoE-LoRA experts,
lambda = 0.5, sequence classification with all-MiniLM-L6-v2's real weights on the bundled fortunes corpus (10 domains).
Every method gets the same learning rate and everything else. Each finished cell appends one JSON record (every round's
metrics) to `benchmarks/results/paper_protocol.jsonl`; a rerun skips finished cells; `--report` rebuilds every table
and plot from that file alone (`paper_report.py`).

    python benchmarks/paper_protocol.py --lr-sweep 2e-4,5e-4,1e-3,2e-3     # FedAvg, alpha 0.5, records the sweep
    python benchmarks/paper_protocol.py --alphas 0.1 --seeds 0,1,2           # the alpha = 0.1 cells first
    python benchmarks/paper_protocol.py --report

Baselines outside the aggregator interface: `local` (every client trains alone on its data for the same rounds; global
metrics are the mean over clients of their own model on the global test set) and `centralized` (one model trained on
the union of the clients' training data; local metrics are that model on each client's local test split).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "paper_protocol.jsonl"

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


@dataclasses.dataclass
class Protocol:
    """Everything but the method, alpha and seed; the same for every cell of a grid."""

    model: str = "minilm-l6"
    task: str = "sequence_classification"
    dataset: Optional[str] = None  # None: the bundled fortunes corpus; else a path load_text_dataset reads
    num_clients: int = 10
    num_rounds: int = 10  # the paper: 25
    num_experts: int = 16
    top_k: int = 1
    r: int = 8
    lora_alpha: int = 16
    retention_lambda: float = 0.5
    max_length: int = 32
    batch_size: int = 8
    learning_rate: float = 5e-3  # picked by the FedAvg sweep at alpha = 0.5 (RESULTS.md)
    max_train_samples_per_client: Optional[int] = 32  # None: every training sample, every round
    max_global_eval_samples: Optional[int] = None
    max_local_eval_samples: Optional[int] = None
    min_partition_size: int = 20
    local_test_fraction: float = 0.2


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


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


def cell_key(protocol: Protocol, method: str, alpha: float, seed: int, attack: Optional[str] = None,
             defences: str = "on") -> str:
    """A cell's identity: the method, alpha and seed under one exact protocol (any field changed is a new cell), and
    the attack scenario with the defences on or off when there is one."""
    key = f"{protocol.model}/{protocol.task}/{method}/alpha={alpha:g}/seed={seed}/protocol={protocol_id(protocol)}"
    if attack is not None:
        key += f"/attack={attack}/defences={defences}"
    elif defences != "on":
        key += f"/defences={defences}"
    return key


def _attack_transform(attack: str):
    from fcmoe_hf.federated.attacks import attack_clients, inflate_counts, sign_flip_update

    client, _ = ATTACKS[attack]
    if attack == "sign_flip_x100":
        return attack_clients({client: lambda update: sign_flip_update(update, 100.0)})
    return attack_clients({client: lambda update: inflate_counts(update, 10**6)})


def protocol_id(protocol: Protocol) -> str:
    """A short, stable digest of every protocol field."""
    import hashlib

    return hashlib.sha256(json.dumps(dataclasses.asdict(protocol), sort_keys=True).encode()).hexdigest()[:10]


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------------------ a cell


def _splits(protocol: Protocol, alpha: float, seed: int):
    from fcmoe_hf.data import PartitionConfig, load_bundled_fortunes, load_text_dataset, partition_dataset

    corpus = load_bundled_fortunes() if protocol.dataset is None else load_text_dataset(protocol.dataset)
    config = PartitionConfig(
        num_clients=protocol.num_clients, scheme="dirichlet", alpha=alpha, partition_seed=seed,
        min_partition_size=protocol.min_partition_size, local_test_fraction=protocol.local_test_fraction,
    )
    splits = partition_dataset(corpus, config)
    if protocol.max_train_samples_per_client is not None:
        for client in splits.clients:
            client["train"] = client["train"].select(range(min(protocol.max_train_samples_per_client, client["train"].num_rows)))
    return splits


def _model(protocol: Protocol, task, seed: int):
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


def _simulation(protocol, model, tokenizer, splits, task, aggregator, aggregator_config, seed, run_dir, eval_every=1):
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


def _compact(history: list[dict[str, Any]], client_ids: list[str]) -> list[dict[str, Any]]:
    """Per-round metrics without the per-client keys, plus the clients' local accuracies as one list."""
    rounds = []
    for record in history:
        out = {k: v for k, v in record.items() if "/" not in k}
        local = [record.get(f"{cid}/local_accuracy") for cid in client_ids]
        if any(v is not None for v in local):
            out["local_accuracy_per_client"] = local
        rounds.append(out)
    return rounds


def _federated(protocol, method, alpha, seed, workdir, attack=None, defences="on") -> list[dict[str, Any]]:
    from fcmoe_hf.tasks import build_task

    splits = _splits(protocol, alpha, seed)
    task = build_task(protocol.task, label_column=splits.label_column, label_names=splits.label_names, max_length=protocol.max_length)
    model, tokenizer = _model(protocol, task, seed)
    aggregator, overrides = METHODS[method]
    config = dict(overrides)
    if aggregator == "fcmoe" and config.get("use_retention", True):
        config["retention_lambda"] = protocol.retention_lambda
    config.update(DEFENCES[defences])
    simulation = _simulation(protocol, model, tokenizer, splits, task, aggregator, config or None, seed, workdir / "run")
    if attack is not None:
        simulation.update_transform = _attack_transform(attack)
    return _compact(simulation.run(), simulation.client_ids)


def _local_only(protocol, alpha, seed, workdir) -> list[dict[str, Any]]:
    """Each client alone for the same rounds: a one-client federation per client, averaged round by round."""
    from fcmoe_hf.data import ClientSplits
    from fcmoe_hf.tasks import build_task
    from fcmoe_hf.trainer import get_federated_state, set_federated_state

    splits = _splits(protocol, alpha, seed)
    task = build_task(protocol.task, label_column=splits.label_column, label_names=splits.label_names, max_length=protocol.max_length)
    model, tokenizer = _model(protocol, task, seed)
    initial = get_federated_state(model)
    per_client = []
    for i, client in enumerate(splits.clients):
        set_federated_state(model, initial)
        alone = ClientSplits([client], splits.global_test, splits.label_column, splits.label_names, splits.config)
        simulation = _simulation(protocol, model, tokenizer, alone, task, "fedavg", None, seed, workdir / f"client_{i}")
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


def _centralized(protocol, alpha, seed, workdir) -> list[dict[str, Any]]:
    """One model on the union of the clients' training data; its local accuracy on every client's test split."""
    from datasets import DatasetDict, concatenate_datasets

    from fcmoe_hf.data import ClientSplits
    from fcmoe_hf.tasks import build_task

    splits = _splits(protocol, alpha, seed)
    task = build_task(protocol.task, label_column=splits.label_column, label_names=splits.label_names, max_length=protocol.max_length)
    model, tokenizer = _model(protocol, task, seed)
    union = DatasetDict(
        train=concatenate_datasets([c["train"] for c in splits.clients]),
        test=concatenate_datasets([c["test"] for c in splits.clients]),
    )
    central = ClientSplits([union], splits.global_test, splits.label_column, splits.label_names, splits.config)
    local_tests = [c["test"] for c in splits.clients]
    per_round_local: list[list[float]] = []

    simulation = _simulation(protocol, model, tokenizer, central, task, "fedavg", None, seed, workdir / "run")

    def local_accuracies(round_index, metrics):
        limit = protocol.max_local_eval_samples
        per_round_local.append([
            task.evaluate(model, t if limit is None or t.num_rows <= limit else t.select(range(limit)), batch_size=64)["accuracy"]
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


def _flower(protocol, method, alpha, seed, workdir) -> list[dict[str, Any]]:
    """The cell as a Flower simulation (`run_flower_simulation`: the same model, data, partition and seeds as
    [`_federated`], clients as Ray actors given one CPU in all, so they train one after another)."""
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
    return _compact(history, [f"client_{i}" for i in range(protocol.num_clients)])


def run_cell(protocol: Protocol, method: str, alpha: float, seed: int, attack: Optional[str] = None,
             defences: str = "on") -> dict[str, Any]:
    """Run one cell and return its record."""
    if (attack is not None or defences != "on") and method in ("local", "centralized"):
        raise ValueError(f"attacks and defences apply to federated methods, not {method!r}")
    workdir = Path(tempfile.mkdtemp(prefix="paper_protocol_"))
    started = time.perf_counter()
    try:
        if attack is not None or defences != "on":
            rounds = _federated(protocol, method, alpha, seed, workdir, attack, defences)
        elif method.startswith("flwr_"):
            rounds = _flower(protocol, method, alpha, seed, workdir)
        elif method == "local":
            rounds = _local_only(protocol, alpha, seed, workdir)
        elif method == "centralized":
            rounds = _centralized(protocol, alpha, seed, workdir)
        else:
            rounds = _federated(protocol, method, alpha, seed, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    extra = {"attack": attack, "defences": defences} if attack is not None or defences != "on" else {}
    return {
        "kind": "attack_cell" if extra else "cell", "key": cell_key(protocol, method, alpha, seed, attack, defences),
        "method": method, "alpha": alpha, "seed": seed, **extra,
        "protocol": dataclasses.asdict(protocol), "rounds": rounds, "wall_seconds": round(time.perf_counter() - started, 1),
        "commit": _commit(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -------------------------------------------------------------------------------------------------------- the grid


def run_grid(protocol: Protocol, methods, alphas, seeds, results: Path, shard: tuple[int, int] = (0, 1),
             attack: Optional[str] = None, defences: str = "on") -> None:
    """Run every unfinished cell (alphas outermost); with `shard=(i, n)`, only cells i, i + n, i + 2n, ... of the grid,
    so that n processes (one thread each) share a machine's cores and one raw file."""
    index, count = shard
    cells = [(a, s, m) for a in alphas for s in seeds for m in methods][index::count]
    for alpha, seed, method in cells:
        done = {r["key"] for r in read_records(results) if r.get("kind") in ("cell", "attack_cell")}
        key = cell_key(protocol, method, alpha, seed, attack, defences)
        if key in done:
            print(f"skip {key} (done)", flush=True)
            continue
        print(f"run  {key}", flush=True)
        record = run_cell(protocol, method, alpha, seed, attack, defences)
        append_record(results, record)
        final = record["rounds"][-1]
        print(
            f"done {key}: global_accuracy={final.get('global_accuracy', float('nan')):.4f} "
            f"local_accuracy_mean={final.get('local_accuracy_mean', float('nan')):.4f} ({record['wall_seconds']} s)",
            flush=True,
        )


def lr_sweep(protocol: Protocol, rates: list[float], results: Path, alpha: float = 0.5, seed: int = 0) -> float:
    """FedAvg at `alpha` for each learning rate (recorded as cells); returns the best by final global accuracy."""
    best, best_rate = -1.0, rates[0]
    for rate in rates:
        swept = dataclasses.replace(protocol, learning_rate=rate)
        run_grid(swept, ["fedavg"], [alpha], [seed], results)
        record = next(r for r in read_records(results) if r.get("key") == cell_key(swept, "fedavg", alpha, seed))
        accuracy = record["rounds"][-1]["global_accuracy"]
        print(f"lr {rate:g}: final global accuracy {accuracy:.4f}", flush=True)
        if accuracy > best:
            best, best_rate = accuracy, rate
    append_record(results, {"kind": "lr_sweep", "rates": rates, "alpha": alpha, "seed": seed, "chosen": best_rate,
                            "protocol": dataclasses.asdict(protocol), "commit": _commit()})
    return best_rate


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--alphas", default="0.1,0.5,1.0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--lr-sweep", default=None, help="comma-separated learning rates: run the FedAvg sweep")
    parser.add_argument("--report", action="store_true", help="write tables and plots from --results, run nothing")
    parser.add_argument("--report-dir", type=Path, default=None, help="where --report writes (default: beside --results)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--attack", default=None, choices=list(ATTACKS), help="one client of ten attacks every round")
    parser.add_argument("--defences", default="on", choices=list(DEFENCES), help="the server's defences (see DEFENCES)")
    parser.add_argument("--shard", default="0/1", help="i/n: run cells i, i+n, ... (n processes share one raw file)")
    for field in dataclasses.fields(Protocol):
        kind = {int: int, float: float}.get(type(field.default), str)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default)
    args = parser.parse_args(argv)
    protocol = Protocol(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Protocol)})
    for name in ("max_train_samples_per_client", "max_global_eval_samples", "max_local_eval_samples"):
        value = getattr(protocol, name)
        setattr(protocol, name, None if value in (None, "None", "") else int(value))
    if args.report:
        sys.path.insert(0, str(Path(__file__).parent))
        from paper_report import write_report

        write_report(args.results, args.report_dir or args.results.parent)
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    if args.lr_sweep:
        chosen = lr_sweep(protocol, [float(x) for x in args.lr_sweep.split(",")], args.results)
        print(f"chosen learning rate: {chosen:g}")
        return
    shard = tuple(int(x) for x in args.shard.split("/"))
    if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
        parser.error(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
    run_grid(protocol, args.methods.split(","), [float(a) for a in args.alphas.split(",")],
             [int(s) for s in args.seeds.split(",")], args.results, shard, args.attack, args.defences)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
