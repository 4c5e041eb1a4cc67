"""The public DP-SGD schedule test: a site that runs many times the others' local steps overfits."""

from server.findings.evidence import SiteEvidence
from server.findings.schedule import overfitting


def test_many_times_the_median_local_steps_is_overfitting():
    # Prepare: four sites at 2 steps a round, one at 10 (the public ledger), over two rounds.
    sites = {f"s{i}": SiteEvidence(steps=[2, 2]) for i in range(4)}
    sites["x"] = SiteEvidence(steps=[10, 10])
    # Execute
    found = overfitting(sites)
    # Assert
    assert set(found) == {("x", "overfitting")}
    assert found[("x", "overfitting")].message.startswith(
        "x runs 10 local DP steps per round, 5× the others' median 2 (public ledger)")
    assert found[("x", "overfitting")].confidence == 0.9
    assert overfitting({**sites, "x": SiteEvidence(steps=[6, 6])}) == {}  # 3×: below STEPS_OUTLIER
    assert overfitting({"s0": sites["s0"], "x": sites["x"]}) == {}  # two sites: no median to compare against
