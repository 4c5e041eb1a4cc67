"""The stated detection limits: read conservatively for a site's size and noise, said in words, and a cell of the
table checked against a fresh measurement on synthetic releases."""

from fedlens.detection_limits import power
from server.findings.limits import MEASURED, SIZES, limits, sentence


def test_a_site_is_read_at_the_nearest_measured_cell_on_the_safe_side():
    assert limits(2200, 4.3) == {"label_noise": 0.2, "label_flip": 0.4, "data_shift": 0.7,  # n = 2000, ε = 8
                                 "domain_difference": 0.2}
    assert limits(2200, 5.0) == limits(2200, 8.0)  # noisier than ε = 8's σ: read at ε = 4's
    assert limits(1999, 4.3) == limits(1000, 4.3)  # below a measured size: the smaller one's
    assert limits(100, 4.3) is None and limits(2200, 40.0) is None and limits(None, 4.3) is None
    # Five releases at the demo's σ 4.8 average to four at 4.3: read at ε = 8's row; two releases, at ε = 4's.
    assert limits(2200, 4.806, releases=5) == limits(2200, 4.3)
    assert limits(2200, 4.3, releases=2) == limits(2200, 8.0)
    for _, table in MEASURED.values():  # a larger site never has a higher limit
        for row in table.values():
            known = [v for v in row if v is not None]
            assert known == sorted(known, reverse=True) and len(row) == len(SIZES)


def test_the_sentence_says_what_a_quiet_page_rules_out():
    assert sentence(2200, 4.3) == (
        "at 2200 rows and 4 summaries at σ 4.3, these cannot be seen (found in fewer than 9 runs of 10): label noise (a "
        "share of the labels replaced by a random other one) below 20%; a flip (a share of one class relabelled as "
        "another) below 40%; a data shift (a share of the texts the model reads as corrupted or foreign) below 70%; "
        "texts of another domain the model reads as well as its own (a share of them as far from the site's as drug "
        "reviews are from movie snippets) below 20%")
    assert "label noise (a share of the labels replaced by a random other one) at any share up to 50%" in \
        sentence(150, 4.3)
    assert sentence(100, 4.3).endswith("a quiet page rules out nothing here")


def test_a_measured_cell_holds_on_a_fresh_draw():
    # label noise at 2,000 rows and ε = 8: stated limit 0.2 (found ≥ 9 times in 10); well below it, rarely.
    found, alarms = power("label_noise", 0.2, n=2000, epsilon=8.0, trials=20, seed=7)
    assert found >= 0.8 and alarms == 0.0
    assert power("label_noise", 0.05, n=2000, epsilon=8.0, trials=20, seed=7)[0] < 0.5
    # foreign texts the model reads as well as its own, same site: stated 0.2; at 0.05, rarely.
    assert power("domain_shift", 0.2, n=2000, epsilon=8.0, trials=20, seed=7)[0] >= 0.8
    assert power("domain_shift", 0.05, n=2000, epsilon=8.0, trials=20, seed=7)[0] < 0.5
