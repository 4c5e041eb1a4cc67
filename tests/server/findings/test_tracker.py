"""The tracker: a finding is recorded when it appears, again only after it cleared; the statistical tests run in
order; label skew between sites is a note, never a fault."""

import numpy as np

from common.rounds import SiteRoundRow
from fedlens.detection_limits import Fault
from server.findings import Diagnosis, FindingsTracker, current
from tests.server.findings.conftest import round_record
from tests.server.findings.test_labels import _found


def test_a_finding_is_recorded_when_it_appears_and_again_only_after_it_cleared():
    tracker = FindingsTracker(Diagnosis(loss_clip=3.0))
    first = tracker.update(round_record(1, fail=True))
    assert {(f.site, f.kind) for f in first} == {("c", "budget_exhausted"), ("d", "update_rejected"),
                                                 ("e", "site_failed")}
    assert tracker.update(round_record(2, fail=True)) == []  # still open: not repeated
    assert tracker.update(round_record(3)) == []  # e recovered
    assert [(f.site, f.kind) for f in tracker.update(round_record(4, fail=True))] == [("e", "site_failed")]


def test_a_round_holds_the_direct_and_the_cross_site_findings():
    rec = round_record(2)
    rec.sites = [*rec.sites, *(SiteRoundRow(s, "train", "ok", update_norm=n) for s, n in
                               (("f", 5.2), ("g", 5.3), ("h", 0.0)))]
    assert list(current(rec)) == [("c", "budget_exhausted"), ("d", "update_rejected"), ("h", "free_rider")]


def test_label_skew_between_sites_is_a_note_and_a_faulty_site_among_them_is_still_named():
    # Three of five sites hold label mixes far from the rest (as a Dirichlet partition gives), their labels right:
    # per class they read as the others, so the run gets a note and no site is a suspect.
    skewed = {"site-0": np.array([0.1, 0.9]), "site-1": np.array([0.85, 0.15]), "site-3": np.array([0.3, 0.7])}
    for seed in range(3):
        found, _ = _found({}, seed=seed, site_shares=skewed)
        assert {k for k, f in found.items() if f.severity != "info"} == set(), {k: f.message for k, f in found.items()}
        note = found[(None, "label_skew")]
        assert note.severity == "info" and "of 5 sites" in note.message  # the run's own count
    # A class one site lacks where skew is the rule among the others is part of that skew (info); where the others
    # share one mix it is a fault (test_labels).
    found, _ = _found({"site-4": Fault("class_missing", 1.0, a=0)}, site_shares=skewed)
    assert not [k for k, f in found.items() if k[0] == "site-4" and f.severity != "info"]
    # Where the mixes differ but every other site holds a fair share of the class (a natural partition), its
    # absence is the site's own: a warning, even in a run with the label_skew note.
    mild = {"site-0": np.array([0.35, 0.65]), "site-1": np.array([0.5, 0.5]), "site-3": np.array([0.4, 0.6])}
    found, _ = _found({"site-4": Fault("class_missing", 1.0, a=0)}, site_shares=mild)
    assert (None, "label_skew") in found
    assert found[("site-4", "class_missing")].severity == "warning", found[("site-4", "class_missing")].message
    # A site with noisy labels among them departs for its fault, and is named for it.
    found, _ = _found({"site-4": Fault("label_noise", 0.4)}, site_shares=skewed)
    assert {k for k, f in found.items() if f.severity != "info"} == {("site-4", "label_noise")}
