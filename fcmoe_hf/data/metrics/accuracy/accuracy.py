"""Accuracy as an `evaluate` metric script, shipped with fcmoe_hf because the Hub's copy is unreachable offline."""

import datasets
import evaluate
import numpy as np

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

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != references.shape:
            raise ValueError(f"sample_weight has shape {weights.shape}, expected {references.shape}")
        correct = float(np.sum(weights * (predictions == references)))
        if not normalize:
            return {"accuracy": correct}
        total = float(np.sum(weights))
        return {"accuracy": correct / total if total > 0 else 0.0}
