"""Precision as an `evaluate` metric script, shipped with fcmoe_hf because the Hub's copy is unreachable offline.

The counting and averaging shared with `recall` and `f1` live in `fcmoe_hf.data.metrics._classification`, imported
absolutely because `evaluate.load` runs a copy of this script from its module cache.
"""

import evaluate

from fcmoe_hf.data.metrics._classification import averaged_kwargs_description, averaged_score, metric_info

_DESCRIPTION = """
Precision is the share of correct predictions among the predictions of a class: TP / (TP + FP). For several classes it is averaged (macro by default).
"""

_KWARGS_DESCRIPTION = averaged_kwargs_description("precision", "0.7222222222222222")


def _ratio(tp, fp, fn):
    """Per-class numerator and denominator of precision: TP / (TP + FP)."""
    return tp, tp + fp


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Precision(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "precision_score")

    def _compute(
        self, predictions, references, labels=None, average="macro", pos_label=1, sample_weight=None, zero_division=0.0
    ):
        return averaged_score(
            "precision", _ratio, predictions, references, labels, average, pos_label, sample_weight, zero_division
        )
