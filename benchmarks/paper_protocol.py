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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_cells import ATTACKS, DEFENCES, METHODS, centralized, federated, flower, local_only  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "paper_protocol.jsonl"

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


def run_cell(protocol: Protocol, method: str, alpha: float, seed: int, attack: Optional[str] = None,
             defences: str = "on") -> dict[str, Any]:
    """Run one cell and return its record."""
    if (attack is not None or defences != "on") and method in ("local", "centralized"):
        raise ValueError(f"attacks and defences apply to federated methods, not {method!r}")
    workdir = Path(tempfile.mkdtemp(prefix="paper_protocol_"))
    started = time.perf_counter()
    try:
        if attack is not None or defences != "on":
            rounds = federated(protocol, method, alpha, seed, workdir, attack, defences)
        elif method.startswith("flwr_"):
            rounds = flower(protocol, method, alpha, seed, workdir)
        elif method == "local":
            rounds = local_only(protocol, alpha, seed, workdir)
        elif method == "centralized":
            rounds = centralized(protocol, alpha, seed, workdir)
        else:
            rounds = federated(protocol, method, alpha, seed, workdir)
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
