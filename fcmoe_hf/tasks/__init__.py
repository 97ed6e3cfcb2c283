"""Tasks: what a federation trains on and how it scores, behind one interface ([`Task`]) and a registry by name.

```py
>>> from fcmoe_hf.tasks import available_tasks, build_task
>>> available_tasks()
['category', 'causal_lm', 'sequence_classification']
>>> task = build_task("category", tokenizer=tokenizer, label_names=splits.label_names, max_length=128)
>>> train = task.tokenize(splits[0]["train"])          # features for the Trainer, batched by task.data_collator
>>> task.evaluate(model, splits.global_test, batch_size=16)
{'accuracy': ..., 'precision': ..., 'recall': ..., 'f1': ...}
```

A new task is one module with a [`Task`] subclass decorated with [`register_task`], imported below.
"""

from .base import Task, available_tasks, build_task, get_task_class, register_task
from .category import (
    DEFAULT_CATEGORY_TEMPLATE,
    CategoryPredictions,
    CategoryPredictionTask,
    CategoryPromptEncoder,
    evaluate_category_prediction,
    predict_categories,
    tokenize_for_category_prediction,
)
from .causal_lm import CausalLMTask, causal_lm_loss, tokenize_for_causal_lm
from .common import IGNORE_INDEX, compute_classification_metrics, get_data_collator
from .sequence_classification import (
    SequenceClassificationTask,
    predict_classes,
    tokenize_for_sequence_classification,
)

__all__ = [
    "DEFAULT_CATEGORY_TEMPLATE",
    "IGNORE_INDEX",
    "CategoryPredictionTask",
    "CategoryPredictions",
    "CategoryPromptEncoder",
    "CausalLMTask",
    "SequenceClassificationTask",
    "Task",
    "available_tasks",
    "build_task",
    "causal_lm_loss",
    "compute_classification_metrics",
    "evaluate_category_prediction",
    "get_data_collator",
    "get_task_class",
    "predict_categories",
    "predict_classes",
    "register_task",
    "tokenize_for_category_prediction",
    "tokenize_for_causal_lm",
    "tokenize_for_sequence_classification",
]
