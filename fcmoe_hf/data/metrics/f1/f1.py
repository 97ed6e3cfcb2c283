"""F1 as an `evaluate` metric script, shipped with fcmoe_hf because the Hub's copy is unreachable offline.

Self-contained on purpose: `evaluate.load` imports each metric script on its own.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
F1 is the harmonic mean of precision and recall, 2 TP / (2 TP + FP + FN). For several classes the per-class F1 scores are averaged (macro by default, as scikit-learn's f1_score).
"""

_KWARGS_DESCRIPTION = """
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
    f1 (`float`, or `list` of `float` when `average=None`).

Examples:
    >>> f1 = evaluate.load("fcmoe_hf/data/metrics/f1")
    >>> f1.compute(references=[0, 0, 1, 1, 2, 2], predictions=[0, 1, 1, 1, 2, 0])
    {'f1': 0.6555555555555556}
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


def _per_class_counts(predictions, references, labels, sample_weight):
    """True positives, false positives, false negatives (weighted) and support of every class in `labels`."""
    predictions = np.asarray(predictions, dtype=np.int64)
    references = np.asarray(references, dtype=np.int64)
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
    weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if weights.shape != references.shape:
        raise ValueError(f"sample_weight has shape {weights.shape}, expected {references.shape}")
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


def _divide(numerator, denominator, zero_division):
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(numerator.shape, float(zero_division))
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _average(name, per_class, numerator, denominator, support, labels, average, pos_label, zero_division):
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
        return {name: float(_divide(numerator.sum(), denominator.sum(), zero_division))}
    raise ValueError(f"average must be one of 'macro', 'micro', 'weighted', 'binary' or None, got {average!r}")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(
        self, predictions, references, labels=None, average="macro", pos_label=1, sample_weight=None, zero_division=0.0
    ):
        labels, tp, fp, fn, support = _per_class_counts(predictions, references, labels, sample_weight)
        per_class = _divide(2 * tp, 2 * tp + fp + fn, zero_division)
        return _average("f1", per_class, 2 * tp, 2 * tp + fp + fn, support, labels, average, pos_label, zero_division)
