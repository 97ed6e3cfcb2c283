"""Data for federated fine-tuning: bundled real corpora, non-IID client partitions and metrics.

```py
>>> from fcmoe_hf.data import PartitionConfig, load_bundled_fortunes, partition_dataset
>>> splits = partition_dataset(load_bundled_fortunes(), PartitionConfig(num_clients=10, scheme="dirichlet", alpha=0.1))
```

The task formats (tokenization, collators, scoring) live in [`fcmoe_hf.tasks`]; their functions are still importable
from here.
"""

from __future__ import annotations

import importlib
from typing import Any

from .corpora import LABEL_COLUMN, TEXT_COLUMN, load_bundled_fortunes, load_text_dataset
from .metrics import available_metrics, load_metric
from .partition import ClientSplits, PartitionConfig, build_partitioner, partition_dataset

# Names that moved to `fcmoe_hf.tasks`, resolved on first access: `fcmoe_hf.tasks` imports this package, so importing
# it eagerly here would be circular.
_MOVED_TO_TASKS = (
    "DEFAULT_CATEGORY_TEMPLATE",
    "IGNORE_INDEX",
    "CategoryPredictions",
    "CategoryPromptEncoder",
    "compute_classification_metrics",
    "evaluate_category_prediction",
    "get_data_collator",
    "predict_categories",
    "tokenize_for_category_prediction",
    "tokenize_for_causal_lm",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_TASKS:
        return getattr(importlib.import_module("fcmoe_hf.tasks"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LABEL_COLUMN",
    "TEXT_COLUMN",
    "ClientSplits",
    "PartitionConfig",
    "available_metrics",
    "build_partitioner",
    "load_bundled_fortunes",
    "load_metric",
    "load_text_dataset",
    "partition_dataset",
    *_MOVED_TO_TASKS,
]
