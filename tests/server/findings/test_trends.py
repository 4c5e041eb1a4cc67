"""Trends of the global model over rounds: underfitting, global overfitting and miscalibration, run-level."""

import numpy as np
import pytest

from common.metrics import calibration
from server.findings.trends import trends


def test_trends_of_the_global_model_become_run_level_findings():
    flat = [{"train_loss": 1.100, "test_loss": 1.0}, {"train_loss": 1.098, "test_loss": 1.0},
            {"train_loss": 1.095, "test_loss": 1.0}]
    found = trends(flat, 3)
    assert set(found) == {(None, "underfitting")} and "from 1.100 in round 1 to 1.095 in round 3 (-0.5%)" in \
        found[(None, "underfitting")].message
    rising = [{"train_loss": 0.871}, {"train_loss": 0.890}, {"train_loss": 0.914}]  # the change keeps its sign
    assert "from 0.871 in round 1 to 0.914 in round 3 (+4.9%)" in trends(rising, 3)[(None, "underfitting")].message
    overfit = [{"train_loss": 1.0, "test_loss": 0.80}, {"train_loss": 0.8, "test_loss": 0.82},
               {"train_loss": 0.6, "test_loss": 0.86}, {"train_loss": 0.4, "test_loss": 0.90}]
    assert set(trends(overfit, 4)) == {(None, "global_overfitting")}  # no accuracy recorded: the loss decides
    assert "rose for 2 rounds to 0.900 (best 0.800) while the sites' training loss fell to 0.400" in \
        trends(overfit, 4)[(None, "global_overfitting")].message
    # A test loss that rises while the test accuracy rises is a model growing more confident (a clean DP run on
    # the movies: 0.526 → 0.557 with accuracy 0.742 → 0.756), not overfitting.
    confident = [{**r, "test_accuracy": a} for r, a in zip(overfit, (0.74, 0.745, 0.75, 0.756), strict=True)]
    assert trends(confident, 4) == {}
    worse = [{**r, "test_accuracy": a} for r, a in zip(overfit, (0.74, 0.75, 0.73, 0.71), strict=True)]
    assert set(trends(worse, 4)) == {(None, "global_overfitting")}
    # A fall within the accuracy's sampling noise is not worse (a clean movie run: 0.756 → 0.755 over the rounds).
    flat_acc = [{**r, "test_accuracy": a} for r, a in zip(overfit, (0.748, 0.756, 0.752, 0.755), strict=True)]
    assert trends(flat_acc, 4) == {}
    # The fall must exceed what the test part's size lets sampling alone do (2 binomial std): 0.75 → 0.71 is 2.9
    # std on 1,000 snippets, 1.1 on 150 reviews.
    assert set(trends([{**r, "test_examples": 1000.0} for r in worse], 4)) == {(None, "global_overfitting")}
    assert trends([{**r, "test_examples": 150.0} for r in worse], 4) == {}
    learning = [{"train_loss": 1.0, "test_loss": 0.9}, {"train_loss": 0.9, "test_loss": 0.85},
                {"train_loss": 0.8, "test_loss": 0.84}]
    assert trends(learning, 3) == {} and trends(learning[:2], 2) == {}


def test_miscalibration_needs_a_gap_that_holds_for_two_rounds():
    def rnd(conf, acc):
        return {"test_confidence": conf, "test_accuracy": acc, "test_ece": abs(conf - acc)}

    over = trends([rnd(0.70, 0.66), rnd(0.91, 0.70), rnd(0.93, 0.71)], 3)
    assert set(over) == {(None, "miscalibration")}
    assert "confidence is 0.93 but its accuracy 0.71 in round 3 (gap +0.22 for 2 rounds" in \
        over[(None, "miscalibration")].message and "overconfident" in over[(None, "miscalibration")].message
    assert "underconfident" in trends([rnd(0.45, 0.60), rnd(0.44, 0.62)], 2)[(None, "miscalibration")].message
    assert trends([rnd(0.65, 0.654), rnd(0.66, 0.65)], 2) == {}  # the collapsed tiny model: calibrated
    assert trends([rnd(0.60, 0.75), rnd(0.90, 0.70)], 2) == {}  # under, then over: a swing, not a state
    assert trends([rnd(0.95, 0.70)], 1) == {}  # one round is not enough
    assert trends([{"test_accuracy": 0.7}, {"test_accuracy": 0.7}], 2) == {}  # no server test set


def test_calibration_metric_pins_ece_and_confidence():
    # The server-side metrics the miscalibration rule reads (common/metrics.calibration).
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    out = calibration(probs, labels)
    # bin 9: two at 0.95, one right -> |1 − 1.9| = 0.9; bin 5: 0.55 right -> 0.45; bin 7: 0.7 right -> 0.3
    assert out["ece"] == pytest.approx((0.9 + 0.45 + 0.3) / 4)
    assert out["confidence"] == pytest.approx((0.95 + 0.95 + 0.55 + 0.7) / 4)
