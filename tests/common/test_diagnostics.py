"""Step 3's contract (common/diagnostics.py): what a released summary says, on hand-built blocks."""

import math

import numpy as np
import pytest

from common import diagnostics as dg
from common.metrics import per_class_f1


def test_derived_numbers_on_a_hand_built_summary():
    k = 3
    b = dg.empty_blocks(k)
    b["confusion"] = np.array([[5.0, 0, 5], [0, 0, 2], [0, 0, 8]])
    b["val_loss_sum"][0] = 6.0  # × L=3 / 20 examples = 0.9
    b["train_loss_sum"][0] = 10.0  # × 3 / 60 = 0.5
    b["calibration"][0, 9] = 10  # 10 correct at confidence 0.9-1.0 (mid 0.95)
    b["calibration"][1, 5] = 10  # 10 wrong at 0.5-0.6 (mid 0.55): accuracy 0
    b["label_issues"][2, 0] = 3
    b["grad_norm_hist"] = np.array([0, 0, 0, 2.0, 6.0, 2.0, 0, 0, 0])  # 8 of 10 at or above C
    b["clipped_sum_norm"][0] = 5.0
    d = dg.derive(b, loss_clip=3.0, n_val=20, n_train=60, dpsgd_noise_multiplier=1.0, trainable_values=100)
    assert d["accuracy"] == 13 / 20
    assert d["per_class"]["recall"][0] == 0.5 and d["per_class"]["precision"][2] == pytest.approx(8 / 15)
    assert math.isnan(d["per_class"]["precision"][1])  # never predicted: undefined, not 0
    assert d["loss"]["val"] == pytest.approx(0.9) and d["loss"]["gap"] == pytest.approx(0.4)
    assert d["calibration"]["ece"] == pytest.approx((10 * 0.05 + 10 * 0.55) / 20)
    assert d["label_issues"]["total"] == 3 and d["label_issues"]["share"] == 0.15
    b["label_issues"][0, 1] = -1.0  # a noised cell below 0: the total keeps it (unbiased), the matrix shows 0
    d2 = dg.derive(b, loss_clip=3.0, n_val=20, n_train=60)
    assert d2["label_issues"]["total"] == 2 and d2["label_issues"]["matrix"][0][1] == 0
    h = d["dp_health"]
    assert h["clip_fraction"] == 0.8
    assert h["mean_grad_norm"] == pytest.approx((2 * 0.875 + 6 * 1.25 + 2 * 1.75) / 10)
    assert h["signal_to_noise"] == pytest.approx(5.0 / 1.0)  # ‖Σ clipped‖ / (σ·C), C-units: 5 / σ
    assert h["noise_to_signal"] == pytest.approx(1.0 * 10 / 5.0)  # deprecated: σ·√d / ‖Σ clipped‖
    assert dg.derive(b, loss_clip=3.0, n_val=20, n_train=60, trained=False)["dp_health"] is None


def test_thresholds_come_from_noised_self_confidence_with_a_floor_for_rare_classes():
    t = dg.thresholds(np.array([30.0, 2.0, 0.0]), np.array([50.0, 3.0, 10.0]))
    np.testing.assert_allclose(t, [0.6, dg.DEFAULT_THRESHOLD, 1 / 3])


def test_clamping_and_rescaling_to_the_public_total_keeps_ratios():
    np.testing.assert_allclose(dg.clamp_to_total(np.array([3.0, -2.0, 9.0]), 6.0), [1.5, 0.0, 4.5])
    noised = np.array([[5.0, -1.0, 3.0], [0.5, -4.0, 2.0], [1.0, 2.0, 20.0]])
    fixed = dg.clamp_to_total(noised, 30.0)
    assert (fixed >= 0).all() and fixed.sum() == pytest.approx(30.0)
    np.testing.assert_allclose(per_class_f1(fixed), per_class_f1(np.clip(noised, 0, None)))
