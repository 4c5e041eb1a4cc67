"""Findings: each direct rule fires on its evidence, once when it appears, again only when it comes back."""

from common.run_store import RoundRecord, SiteRoundRow
from server.findings import FindingsTracker, current


def _round(rnd, *, share=0.5, nsr=(2.0, 3.0), fail=False):
    sites = [SiteRoundRow("a", "evaluate", "ok", noise_to_signal=nsr[0]),
             SiteRoundRow("b", "evaluate", "ok", noise_to_signal=nsr[1]),
             SiteRoundRow("c", "train", "refused", reason="c: round 2 dpsgd would bring ε to 8.4 > budget 8"),
             SiteRoundRow("d", "train", "failed", reason="update rejected: weight w contains NaN or Inf")]
    if fail:
        sites.append(SiteRoundRow("e", "train", "failed", reason="no reply before the timeout"))
    return RoundRecord(rnd, 1.0, {"test_max_prediction_share": share, "test_macro_f1": 0.26}, sites)


def test_each_rule_fires_on_its_evidence_with_a_sentence():
    found = current(_round(3, share=0.97, nsr=(25.0, 40.0), fail=True))
    assert set(found) == {("c", "site-refused"), ("d", "update-rejected"), ("e", "site-failed"), (None, "collapsed"),
                          (None, "noise-dominated")}
    assert found[("e", "site-failed")].severity == "critical"
    assert found[("e", "site-failed")].message == "e failed in train in round 3: no reply before the timeout"
    assert found[("d", "update-rejected")].message.endswith("weight w contains NaN or Inf")
    assert "97%" in found[(None, "collapsed")].message
    assert "median ‖noise‖ / ‖Σ clipped gradients‖ = 32" in found[(None, "noise-dominated")].message
    assert set(current(_round(3))) == {("c", "site-refused"), ("d", "update-rejected")}  # healthy otherwise


def test_a_finding_is_recorded_when_it_appears_and_again_only_after_it_cleared():
    tracker = FindingsTracker()
    first = tracker.update(_round(1, fail=True))
    assert {(f.site, f.kind) for f in first} == {("c", "site-refused"), ("d", "update-rejected"), ("e", "site-failed")}
    assert tracker.update(_round(2, fail=True)) == []  # still open: not repeated
    assert tracker.update(_round(3)) == []  # e recovered
    assert [(f.site, f.kind) for f in tracker.update(_round(4, fail=True))] == [("e", "site-failed")]
