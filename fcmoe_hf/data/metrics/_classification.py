"""Shared parts of the shipped classification metric scripts (`accuracy`, `precision`, `recall`, `f1`).

`evaluate.load` copies a metric script into its module cache and imports the copy there, so a script cannot import a
sibling file relatively; it imports this module absolutely instead (`from fcmoe_hf.data.metrics._classification import
...`), which `evaluate` treats as a library dependency of the script and resolves from the installed `fcmoe_hf`.

Only functions and constants live here: `evaluate` takes the first `EvaluationModule` subclass it finds in a script's
namespace as the metric, so a shared base class imported into a script would be picked instead of the script's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import datasets
import evaluate
import numpy as np

CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_AVERAGED_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    labels (`list` of `int`, *optional*): classes to score and average over. Defaults to the classes present in
        `predictions` or `references` (as scikit-learn does); pass all class ids to count absent classes too.
    average (`str` or `None`, defaults to `"macro"`): `"macro"` (unweighted mean over classes), `"micro"` (from the
        total counts), `"weighted"` (mean weighted by class support), `"binary"` (the `pos_label` class only) or
        `None` (the per-class scores as a list).
    pos_label (`int`, defaults to 1): the positive class when `average="binary"`.
    sample_weight (`list` of `float`, *optional*): weight of every example.
    zero_division (`float`, defaults to 0.0): the value of a score whose denominator is zero.

Returns:
    {name} (`float`, or `list` of `float` when `average=None`).

Examples:
    >>> {name} = evaluate.load("fcmoe_hf/data/metrics/{name}")
    >>> {name}.compute(references=[0, 0, 1, 1, 2, 2], predictions=[0, 1, 1, 1, 2, 0])
    {{'{name}': {example}}}
"""

#: Computes a per-class score's numerator and denominator from the (weighted) TP, FP and FN counts.
Ratio = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def averaged_kwargs_description(name: str, example: str) -> str:
    """The inputs description of an averaged per-class score `name`, whose docstring example returns `example`."""
    return _AVERAGED_KWARGS_DESCRIPTION.format(name=name, example=example)


def metric_info(description: str, inputs_description: str, sklearn_function: str) -> evaluate.MetricInfo:
    """`MetricInfo` of a metric over integer labels that mirrors scikit-learn's `sklearn.metrics.<sklearn_function>`."""
    return evaluate.MetricInfo(
        description=description,
        citation=CITATION,
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        reference_urls=[f"https://scikit-learn.org/stable/modules/generated/sklearn.metrics.{sklearn_function}.html"],
    )


def check_inputs(predictions, references, sample_weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions and references as int64 arrays of one shape, and the example weights (ones by default)."""
    predictions = np.asarray(predictions, dtype=np.int64)
    references = np.asarray(references, dtype=np.int64)
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
    weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if weights.shape != references.shape:
        raise ValueError(f"sample_weight has shape {weights.shape}, expected {references.shape}")
    return predictions, references, weights


def per_class_counts(predictions, references, labels, sample_weight):
    """True positives, false positives, false negatives (weighted) and support of every class in `labels`."""
    predictions, references, weights = check_inputs(predictions, references, sample_weight)
    if labels is None:
        labels = np.union1d(predictions, references)
    labels = np.asarray(labels, dtype=np.int64)
    # One column per class: an (examples x classes) indicator product replaces a per-class Python loop.
    pred_is = predictions[:, None] == labels[None, :]
    ref_is = references[:, None] == labels[None, :]
    w = weights[:, None]
    tp = np.sum(w * (pred_is & ref_is), axis=0)
    fp = np.sum(w * (pred_is & ~ref_is), axis=0)
    fn = np.sum(w * (~pred_is & ref_is), axis=0)
    return labels, tp, fp, fn, tp + fn


def divide(numerator, denominator, zero_division):
    """Element-wise `numerator / denominator`, `zero_division` where the denominator is not positive."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(numerator.shape, float(zero_division))
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def average_scores(name, per_class, numerator, denominator, support, labels, average, pos_label, zero_division):
    """`{name: score}` for the per-class scores `per_class` (= `numerator / denominator`) under `average`."""
    if average is None:
        return {name: per_class.tolist()}
    if average == "binary":
        if pos_label not in labels:
            # sklearn scores a positive class that never occurs as zero_division too.
            return {name: float(zero_division)}
        return {name: float(per_class[list(labels).index(pos_label)])}
    if average == "macro":
        return {name: float(per_class.mean()) if len(per_class) else float(zero_division)}
    if average == "weighted":
        total = support.sum()
        return {name: float((per_class * support).sum() / total) if total > 0 else float(zero_division)}
    if average == "micro":
        return {name: float(divide(numerator.sum(), denominator.sum(), zero_division))}
    raise ValueError(f"average must be one of 'macro', 'micro', 'weighted', 'binary' or None, got {average!r}")


def averaged_score(
    name: str,
    ratio: Ratio,
    predictions,
    references,
    labels: Optional[Sequence[int]],
    average_mode: Optional[str],
    pos_label: int,
    sample_weight,
    zero_division: float,
) -> dict:
    """`{name: score}` of a per-class score `ratio(tp, fp, fn)` (numerator, denominator), averaged over `labels`."""
    labels, tp, fp, fn, support = per_class_counts(predictions, references, labels, sample_weight)
    numerator, denominator = ratio(tp, fp, fn)
    per_class = divide(numerator, denominator, zero_division)
    return average_scores(
        name, per_class, numerator, denominator, support, labels, average_mode, pos_label, zero_division
    )
