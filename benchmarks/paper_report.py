"""Tables and plots of the paper protocol, from `paper_protocol.jsonl` alone (`paper_protocol.py --report`).

Writes `paper_protocol.md` (analogues of the paper's Table I, Table II and Fig. 3, with the learning-rate sweep) and
PNG plots beside it. Rounds to converge are defined once for every method: the first round whose global accuracy is
within 1 point (0.01) of the run's best global accuracy.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
from paper_cells import ATTACKS, DEFENCES  # paper_cells imports no torch at module level

TABLE_METHODS = ["fedavg", "fedprox", "fedmoe", "pfl_moe", "fedalign_moe", "fcmoe", "local", "centralized",
                 "flwr_fedavg", "flwr_fedprox", "flwr_fedadam"]
ABLATIONS = ["fcmoe", "fcmoe_no_projection", "fcmoe_no_retention", "fcmoe_no_importance"]
CONVERGENCE_TOLERANCE = 0.01


def rounds_to_converge(accuracies: list[float], tolerance: float = CONVERGENCE_TOLERANCE) -> int:
    """The first round (1-based) whose accuracy is within `tolerance` of the run's best."""
    best = max(accuracies)
    return next(i + 1 for i, a in enumerate(accuracies) if a >= best - tolerance)


def rounds_to_reach(accuracies: list[float], target: float) -> Optional[int]:
    """The first round (1-based) whose accuracy reaches `target`, or None."""
    return next((i + 1 for i, accuracy in enumerate(accuracies) if accuracy >= target - 1e-9), None)


def _method_rows(cells, alphas, columns) -> list[str]:
    """One table row per method that has cells (Table I's methods, then the ablations): `columns(records)` per alpha."""
    rows = []
    for method in TABLE_METHODS + [m for m in ABLATIONS if m != "fcmoe"]:
        if any((method, a) in cells for a in alphas):
            rows.append("| " + " | ".join([method] + [c for a in alphas for c in columns(cells.get((method, a), []))]) + " |")
    return rows


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def _cells(records: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    cells: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("kind") == "cell":
            cells[(record["method"], float(record["alpha"]))].append(record)
    return cells


def _final(cell_records, key):
    return [r["rounds"][-1].get(key) for r in cell_records]


#: attack scenario -> the attacking client.
ATTACKERS = {scenario: client for scenario, (client, _) in ATTACKS.items()}
#: The defence settings in table order: the defaults, the defaults rejecting out-of-bounds counts, none.
DEFENCE_ORDER = list(DEFENCES)


def last3(record: dict) -> float:
    """A cell's global accuracy averaged over its last three rounds (less noisy than the final round alone)."""
    return float(np.mean([r["global_accuracy"] for r in record["rounds"][-3:]]))


#: (a, b, metric): the paired comparisons behind the paper's claims, `a - b` per seed.
COMPARISONS = [
    ("fcmoe", "fedavg", "global"), ("fcmoe", "fedmoe", "global"), ("fedmoe", "fedavg", "global"),
    ("fcmoe", "fcmoe_no_projection", "global"), ("fcmoe", "fcmoe_no_retention", "global"),
    ("fcmoe", "fcmoe_no_importance", "global"), ("fcmoe", "pfl_moe", "local"), ("fcmoe", "fedavg", "local"),
]


def _paired_differences(cells, alphas) -> list[str]:
    """`a - b` per seed (same partition and training seed), final round and last-3 mean, in points: mean ± std (n)."""
    lines = ["", "## Paired differences (points; a - b on the same seeds, mean ± std over seeds, n seeds)", "",
             "| a - b | metric | " + " | ".join(f"α={x:g} final | α={x:g} last-3" for x in alphas) + " |",
             "|---|---|" + "---|" * (2 * len(alphas))]
    for a, b, metric in COMPARISONS:
        row = [f"{a} - {b}", metric]
        for alpha in alphas:
            by_seed = {name: {r["seed"]: r for r in cells.get((name, alpha), [])} for name in (a, b)}
            seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
            if metric == "global":
                pick = {"final": lambda r: r["rounds"][-1]["global_accuracy"], "last3": last3}
            else:
                pick = {"final": lambda r: r["rounds"][-1].get("local_accuracy_mean", np.nan),
                        "last3": lambda r: float(np.mean([x.get("local_accuracy_mean", np.nan) for x in r["rounds"][-3:]]))}
            for kind in ("final", "last3"):
                diffs = [100 * (pick[kind](by_seed[a][s]) - pick[kind](by_seed[b][s])) for s in seeds]
                row.append(f"{np.mean(diffs):+.1f} ± {np.std(diffs):.1f} ({len(diffs)})" if diffs else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_report(results: Path, out_dir: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean over methods without conflict statistics
        return _write_report(results, out_dir)


def _write_report(results: Path, out_dir: Path) -> Path:
    records = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    # The grid is the newest sweep's protocol at the chosen rate (else the newest cell's protocol); the sweep's other
    # cells are reported only in the sweep table, and cells of any other protocol only in the closing table.
    sweep = [r for r in records if r.get("kind") == "lr_sweep"]
    chosen = sweep[-1]["chosen"] if sweep else None
    all_cells = [r for r in records if r.get("kind") == "cell"]
    if sweep:
        grid_protocol = {**sweep[-1]["protocol"], "learning_rate": chosen}
    else:
        grid_protocol = all_cells[-1]["protocol"] if all_cells else None
    grid = [r for r in all_cells if r["protocol"] == grid_protocol]
    swept = [r for r in all_cells if sweep and r not in grid and r["method"] == "fedavg"
             and (float(r["alpha"]), r["seed"]) == (sweep[-1]["alpha"], sweep[-1]["seed"])
             and {**r["protocol"], "learning_rate": chosen} == grid_protocol]
    other = [r for r in all_cells if r not in grid and r not in swept]
    cells = _cells(grid)
    alphas = sorted({alpha for _, alpha in cells})
    lines = [f"# Paper protocol: results ({len(grid)} cells from `{Path(results).name}`)", ""]
    if grid:
        protocol = grid[-1]["protocol"]
        lines += ["Protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items()), ""]
    if sweep:
        lines += ["## Learning-rate sweep (FedAvg, final global accuracy)", "", "| lr | global acc |", "|---|---|"]
        for rate in sweep[-1]["rates"]:
            match = [r for r in swept + grid if r["method"] == "fedavg" and r["protocol"]["learning_rate"] == rate
                     and float(r["alpha"]) == sweep[-1]["alpha"] and r["seed"] == sweep[-1]["seed"]]
            lines.append(f"| {rate:g} | {_mean_std(_final(match, 'global_accuracy'))} |")
        lines += ["", f"Chosen: {chosen:g}", ""]

    header = "| method | " + " | ".join(f"α={a:g} acc | α={a:g} prec | α={a:g} rec" for a in alphas) + " |"
    lines += ["## Table I analogue: global accuracy / macro precision / macro recall (%, mean ± std over seeds)", "",
              header, "|---|" + "---|" * (3 * len(alphas))]
    lines += _method_rows(cells, alphas, lambda recs: [
        _mean_std(_final(recs, "global_accuracy")), _mean_std(_final(recs, "global_precision")),
        _mean_std(_final(recs, "global_recall"))])

    lines += ["", "Round-to-round noise is large at this scale (one round can move global accuracy by 10 points), so the "
              "mean over the last three rounds is given beside the final round:", "",
              "| method | " + " | ".join(f"α={a:g} final | α={a:g} last-3 mean" for a in alphas) + " |",
              "|---|" + "---|" * (2 * len(alphas))]
    lines += _method_rows(cells, alphas, lambda recs: [
        _mean_std(_final(recs, "global_accuracy")),
        _mean_std([last3(rec) for rec in recs])])

    lines += _paired_differences(cells, alphas)

    lines += ["", "## Table II analogue: ablations (global / mean local accuracy, %)", "",
              "| method | " + " | ".join(f"α={a:g} global | α={a:g} local" for a in alphas) + " |",
              "|---|" + "---|" * (2 * len(alphas))]
    for method in ABLATIONS:
        row = [method]
        for a in alphas:
            recs = cells.get((method, a), [])
            row += [_mean_std(_final(recs, "global_accuracy")), _mean_std(_final(recs, "local_accuracy_mean"))]
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", f"## Fig. 3 analogue: rounds to converge (first round within {CONVERGENCE_TOLERANCE:g} of the run's best "
              "global accuracy) and local accuracy (mean [min, max] over clients, final round)", "",
              "Rounds to FedAvg's accuracy: the first round whose global accuracy reaches FedAvg's final accuracy in the "
              "same α and seed (the usual rounds-to-target measure; `>R` when never within the run's R rounds).", "",
              "| method | α | rounds to converge | rounds to FedAvg's accuracy | local acc mean | local acc range | "
              "conflict share (mean over rounds) |",
              "|---|---|---|---|---|---|---|"]
    for (method, a), recs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        conv = [rounds_to_converge([r["global_accuracy"] for r in rec["rounds"]]) for rec in recs]
        to_target = []
        for rec in recs:
            reference = [c for c in cells.get(("fedavg", a), []) if c["seed"] == rec["seed"]]
            if reference:
                to_target.append(rounds_to_reach([r["global_accuracy"] for r in rec["rounds"]],
                                                 reference[0]["rounds"][-1]["global_accuracy"]))
        horizon = f">{len(recs[0]['rounds'])}"
        if not to_target:
            target = "-"
        elif all(t is not None for t in to_target):
            target = f"{np.mean(to_target):.1f}"
        else:  # per seed, since a mean over "never" has no value
            target = ", ".join(horizon if t is None else str(t) for t in to_target)
        lows, highs = _final(recs, "local_accuracy_min"), _final(recs, "local_accuracy_max")
        shares = [np.nanmean([r.get("conflict_share", np.nan) if r.get("conflict_share") is not None else np.nan
                              for r in rec["rounds"]]) for rec in recs]
        share = f"{np.nanmean(shares):.4f}" if np.isfinite(np.nanmean(shares)) else "-"
        spread = (f"[{100 * np.mean([v for v in lows if v is not None]):.1f}, {100 * np.mean([v for v in highs if v is not None]):.1f}]"
                  if any(v is not None for v in lows) else "-")
        lines.append(f"| {method} | {a:g} | {np.mean(conv):.1f} | {target} | {_mean_std(_final(recs, 'local_accuracy_mean'))} | "
                     f"{spread} | {share} |")
    diagnosed = [(key, recs) for key, recs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0]))
                 if any(r.get("cosine_quantiles") for rec in recs for r in rec["rounds"])]
    if diagnosed:
        lines += ["", "## Diagnostics of the projection (means over rounds and seeds)", "",
                  "cos(Δ, consensus) over the (client, expert) pairs that used the expert; conflict share: per expert, the "
                  "share of its contributing clients with cos < 0 (the updates the projection changes), averaged.", "",
                  "| method | α | conflict share | cos p10 | cos p50 | cos p90 | experts used by no client | "
                  "clients per expert |", "|---|---|---|---|---|---|---|---|"]
        for (method, a), recs in diagnosed:
            rounds = [r for rec in recs for r in rec["rounds"] if r.get("cosine_quantiles")]
            quantile = {q: np.mean([r["cosine_quantiles"][q] for r in rounds]) for q in ("p10", "p50", "p90")}
            lines.append(
                f"| {method} | {a:g} | {np.mean([r['conflict_share'] for r in rounds]):.3f} | {quantile['p10']:.2f} | "
                f"{quantile['p50']:.2f} | {quantile['p90']:.2f} | "
                f"{np.mean([r['experts_unused'] / r['experts_total'] for r in rounds]):.1%} | "
                f"{np.mean([r['clients_per_expert_mean'] for r in rounds]):.1f} |")
    attacked = [r for r in records if r.get("kind") == "attack_cell" and r["protocol"] == grid_protocol]
    if attacked:
        lines += ["", "## Attacks: one client of ten attacks every round (final global accuracy, %)", "",
                  "| method | α | seed | attack | defences | clean | attacked | cost (points) | last-3 cost | rounds attacker rejected / capped |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for rec in sorted(attacked, key=lambda r: (r["method"], r["alpha"], r["seed"], r["attack"], DEFENCE_ORDER.index(r["defences"]))):
            clean = [c for c in grid if (c["method"], c["alpha"], c["seed"]) == (rec["method"], rec["alpha"], rec["seed"])]
            after = rec["rounds"][-1]["global_accuracy"]
            before = clean[0]["rounds"][-1]["global_accuracy"] if clean else float("nan")
            attacker = ATTACKERS.get(rec["attack"], "")
            hits = sum(attacker in json.dumps(r.get("rejected", [])) for r in rec["rounds"])
            caps = sum(attacker in json.dumps(r.get("capped", [])) for r in rec["rounds"])
            tail = last3(clean[0]) - last3(rec) if clean else float("nan")
            lines.append(f"| {rec['method']} | {rec['alpha']:g} | {rec['seed']} | {rec['attack']} | "
                         f"{rec['defences']} | {100 * before:.1f} | {100 * after:.1f} | "
                         f"{100 * (before - after):+.1f} | {100 * tail:+.1f} | {hits} / {caps} of {len(rec['rounds'])} |")
    if other:
        lines += ["", "## Cells of other protocols (final round)", "",
                  "| method | α | seed | protocol differences | global acc | local acc mean |", "|---|---|---|---|---|---|"]
        for rec in other:
            diff = ", ".join(f"{k}={v}" for k, v in rec["protocol"].items() if grid_protocol and grid_protocol.get(k) != v)
            final = rec["rounds"][-1]
            lines.append(f"| {rec['method']} | {rec['alpha']:g} | {rec['seed']} | {diff or '-'} | "
                         f"{100 * final.get('global_accuracy', float('nan')):.1f} | "
                         f"{100 * final.get('local_accuracy_mean', float('nan')):.1f} |")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plots(cells, alphas, out_dir)
    path = out_dir / "paper_protocol.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plots(cells, alphas, out_dir: Path) -> None:
    """Per alpha: global and mean local accuracy per round, the final local accuracy's spread over clients, and the
    conflict share per round (each a mean over seeds); one figure per alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({method for method, _ in cells})
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    for alpha in alphas:
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
        spread = []
        for method in methods:
            recs = cells.get((method, alpha))
            if not recs:
                continue
            style = {"color": colours[method], "label": method, "linestyle": "--" if method.startswith("flwr_") else "-"}
            width = min(len(rec["rounds"]) for rec in recs)

            def per_round(key, recs=recs, width=width):
                values = [[np.nan if r.get(key) is None else r[key] for r in rec["rounds"][:width]] for rec in recs]
                return np.nanmean(np.array(values, dtype=float), 0) if np.isfinite(values).any() else None

            rounds = np.arange(1, width + 1)
            for ax, key in zip(axes[[0, 1, 3]], ("global_accuracy", "local_accuracy_mean", "conflict_share")):
                curve = per_round(key)
                if curve is not None:
                    ax.plot(rounds, curve, **style)
            finals = [rec["rounds"][-1] for rec in recs if "local_accuracy_mean" in rec["rounds"][-1]]
            if finals:
                spread.append((method, *(float(np.mean([f[k] for f in finals])) for k in
                                         ("local_accuracy_mean", "local_accuracy_min", "local_accuracy_max"))))
        for i, (method, mean, low, high) in enumerate(spread):
            axes[2].errorbar([i], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=4, color=colours[method])
        axes[2].set_xticks(range(len(spread)), [m for m, *_ in spread], rotation=60, ha="right", fontsize=7)
        titles = ("global accuracy per round", "mean local accuracy per round",
                  "final local accuracy: mean, min-max over clients", "conflict share per round")
        for ax, title in zip(axes, titles):
            ax.set_title(f"{title} (α={alpha:g})", fontsize=9)
            if ax is not axes[2]:
                ax.set_xlabel("round")
        axes[0].legend(fontsize=6, ncol=2)
        fig.suptitle(f"Paper protocol, α={alpha:g}, mean over the seeds run", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / f"paper_protocol_alpha{alpha:g}.png", dpi=100)
        plt.close(fig)
