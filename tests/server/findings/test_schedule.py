"""The public DP-SGD schedule test: a site that makes many more passes over its data than the others overfits."""

from server.findings.evidence import SiteEvidence
from server.findings.schedule import overfitting


def test_several_times_the_others_passes_per_round_is_overfitting():
    # Four sites at 20 full-batch steps a round (20 passes), one at 60 steps on 30 examples (q = 1: 60 passes).
    sites = {f"s{i}": SiteEvidence(steps=[20, 20], passes=[20.0, 20.0]) for i in range(4)}
    sites["x"] = SiteEvidence(steps=[60, 60], passes=[60.0, 60.0])
    found = overfitting(sites)
    assert set(found) == {("x", "overfitting")}
    assert found[("x", "overfitting")].message.startswith(
        "x makes 60 passes over its training examples per round (60 local DP steps), 3.0× the others' median 20")
    assert found[("x", "overfitting")].confidence == 0.9
    assert found[("x", "overfitting")].message.endswith("overfit it and pull the average toward it")
    # Its update too long to average (server.update-norm-outlier): the sentence says where it went.
    sites_out = {**sites, "x": SiteEvidence(steps=[60, 60], passes=[60.0, 60.0], left_out=[1, 2])}
    assert overfitting(sites_out)[("x", "overfitting")].message.endswith(
        "overfit it; its update was left out of the average in 2 of 2 rounds (its norm many times the others', "
        "server.update-norm-outlier)")
    assert overfitting({**sites, "x": SiteEvidence(steps=[30, 30], passes=[30.0, 30.0])}) == {}  # 1.5×
    # At q < 1 the steps differ with the sizes but the passes do not: a large site is no suspect.
    big = SiteEvidence(steps=[200, 200], passes=[20.0, 20.0])
    assert overfitting({**sites, "x": big}) == {}
    assert overfitting({"s0": sites["s0"], "x": sites["x"]}) == {}  # two sites: no median to compare against
