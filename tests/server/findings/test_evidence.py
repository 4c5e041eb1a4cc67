"""Accumulating each site's released blocks over rounds, and the statistics the tests share."""

import pytest

from common.rounds import RoundRecord, SiteRoundRow, SiteSummary
from server.findings.evidence import SiteEvidence, accumulate, confidence, median_spread
from tests.server.findings.conftest import released_run


def test_released_blocks_add_up_to_means_with_known_noise():
    # Prepare: one site trained 2 steps on 20 examples, then released labels and Σ min(loss, L) / L over its
    # whole train split of 30 (σ-noised: std 2 per label cell, 1 on the loss sum).
    def rnd(r, trained):
        summary = SiteSummary(round_trained=trained, noise_multiplier=1.0, derived={}, n_train=30,
                              released={"train_labels": [10.0, 5.0, 15.0], "train_loss_sum": [6.0]},
                              noise_std={"train_labels": 2.0, "train_loss_sum": 1.0})
        return RoundRecord(r, 1.0, {}, [SiteRoundRow("a", "train", "ok", num_examples=20, steps=2),
                                        SiteRoundRow("a", "evaluate", "ok", summary=summary)])

    sites: dict[str, SiteEvidence] = {}
    # Execute: round 2's summary measured an earlier round's training, so its loss block does not count.
    accumulate(sites, rnd(1, trained=1), loss_clip=3.0)
    accumulate(sites, rnd(2, trained=1), loss_clip=3.0)
    # Assert
    ev = sites["a"]
    assert ev.n_train == 30 and ev.steps == [2, 2] and ev.label_rounds == 2 and ev.label_var == 4.0
    assert ev.label_mean().tolist() == [10.0, 5.0, 15.0]
    assert ev.loss_rounds == 1 and ev.loss_mean() == pytest.approx(6.0 * 3.0 / 30)  # nats
    assert ev.loss_var_sum == pytest.approx((1.0 * 3.0 / 30) ** 2)


def test_median_spread_and_confidence():
    assert median_spread([1.0, 2.0, 4.0]) == (2.0, pytest.approx(1.4826))
    assert confidence(4.0) == 0.977 and confidence(2.0) == 0.5 and confidence(40.0) == 0.999


def test_a_site_that_trains_on_a_few_examples_is_judged_on_its_whole_train_split():
    # An overfitting site trains on 16 of its ~150 examples each round; its label histogram still covers all of
    # them (the summary carries the split's public size), so its labels read as ordinary.
    assert released_run({}, n=150, trained_on={"site-0": 16}) == {}
