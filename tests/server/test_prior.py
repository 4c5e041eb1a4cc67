"""server/prior.py: the class prior from released label counts (inverse-variance per site, pooled over sites)."""

import numpy as np
import pytest

from server.prior import LabelCounts, fixed_prior


def test_releases_are_combined_by_inverse_variance_then_pooled():
    # Prepare: site a released twice (std 2, then std 1), site b once.
    counts = LabelCounts()
    counts.add("a", np.array([10.0, 0.0]), 2.0)
    counts.add("a", np.array([20.0, 5.0]), 1.0)
    counts.add("b", np.array([4.0, 6.0]), 3.0)
    # Execute
    pooled = counts.pooled()
    # Assert: a's estimate is (10/4 + 20/1) / (1/4 + 1) = 18 and (0 + 5) / 1.25 = 4; b's as released.
    np.testing.assert_allclose(pooled, [18.0 + 4.0, 4.0 + 6.0])
    assert counts.prior() == pytest.approx([(22 + 1) / (32 + 2), (10 + 1) / (32 + 2)])


def test_exact_counts_win_and_noised_negatives_count_as_zero():
    counts = LabelCounts()
    counts.add("a", np.array([100.0, 100.0]), 5.0)
    counts.add("a", np.array([30.0, 10.0]), 0.0)  # a run without DP: exact counts replace the estimate
    np.testing.assert_allclose(counts.pooled(), [30.0, 10.0])
    assert fixed_prior(np.array([-3.0, 8.0])) == pytest.approx([1 / 10, 9 / 10])
    assert LabelCounts().prior() is None  # nothing released yet: no prior


def test_the_estimate_survives_a_resume():
    counts = LabelCounts()
    counts.add("a", np.array([3.0, 7.0]), 2.0)
    again = LabelCounts.from_state(counts.to_state())
    np.testing.assert_allclose(again.pooled(), counts.pooled())
    assert again.precision == counts.precision


def test_one_site_cannot_set_the_prior():
    # A site releasing 10⁹ "exact" examples of class 0 set every site's loss prior to [1, 0, 0] (and 1e300 made it
    # NaN, which every honest site then refused, ending training for the run). Its total is capped at 4× the
    # others' median; releases that are not finite are ignored.
    counts = LabelCounts(max_ratio=4.0)
    for site in ("a", "b", "c"):
        counts.add(site, np.array([10.0, 10.0, 10.0]), 2.0)
    counts.add("liar", np.array([1e9, 0.0, 0.0]), 0.0)
    counts.add("nan", np.array([np.inf, 0.0, 0.0]), 1e-200)
    np.testing.assert_allclose(counts.pooled(), [30.0 + 120.0, 30.0, 30.0])
    assert counts.prior() == pytest.approx([151 / 213, 31 / 213, 31 / 213])
    assert LabelCounts(max_ratio=0.0).pooled() is None
