"""Recall as an `evaluate` metric script, shipped with fcmoe_hf because the Hub's copy is unreachable offline.

The counting and averaging shared with `precision` and `f1` live in `fcmoe_hf.data.metrics._classification`, imported
absolutely because `evaluate.load` runs a copy of this script from its module cache.
"""

import evaluate

from fcmoe_hf.data.metrics._classification import averaged_kwargs_description, averaged_score, metric_info

_DESCRIPTION = """
Recall is the share of a class's examples that are predicted as that class: TP / (TP + FN). For several classes it is averaged (macro by default).
"""

_KWARGS_DESCRIPTION = averaged_kwargs_description("recall", "0.6666666666666666")


def _ratio(tp, fp, fn):
    """Per-class numerator and denominator of recall: TP / (TP + FN)."""
    return tp, tp + fn


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Recall(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "recall_score")

    def _compute(
        self, predictions, references, labels=None, average="macro", pos_label=1, sample_weight=None, zero_division=0.0
    ):
        return averaged_score(
            "recall", _ratio, predictions, references, labels, average, pos_label, sample_weight, zero_division
        )
