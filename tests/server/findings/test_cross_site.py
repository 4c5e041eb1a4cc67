"""Cross-site findings of one round: gross update and timing departures name the site and the cause."""

from common.rounds import RoundRecord, SiteRoundRow
from server.findings.cross_site import cross_site


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
    assert cross_site(_sites(honest)) == {}  # a clean round stays quiet
    f = cross_site(_sites([*honest, 0.0]))
    assert set(f) == {("s4", "free_rider")} and "equals the global model it received" in f[("s4", "free_rider")].message
    f = cross_site(_sites([*honest, 260.0]))
    assert set(f) == {("s4", "divergence")} and "50× the median norm" in f[("s4", "divergence")].message
    f = cross_site(_sites([*honest, 260.0], measured={"s0", "s1", "s2", "s3"}))  # big, and it measured no training
    assert set(f) == {("s4", "free_rider")}
    f = cross_site(_sites([*honest, 5.2], seconds=[10.0, 11.0, 9.0, 10.0, 41.0]))
    assert set(f) == {("s4", "straggler")} and "4× the median" in f[("s4", "straggler")].message
    # A site that sleeps before computing reports little compute; its handler span gives it away.
    rec = _sites([*honest, 5.2])
    for r in rec.sites:
        if r.phase == "train":
            r.started_at, r.ended_at = 100.0, 100.0 + (30.0 if r.site == "s4" else 1.0)
    assert set(cross_site(rec)) == {("s4", "straggler")}
    assert cross_site(_sites([0.0, 5.0])) == {}  # two sites: no median to compare against
    # A site with 10× the data (a skewed partition) takes ~10× as long, at the same speed per example: not a
    # straggler. A small site slow per example but quicker than the median is not one either.
    big = _sites([*honest, 5.2], seconds=[10.0, 11.0, 9.0, 2.0, 95.0], examples=[96, 96, 96, 14, 900])
    assert cross_site(big) == {}
    f = cross_site(_sites([*honest, 5.2], seconds=[10.0, 11.0, 9.0, 2.0, 130.0], examples=[96, 96, 96, 14, 300]))
    assert set(f) == {("s4", "straggler")}  # 3× the data but 13× the time
