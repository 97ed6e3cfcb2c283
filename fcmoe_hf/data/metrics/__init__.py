"""Classification metrics as local `evaluate` metric scripts (the Hub's `evaluate` metrics are unreachable offline).

Each metric lives in `<name>/<name>.py`, the layout `evaluate.load` expects for a local metric; [`load_metric`] loads it
by name without touching the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate

#: Directory holding the shipped metric scripts.
METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the metric scripts shipped with fcmoe_hf (`accuracy`, `f1`, `precision`, `recall`)."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, keep_in_memory: bool = True, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a shipped metric with `evaluate.load` from its local script; works with `HF_HUB_OFFLINE=1`.

    Args:
        name (`str`): one of [`available_metrics`] (`"accuracy"`, `"precision"`, `"recall"`, `"f1"`).
        keep_in_memory (`bool`): keep the predictions in memory instead of an Arrow cache file, which avoids disk
            writes and the file locks that `evaluate` takes for its cache files (the inputs here are small).
        kwargs: passed to `evaluate.load` (e.g. `experiment_id`, `num_process`, `process_id`).

    Returns:
        `evaluate.EvaluationModule`: call `.compute(predictions=..., references=...)` on it. Precision, recall and F1
        default to the macro average over classes.

    Example:

    ```py
    >>> from fcmoe_hf.data import load_metric
    >>> load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
    ```
    """
    script = METRICS_DIR / name / f"{name}.py"
    if not script.is_file():
        raise ValueError(f"unknown metric {name!r}; the metrics shipped with fcmoe_hf are {available_metrics()}")
    return evaluate.load(str(script), keep_in_memory=keep_in_memory, **kwargs)
