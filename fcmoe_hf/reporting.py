"""Round metrics to JSONL and TensorBoard, and the run's plots (metric curves, per-expert conflict heatmap)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from .federated.layout import PEFT_KEY_PREFIX

METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS_FILE = "conflicts.jsonl"


def _finite_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file (an absent file has none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if index < len(lines) - 1:
                raise ValueError(f"{path}: line {index + 1} is not JSON.") from None
            # A last line torn by a kill mid-append: the round it logged was not checkpointed either.
            logging.getLogger(__name__).warning("%s: dropping its last line, cut short (%d chars).", path, len(line))
    return records


def truncate_jsonl(path: str | os.PathLike, last_round: int) -> None:
    """Drop records of rounds after `last_round` (written by a run killed before it checkpointed them)."""
    records = [r for r in read_jsonl(path) if r.get("round", 0) <= last_round]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


class RoundLogger:
    """Appends one JSON line per round to `metrics.jsonl` (and per-expert conflicts to `conflicts.jsonl`), and mirrors
    the scalar metrics to TensorBoard when `"tensorboard"` is in `report_to`."""

    def __init__(self, run_dir: str | os.PathLike, report_to: Sequence[str] = ("tensorboard",)):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log_round(self, round_index: int, metrics: Mapping[str, Any], conflicts: Optional[Mapping[str, list]] = None) -> None:
        record = {"round": round_index, **metrics}
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
        if conflicts:
            with open(self.run_dir / DIAGNOSTICS_FILE, "a") as f:
                f.write(json.dumps({"round": round_index, "conflict_share": conflicts}, default=_json_default) + "\n")
        if self._writer is not None:
            for key, value in _finite_scalars(metrics).items():
                if math.isfinite(value):
                    self._writer.add_scalar(key, value, round_index)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, output: str | os.PathLike) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    _pyplot().close(fig)
    return output


def plot_metrics(
    runs: Mapping[str, str | os.PathLike], output: str | os.PathLike, metrics: Sequence[str] = ("global_accuracy", "local_accuracy_mean")
) -> Optional[Path]:
    """Line plots of `metrics` per round, one line per run (`{label: run_dir}`), side by side; `None` if no data."""
    plt = _pyplot()
    histories = {label: read_jsonl(Path(run) / METRICS_FILE) for label, run in runs.items()}
    present = [m for m in metrics if any(m in r for h in histories.values() for r in h)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for label, history in histories.items():
            points = [(r["round"], r[metric]) for r in history if metric in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, output)


def plot_conflict_heatmap(run_dir: str | os.PathLike, output: str | os.PathLike, max_groups: int = 64) -> Optional[Path]:
    """Heatmap of the share of conflicting clients per expert (rows: expert groups, columns: expert index), averaged
    over the run's rounds, from the server diagnostics in `conflicts.jsonl`; `None` if there are none."""
    import numpy as np

    plt = _pyplot()
    records = read_jsonl(Path(run_dir) / DIAGNOSTICS_FILE)
    if not records:
        return None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for record in records:
        for group, shares in record["conflict_share"].items():
            values = np.array([np.nan if v is None else v for v in shares], dtype=float)
            seen = ~np.isnan(values)
            sums[group] = sums.get(group, np.zeros_like(values)) + np.nan_to_num(values)
            counts[group] = counts.get(group, np.zeros_like(values)) + seen
    groups = list(sums)[:max_groups]
    matrix = np.stack([np.divide(sums[g], counts[g], out=np.full_like(sums[g], np.nan), where=counts[g] > 0) for g in groups])
    labels = [g.removeprefix(PEFT_KEY_PREFIX).removeprefix("model.") for g in groups]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * matrix.shape[1], 1.0 + 0.22 * len(groups)))
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(groups)), labels, fontsize=6)
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title(f"share of conflicting clients (mean over {len(records)} rounds)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _save(fig, output)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Compare runs: `python -m fcmoe_hf.reporting fcmoe=outputs/a fedavg=outputs/b --output compare.png`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (or RUN_DIR, labelled by its name)")
    parser.add_argument("--output", default="compare.png")
    parser.add_argument("--metrics", nargs="+", default=["global_accuracy", "local_accuracy_mean"])
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = Path(item).name, item
        if not (Path(path) / METRICS_FILE).exists():
            parser.error(f"{path} has no {METRICS_FILE}")
        runs[label] = path
    written = plot_metrics(runs, args.output, args.metrics)
    print(written if written else f"none of {args.metrics} found in the runs")


if __name__ == "__main__":
    main()
