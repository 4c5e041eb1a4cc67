"""The one-run privacy audit: its bound against hand-computed numbers, and the real DP-SGD path (train_local)
audited at ε = 1, where the product must pass and both broken mechanisms must fail.

Run as:  .venv/bin/pytest tests/fedlens/test_audit.py   (about 25 s on 2 cores)
"""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from client.privacy import DPSGD, LedgerEntry, epsilon
from fedlens import audit
from fedlens.cli import app


def test_all_correct_guesses_give_the_inverse_of_the_binomial_tail():
    # Prepare: 100 guesses, all right. Without δ the p-value is q^100, so the bound solves q^100 = 0.05.
    q = 0.05 ** (1 / 100)
    by_hand = math.log(q / (1 - q))  # 3.4930
    # Execute
    pure = audit.epsilon_lower_bound(m=1000, guesses=100, correct=100, delta=0.0, significance=0.05)
    with_delta = audit.epsilon_lower_bound(m=1000, guesses=100, correct=100, delta=1e-5, significance=0.05)
    # Assert
    assert by_hand == pytest.approx(3.4930, abs=1e-4) and pure == pytest.approx(by_hand, abs=1e-3)
    assert by_hand - 0.05 < with_delta <= pure  # δ > 0 can only lower the bound, here a little


def test_chance_level_guesses_give_zero_and_the_delta_term_adds_as_the_theorem_says():
    # Half right is what a coin does: nothing is rejected.
    assert audit.epsilon_lower_bound(m=1000, guesses=100, correct=50, delta=1e-5, significance=0.05) == 0.0
    assert audit.epsilon_lower_bound(m=1000, guesses=0, correct=0, delta=1e-5, significance=0.05) == 0.0
    # At ε = 0 (q = 1/2), 10 of 10 right: P[Bin(10, 1/2) ≥ 10] = 1 / 1024.
    assert audit.p_value(m=10, guesses=10, correct=10, epsilon=0.0, delta=0.0) == pytest.approx(1 / 1024)
    # 2 of 2 right, m = 10, δ = 0.01, ε = 0: tail 1/4; P[1 ≤ Bin < 2] / 1 = 1/2, P[0 ≤ Bin < 2] / 2 = 3/8;
    # p = 1/4 + 2 · 10 · 0.01 · 1/2 = 0.35.
    assert audit.p_value(m=10, guesses=2, correct=2, epsilon=0.0, delta=0.01) == pytest.approx(0.35)


def test_guesses_take_the_highest_as_in_and_the_lowest_as_out():
    scores = np.array([5.0, -3.0, 0.1, 4.0, -2.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    # top 2: canaries 0 (in, right) and 3 (out, wrong); bottom 2: canaries 1 and 4 (both out, right)
    assert audit.guess_counts(scores, included, 2) == (4, 3)
    assert audit.k_grid(2000) == [10, 20, 50, 100, 200, 500]


def test_the_coin_flips_ignore_every_seed():
    np.random.seed(0)
    a = audit.draw_canaries(256, 3, 1024)
    np.random.seed(0)
    b = audit.draw_canaries(256, 3, 1024)
    assert not np.array_equal(a.included, b.included) and 64 < a.included.sum() < 192


@pytest.mark.parametrize("mechanism", audit.MECHANISMS)
def test_at_epsilon_one_the_product_passes_and_each_broken_mechanism_is_caught(tiny_cfg, site_data, mechanism):
    # Execute: the real train_local on site-0's tiny-config split (q = 1/8, 16 steps) plus 2000 canaries.
    out = audit.run_audit(tiny_cfg, site_data.train, num_classes=site_data.num_classes, mechanism=mechanism,
                          canaries=2000, target_epsilon=1.0)
    # Assert: the claim is the ledger's ε for the (σ, q, steps) run, just under the target.
    s = out["schedule"]
    ran = [LedgerEntry(r, DPSGD, "subsampled-gaussian", s["noise_multiplier"], s["sample_rate"],
                       s["steps_per_round"], s["max_grad_norm"]) for r in range(1, s["rounds"] + 1)]
    assert out["epsilon_claimed"] == pytest.approx(epsilon(ran, out["delta"])) and 0.98 < out["epsilon_claimed"] <= 1
    assert s["sample_rate"] == 0.125 and s["steps"] == 16 and out["comparisons"] == 12
    if mechanism == "fedlens":
        assert out["epsilon_lower_bound"] <= 1.0 and out["verdict"] == "consistent"  # measured 0.08-0.25
    else:
        assert out["epsilon_lower_bound"] > 1.0 and out["verdict"] == "violated"  # measured 1.9-2.8
    if mechanism == "seeded-noise":
        assert out["attack"] == "seed-replay"  # white-box scoring alone sees only the honest noise level


def test_the_default_command_audits_the_smoke_scenario_in_seconds():
    # Execute: no argument but --json (simulations/smoke.toml: q = 1, 2 rounds × 20 epochs; claimed ε = 1, which
    # 2000 canaries can test: a claim above what they can certify would read "inconclusive").
    res = CliRunner().invoke(app, ["audit", "privacy", "--json"])
    # Assert
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"epsilon_claimed", "epsilon_lower_bound", "confidence", "canaries", "verdict", "guesses", "correct",
            "delta", "mechanism", "schedule"} <= set(out)
    assert out["scenario"] == "smoke" and out["mechanism"] == "fedlens" and out["confidence"] == 0.95
    assert out["epsilon_lower_bound"] <= out["epsilon_claimed"] and out["verdict"] == "consistent"
    assert abs(out["epsilon_claimed"] - 1.0) < 0.01 and out["epsilon_claimed"] < out["epsilon_reachable"]
    assert out["schedule"]["sample_rate"] == 1.0 and out["schedule"]["steps"] == 40 and out["seconds"] < 60


def test_the_text_report_is_a_few_lines_and_a_broken_mechanism_exits_1():
    res = CliRunner().invoke(app, ["audit", "privacy", "--mechanism", "scaled-noise", "--epsilon", "1",
                                   "--canaries", "1000"])
    lines = res.stdout.strip().splitlines()
    assert res.exit_code == 1 and 3 <= len(lines) <= 6
    assert "lower bound" in res.stdout and "VIOLATED" in lines[-1]
    bad = CliRunner().invoke(app, ["audit", "privacy", "--mechanism", "nope", "--canaries", "1"])
    assert bad.exit_code == 2 and "--mechanism must be one of" in bad.output and "--canaries must be" in bad.output


@pytest.mark.parametrize("mechanism", ["fedlens", "seeded-noise"])
def test_a_canary_row_moves_one_clipped_gradient_per_step_that_samples_it(tiny_cfg, site_data, mechanism):
    # Prepare: 200 canaries; "fedlens" without noise (σ = 0), "seeded-noise" at its σ, stripped by the attacker.
    k = site_data.num_classes
    plan = audit.plan_audit(tiny_cfg, n_real=len(site_data.train), m=200, target_epsilon=1.0, num_classes=k)
    plan = replace(plan, noise_multiplier=0.0) if mechanism == "fedlens" else plan
    canaries = audit.draw_canaries(200, k, audit.REAL_ROWS)
    # Execute
    weights, _ = audit.train_audited(tiny_cfg, plan, audit.audit_dataset(site_data.train, canaries),
                                     audit.REAL_ROWS + 200, k, mechanism)
    scores = audit.canary_scores(weights - audit.replayed_noise(tiny_cfg, plan, weights.shape), canaries, k, plan)
    # Assert: clipped to exactly C, in its descent direction, once per Poisson batch it is in; absent ones never move.
    inside = scores[canaries.included]
    np.testing.assert_allclose(inside, np.round(inside), atol=2e-3)
    assert inside.max() <= 16 and inside.mean() == pytest.approx(16 * 0.125, abs=0.6)
    np.testing.assert_allclose(scores[~canaries.included], 0.0, atol=1e-3)


def test_a_claim_beyond_what_the_canaries_can_certify_is_inconclusive_even_for_a_broken_mechanism():
    # 1000 canaries certify at most ~4.4 here: at a claimed ε = 8 even seeded noise (every guess right) cannot be
    # shown violated, and the audit must not call that "consistent".
    res = CliRunner().invoke(app, ["audit", "privacy", "--json", "--epsilon", "8", "--canaries", "1000",
                                   "--mechanism", "seeded-noise"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["verdict"] == "inconclusive" and out["epsilon_lower_bound"] <= out["epsilon_reachable"] < 8
