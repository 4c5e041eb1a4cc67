"""Cross-site findings: free riders, diverging sites (the step size read off the DP noise) and stragglers (round
after round), each against the run's own sites."""

import numpy as np
import pytest

from common.rounds import RoundRecord, SiteRoundRow
from server.aggregate import noise_scale
from server.findings.cross_site import cross_site, stragglers


def _sites(norms, measured=None, scales=None):
    rows = []
    for i, n in enumerate(norms):
        site = f"s{i}"
        rows.append(SiteRoundRow(site, "train", "ok", update_norm=n, seconds=1.0, num_examples=96, steps=2,
                                 sample_rate=1.0, noise_scale=None if scales is None else scales[i]))
        loss = None if measured is not None and site not in measured else 0.9
        rows.append(SiteRoundRow(site, "evaluate", "ok", train_loss=loss))
    return RoundRecord(2, 1.0, {}, rows)


def test_updates_that_depart_name_the_site_and_cause():
    honest = [5.21, 5.19, 5.26, 5.23]  # DP-noised updates: norms within a few % (demo, measured)
    assert cross_site(_sites(honest)) == {}  # a clean round stays quiet
    f = cross_site(_sites([*honest, 0.0]))
    assert set(f) == {("s4", "free_rider")} and "equals the global model it received" in f[("s4", "free_rider")].message
    f = cross_site(_sites([*honest, 260.0]))  # no noise reading (no DP, or AdamW): the norm alone
    assert set(f) == {("s4", "divergence")} and "50× the median norm" in f[("s4", "divergence")].message
    f = cross_site(_sites([*honest, 260.0], measured={"s0", "s1", "s2", "s3"}))  # big, and it measured no training
    assert set(f) == {("s4", "free_rider")}
    assert cross_site(_sites([0.0, 5.0])) == {}  # two sites: no median to compare against
    # Random weights sent without a training step (the norm alone is ordinary): the schedule it reports gives it away.
    rec = _sites([*honest, 6.1])
    next(r for r in rec.sites if r.site == "s4" and r.phase == "train").steps = 0
    f = cross_site(rec)
    assert set(f) == {("s4", "free_rider")} and "after 0 training steps, where the other sites took 2" in \
        f[("s4", "free_rider")].message


def test_a_site_stepping_three_times_the_learning_rate_is_told_from_one_that_is_only_skewed():
    # A site holding one class pulls the head 3.5× harder (norm 9 vs 2-3, measured on a Dirichlet partition), at
    # the same step size; a learning rate ×3 triples the step size read off the noise.
    scales = [3.02, 2.95, 3.05, 2.99, 3.01]
    assert cross_site(_sites([2.1, 2.4, 9.0, 2.3, 2.2], scales=scales)) == {}
    f = cross_site(_sites([2.1, 2.4, 2.6, 2.3, 6.9], scales=[*scales[:4], 9.1]))
    assert set(f) == {("s4", "divergence")}
    assert "3.0× the DP noise of the other sites' at the same σ and schedule" in f[("s4", "divergence")].message


def test_the_step_size_is_read_off_the_noise_alone():
    # A head of 3 classes on 8 features: an update whose class-sum carries noise of std lr·σ·C/B per step.
    rng = np.random.default_rng(0)
    lr, sigma, c, steps, batch = 3.0, 5.0, 1.0, 20, 400.0
    ref = {"classifier.weight": np.zeros((3, 8)), "classifier.bias": np.zeros(3)}
    signal = rng.normal(size=(3, 8))
    signal -= signal.mean(axis=0)  # cross-entropy's gradient sums to 0 over the classes
    noise = {k: lr * rng.normal(0, sigma * c / batch * np.sqrt(steps), v.shape) for k, v in ref.items()}
    for skew in (1.0, 10.0):  # however large the signal, the reading is the learning rate
        arrays = {"classifier.weight": skew * signal + noise["classifier.weight"], "classifier.bias": noise["classifier.bias"]}
        got = noise_scale(arrays, ref, noise_multiplier=sigma, max_grad_norm=c, steps=steps, expected_batch=batch)
        assert got == pytest.approx(lr, rel=0.5)
    assert noise_scale(ref, ref, noise_multiplier=0.0, max_grad_norm=c, steps=steps, expected_batch=batch) is None


def test_a_straggler_is_slow_round_after_round_and_per_example():
    honest = {f"s{i}": [(40.0, None), (1.0 + 0.2 * i, 0.01), (1.1, 0.01), (1.2, 0.01)] for i in range(4)}
    # Round 1 computes features everywhere (40 s) and is left out; a site slow only then is no straggler.
    assert stragglers({**honest, "s4": [(90.0, None), (1.2, 0.01), (1.1, 0.01), (1.3, 0.01)]}, 4) == {}
    f = stragglers({**honest, "s4": [(40.0, None), (4.0, 0.04), (4.2, 0.04), (3.9, 0.04)]}, 4)
    assert set(f) == {("s4", "straggler")}
    assert "took 4.0 s to train in each of its last 2 rounds (to round 4)" in f[("s4", "straggler")].message
    # Ten times the data at the same speed per example: not a straggler.
    assert stragglers({**honest, "s4": [(40.0, None), (11.0, 0.01), (11.5, 0.01), (12.0, 0.01)]}, 4) == {}
    # Slow in one steady round only: not yet.
    assert stragglers({**honest, "s4": [(40.0, None), (1.2, 0.01), (1.1, 0.01), (4.0, 0.04)]}, 4) == {}


def test_a_straggler_among_sites_of_very_different_sizes_is_read_per_example():
    # A Dirichlet run (seed-3 pass): honest times spread 0.2-1.1 s with their sizes, so the limit on time is ~×26;
    # per example they differ ~2×. The straggler (×9 its own time) is ×13 per example: found.
    def site(seconds, examples):
        return [(30.0, None)] + [(seconds, seconds / examples)] * 3
    honest = {"s0": site(1.1, 47400), "s1": site(0.2, 5320), "s2": site(0.3, 23980), "s4": site(0.5, 31320)}
    f = stragglers({**honest, "s3": site(9.2, 44720)}, 4)
    assert set(f) == {("s3", "straggler")}
    assert stragglers({**honest, "s3": site(1.0, 44720)}, 4) == {}  # its size, their speed: not one
