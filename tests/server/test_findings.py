"""Findings: each direct rule fires on its evidence, once when it appears, again only when it comes back."""

import pytest

from common.rounds import RoundRecord, SiteRoundRow
from server.findings import FindingsTracker, current


def _round(rnd, *, share=0.5, snr=(2.0, 3.0), fail=False):
    # Sites a and b trained 4 steps: their round's signal-to-noise is √4 · the per-step value.
    sites = [SiteRoundRow("a", "train", "ok", steps=4), SiteRoundRow("b", "train", "ok", steps=4),
             SiteRoundRow("a", "evaluate", "ok", signal_to_noise=snr[0]),
             SiteRoundRow("b", "evaluate", "ok", signal_to_noise=snr[1]),
             SiteRoundRow("c", "train", "refused", reason="c: round 2 dpsgd would bring ε to 8.4 > budget 8"),
             SiteRoundRow("d", "train", "failed", reason="update rejected: weight w contains NaN or Inf")]
    if fail:
        sites.append(SiteRoundRow("e", "train", "failed", reason="no reply before the timeout"))
    return RoundRecord(rnd, 1.0, {"test_max_prediction_share": share, "test_macro_f1": 0.26}, sites)


def test_each_rule_fires_on_its_evidence_with_a_sentence():
    found = current(_round(3, share=0.97, snr=(0.2, 0.4), fail=True))
    assert set(found) == {("c", "budget_exhausted"), ("d", "update-rejected"), ("e", "site-failed"), (None, "majority_collapse"),
                          (None, "dp_noise_dominates")}
    assert found[("e", "site-failed")].severity == "critical"
    assert found[("e", "site-failed")].message == "e failed in train in round 3: no reply before the timeout"
    assert found[("d", "update-rejected")].message.endswith("weight w contains NaN or Inf")
    assert "97%" in found[(None, "majority_collapse")].message
    assert "at the top of its noise (+2 std), is 0.60 over the 2 sites" in (
        found[(None, "dp_noise_dominates")].message)  # median of 2·0.2 and 2·0.4 (no noise on these readings)
    # A reading whose own release noise could explain it does not fire the finding.
    noisy = _round(3, snr=(0.2, 0.4))
    for r in noisy.sites:
        if r.phase == "evaluate" and r.signal_to_noise is not None:
            r.signal_to_noise_std = 0.5
    assert (None, "dp_noise_dominates") not in current(noisy)
    assert set(current(_round(3))) == {("c", "budget_exhausted"), ("d", "update-rejected")}  # healthy otherwise


def test_a_finding_is_recorded_when_it_appears_and_again_only_after_it_cleared():
    tracker = FindingsTracker()
    first = tracker.update(_round(1, fail=True))
    assert {(f.site, f.kind) for f in first} == {("c", "budget_exhausted"), ("d", "update-rejected"), ("e", "site-failed")}
    assert tracker.update(_round(2, fail=True)) == []  # still open: not repeated
    assert tracker.update(_round(3)) == []  # e recovered
    assert [(f.site, f.kind) for f in tracker.update(_round(4, fail=True))] == [("e", "site-failed")]


def _sites(norms, seconds=None, measured=None, examples=None):
    rows = []
    for i, n in enumerate(norms):
        site = f"s{i}"
        rows.append(SiteRoundRow(site, "train", "ok", update_norm=n, seconds=(seconds or [10.0] * len(norms))[i],
                                 num_examples=(examples or [96] * len(norms))[i], steps=2, sample_rate=1.0))
        loss = None if measured is not None and site not in measured else 0.9
        rows.append(SiteRoundRow(site, "evaluate", "ok", train_loss=loss))
    return RoundRecord(2, 1.0, {}, rows)


def test_gross_update_and_timing_departures_name_the_site_and_cause():
    honest = [5.21, 5.19, 5.26, 5.23]  # DP-noised updates: norms within a few % (demo, measured)
    assert current(_sites(honest)) == {}  # a clean round stays quiet
    f = current(_sites([*honest, 0.0]))
    assert set(f) == {("s4", "free_rider")} and "equals the global model it received" in f[("s4", "free_rider")].message
    f = current(_sites([*honest, 260.0]))
    assert set(f) == {("s4", "divergence")} and "50× the median norm" in f[("s4", "divergence")].message
    f = current(_sites([*honest, 260.0], measured={"s0", "s1", "s2", "s3"}))  # big, and it measured no training
    assert set(f) == {("s4", "free_rider")}
    f = current(_sites([*honest, 5.2], seconds=[10.0, 11.0, 9.0, 10.0, 41.0]))
    assert set(f) == {("s4", "dropout")} and "4× the median" in f[("s4", "dropout")].message
    # A site that sleeps before computing reports little compute; its handler span gives it away.
    rec = _sites([*honest, 5.2])
    for r in rec.sites:
        if r.phase == "train":
            r.started_at, r.ended_at = 100.0, 100.0 + (30.0 if r.site == "s4" else 1.0)
    assert set(current(rec)) == {("s4", "dropout")}
    assert current(_sites([0.0, 5.0])) == {}  # two sites: no median to compare against
    # A site with 10× the data (a skewed partition) takes ~10× as long, at the same speed per example: not a
    # straggler. A small site slow per example but quicker than the median is not one either.
    big = _sites([*honest, 5.2], seconds=[10.0, 11.0, 9.0, 2.0, 95.0], examples=[96, 96, 96, 14, 900])
    assert current(big) == {}
    f = current(_sites([*honest, 5.2], seconds=[10.0, 11.0, 9.0, 2.0, 130.0], examples=[96, 96, 96, 14, 300]))
    assert set(f) == {("s4", "dropout")}  # 3× the data but 13× the time


def test_trends_of_the_global_model_become_run_level_findings():
    from server.findings import trends

    flat = [{"train_loss": 1.100, "test_loss": 1.0}, {"train_loss": 1.098, "test_loss": 1.0},
            {"train_loss": 1.095, "test_loss": 1.0}]
    found = trends(flat, 3)
    assert set(found) == {(None, "underfitting")} and "from 1.100 in round 1 to 1.095 in round 3" in \
        found[(None, "underfitting")].message
    overfit = [{"train_loss": 1.0, "test_loss": 0.80}, {"train_loss": 0.8, "test_loss": 0.82},
               {"train_loss": 0.6, "test_loss": 0.86}, {"train_loss": 0.4, "test_loss": 0.90}]
    assert set(trends(overfit, 4)) == {(None, "global_overfitting")}
    learning = [{"train_loss": 1.0, "test_loss": 0.9}, {"train_loss": 0.9, "test_loss": 0.85},
                {"train_loss": 0.8, "test_loss": 0.84}]
    assert trends(learning, 3) == {} and trends(learning[:2], 2) == {}


def test_miscalibration_needs_a_gap_that_holds_for_two_rounds():
    from server.findings import trends

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
    import numpy as np

    from common.metrics import calibration

    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    out = calibration(probs, labels)
    # bin 9: two at 0.95, one right -> |1 − 1.9| = 0.9; bin 5: 0.55 right -> 0.45; bin 7: 0.7 right -> 0.3
    assert out["ece"] == pytest.approx((0.9 + 0.45 + 0.3) / 4)
    assert out["confidence"] == pytest.approx((0.95 + 0.95 + 0.55 + 0.7) / 4)
