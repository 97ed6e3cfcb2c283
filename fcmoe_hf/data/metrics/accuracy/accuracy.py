"""Accuracy as an `evaluate` metric script, shipped with fcmoe_hf because the Hub's copy is unreachable offline.

The input checks and metric info shared with the other metrics live in `fcmoe_hf.data.metrics._classification`,
imported absolutely because `evaluate.load` runs a copy of this script from its module cache.
"""

import evaluate
import numpy as np

from fcmoe_hf.data.metrics._classification import check_inputs, metric_info

_DESCRIPTION = """
Accuracy is the share of predictions equal to their references: (TP + TN) / (TP + TN + FP + FN) for binary labels, the
fraction of exact matches for multi-class labels.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, defaults to `True`): return the fraction of correct predictions; `False` returns their count.
    sample_weight (`list` of `float`, *optional*): weight of every example.

Returns:
    accuracy (`float`): the fraction (or weighted count) of correct predictions; 0.0 on empty input.

Examples:
    >>> accuracy = evaluate.load("fcmoe_hf/data/metrics/accuracy")
    >>> accuracy.compute(references=[0, 1, 2, 0], predictions=[0, 1, 1, 0])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "accuracy_score")

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions, references, weights = check_inputs(predictions, references, sample_weight)
        correct = float(np.sum(weights * (predictions == references)))
        if not normalize:
            return {"accuracy": correct}
        total = float(np.sum(weights))
        return {"accuracy": correct / total if total > 0 else 0.0}
