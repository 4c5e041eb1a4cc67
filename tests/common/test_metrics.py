"""common/metrics.py: metrics from (possibly noised) counts, on a hand-built confusion matrix."""

import numpy as np

from common.metrics import accuracy, macro_f1, per_class_f1


def test_metrics_from_a_hand_built_confusion_matrix():
    c = np.array([[5, 0, 5], [0, 0, 2], [0, 0, 8]])
    assert accuracy(c) == 13 / 20
    np.testing.assert_allclose(per_class_f1(c), [2 * 5 / 15, 0.0, 2 * 8 / 23])
    assert macro_f1(np.array([[0, 0, 10], [0, 0, 5], [0, 0, 20]])) == (2 * 20 / 55) / 3  # collapsed: ≈ 1/K of F1
