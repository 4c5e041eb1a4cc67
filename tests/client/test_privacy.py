"""The privacy ledger: ε against dp-accounting, cumulative ε across rounds, calibration for all planned rounds."""

import dp_accounting as dpa
import pytest
from dp_accounting import rdp

from client.privacy import (
    DPSGD,
    SUMMARY,
    LedgerEntry,
    calibrate_noise_multiplier,
    epsilon,
    from_state,
    planned_entries,
    to_state,
)


def _dpa_epsilon(segments, delta):
    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), t) if q < 1
              else dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), t) for s, q, t in segments]
    acc = rdp.RdpAccountant()
    acc.compose(dpa.ComposedDpEvent(events))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, steps, delta, published", [
    (1.3, 0.0025, 6000, 1e-5, 0.72422),   # TF-Privacy test vector
    (1.0, 0.001, 30000, 1e-7, 1.41550),   # TF-Privacy test vector
    (1.0, 0.1, 50, 1e-5, 5.8854),         # a small FL client
    (1.5, 0.04, 2250, 1e-5, 7.32911),     # Opacus accountants_test
])
def test_dpsgd_epsilon_matches_dp_accounting(sigma, q, steps, delta, published):
    ours = epsilon([LedgerEntry(1, DPSGD, "subsampled-gaussian", sigma, q, steps, 1.0)], delta)
    assert ours == pytest.approx(_dpa_epsilon([(sigma, q, steps)], delta), rel=1e-3)
    assert ours == pytest.approx(published, rel=1e-3)


def test_training_and_releases_compose_like_dp_accounting():
    entries = planned_entries(noise_multiplier=1.1, sample_rate=0.25, steps_per_round=4, rounds=5,
                              release_noise_multiplier=3.0)
    expected = _dpa_epsilon([(1.1, 0.25, 4)] * 5 + [(3.0, 1.0, 1)] * 5, 1e-5)
    assert epsilon(entries, 1e-5) == pytest.approx(expected, rel=1e-3)


def test_cumulative_epsilon_over_three_rounds_equals_one_engines_epsilon():
    # Prepare: what Opacus's accountant reports after 30 steps of one engine
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.0, 0.1, 30)]
    one_engine = acc.get_epsilon(1e-5)
    # Execute: three rounds of 10 steps, ledgered separately
    ledger = [LedgerEntry(r, DPSGD, "subsampled-gaussian", 1.0, 0.1, 10, 1.0) for r in (1, 2, 3)]
    # Assert: and ε grows round by round (pinned numbers from dp.md)
    assert epsilon(ledger, 1e-5) == pytest.approx(one_engine, rel=1e-9)
    assert [round(epsilon(ledger[:k], 1e-5), 4) for k in (1, 2, 3)] == pytest.approx([3.4413, 4.2240, 4.8480],
                                                                                      abs=2e-3)


def test_calibration_spends_the_budget_over_all_planned_rounds():
    sigma = calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, sample_rate=0.25, steps_per_round=4,
                                       rounds=5, release_noise_multiplier=3.0)
    spent = epsilon(planned_entries(noise_multiplier=sigma, sample_rate=0.25, steps_per_round=4, rounds=5,
                                    release_noise_multiplier=3.0), 1e-5)
    assert 7.99 - 0.01 <= spent <= 8.0
    assert sigma == pytest.approx(1.163, abs=0.005)


def test_releases_that_alone_exceed_the_budget_are_refused_with_the_keys_to_change():
    with pytest.raises(ValueError, match="dp.target-epsilon = 1.0 leaves nothing for training.*release-noise"):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.25, steps_per_round=4, rounds=5,
                                   release_noise_multiplier=1.0)


def test_ledger_round_trips_through_state_columns():
    entries = [LedgerEntry(1, DPSGD, "subsampled-gaussian", 1.1, 0.25, 4, 1.0),
               LedgerEntry(1, SUMMARY, "gaussian", 3.0, 1.0, 1, 1.0)]
    assert from_state(to_state(entries)) == entries


def test_budget_check_refuses_the_step_that_would_overspend():
    from client.privacy import budget_check

    ledger = [LedgerEntry(1, DPSGD, "subsampled-gaussian", 1.0, 0.1, 50, 1.0)]  # ε = 5.881 at δ = 1e-5 (Opacus RDP orders; dp-accounting: 5.885)
    nxt = LedgerEntry(2, DPSGD, "subsampled-gaussian", 1.0, 0.1, 50, 1.0)
    assert budget_check(ledger, nxt, budget=100.0, delta=1e-5) == ""
    reason = budget_check(ledger, nxt, budget=6.0, delta=1e-5)
    assert reason == "round 2 dpsgd would bring ε to 7.899 > budget 6 (spent 5.881)"


def test_a_plan_whose_rounds_differ_is_calibrated_on_each_rounds_own_schedule():
    # LP-FT: 2 full-batch probe rounds of 20 steps, then 3 adapter rounds at q = 0.25, 8 steps.
    plan = [(1.0, 20)] * 2 + [(0.25, 8)] * 3
    sigma = calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, sample_rate=1.0, steps_per_round=20, rounds=5,
                                       release_noise_multiplier=None, per_round=plan)
    mixed = epsilon(planned_entries(noise_multiplier=sigma, sample_rate=1.0, steps_per_round=20, rounds=5,
                                    release_noise_multiplier=None, per_round=plan), 1e-5)
    assert 7.99 - 0.01 <= mixed <= 8.0
    # Planning every round like the first (the old single-schedule call) would spend another ε on the same σ.
    uniform = epsilon(planned_entries(noise_multiplier=sigma, sample_rate=1.0, steps_per_round=20, rounds=5,
                                      release_noise_multiplier=None), 1e-5)
    assert uniform > mixed + 0.5
