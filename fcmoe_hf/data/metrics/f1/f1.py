"""F1 as an `evaluate` metric script, shipped with fcmoe_hf because the Hub's copy is unreachable offline.

The counting and averaging shared with `precision` and `recall` live in `fcmoe_hf.data.metrics._classification`,
imported absolutely because `evaluate.load` runs a copy of this script from its module cache.
"""

import evaluate

from fcmoe_hf.data.metrics._classification import averaged_kwargs_description, averaged_score, metric_info

_DESCRIPTION = """
F1 is the harmonic mean of precision and recall, 2 TP / (2 TP + FP + FN). For several classes the per-class F1 scores are averaged (macro by default, as scikit-learn's f1_score).
"""

_KWARGS_DESCRIPTION = averaged_kwargs_description("f1", "0.6555555555555556")


def _ratio(tp, fp, fn):
    """Per-class numerator and denominator of f1: 2 TP / (2 TP + FP + FN)."""
    return 2 * tp, 2 * tp + fp + fn


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "f1_score")

    def _compute(
        self, predictions, references, labels=None, average="macro", pos_label=1, sample_weight=None, zero_division=0.0
    ):
        return averaged_score(
            "f1", _ratio, predictions, references, labels, average, pos_label, sample_weight, zero_division
        )
