"""Data for federated fine-tuning: bundled real corpora, non-IID client partitions, task formats and metrics.

```py
>>> from fcmoe_hf.data import PartitionConfig, load_bundled_fortunes, partition_dataset
>>> splits = partition_dataset(load_bundled_fortunes(), PartitionConfig(num_clients=10, scheme="dirichlet", alpha=0.1))
```
"""

from .corpora import LABEL_COLUMN, TEXT_COLUMN, load_bundled_fortunes, load_text_dataset
from .metrics import available_metrics, load_metric
from .partition import ClientSplits, PartitionConfig, build_partitioner, partition_dataset
from .tasks import (
    DEFAULT_CATEGORY_TEMPLATE,
    IGNORE_INDEX,
    CategoryPredictions,
    CategoryPromptEncoder,
    compute_classification_metrics,
    evaluate_category_prediction,
    get_data_collator,
    predict_categories,
    tokenize_for_category_prediction,
    tokenize_for_causal_lm,
)

__all__ = [
    "DEFAULT_CATEGORY_TEMPLATE",
    "IGNORE_INDEX",
    "LABEL_COLUMN",
    "TEXT_COLUMN",
    "CategoryPredictions",
    "CategoryPromptEncoder",
    "ClientSplits",
    "PartitionConfig",
    "available_metrics",
    "build_partitioner",
    "compute_classification_metrics",
    "evaluate_category_prediction",
    "get_data_collator",
    "load_bundled_fortunes",
    "load_metric",
    "load_text_dataset",
    "partition_dataset",
    "predict_categories",
    "tokenize_for_category_prediction",
    "tokenize_for_causal_lm",
]
