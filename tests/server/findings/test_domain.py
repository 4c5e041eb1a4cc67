"""Where a site's texts sit in the encoder's space, on synthetic releases: unit vectors around two class centroids,
summed per predicted class and noised as a site releases them (std σ·Δ / w, w = 1; the counts per predicted class
are column sums of the train confusion, K cells of weight 0.5). A site holding foreign texts sits
apart; a site whose label mix differs, or whose labels are wrong, does not (the block groups by prediction)."""

import numpy as np
import pytest

from common.diagnostics import SENSITIVITY
from server.findings.agreement import Agreement
from server.findings.domain import MIN_GAP, departs, domain_gaps
from server.findings.evidence import SiteEvidence
from server.findings.loss import data_shift

H = 64
SIGMA = 4.3  # the summary's σ at ε = 8 over 4 rounds
STD = SIGMA * SENSITIVITY  # an embedding cell's noise (weight 1)
COUNT_STD = np.sqrt(2) * SIGMA * SENSITIVITY / 0.5  # a predicted class's count: 2 cells of weight 0.5


def _texts(rng, n, share1, foreign=0.0):
    """(unit vectors, the class a model predicts for each): two classes 0.4 apart, a shared domain direction;
    `foreign`: that share of texts from another domain (its own centroid, 0.7 from this one)."""
    base = np.zeros(H)
    base[0] = 0.45
    cls = np.zeros((2, H))
    cls[0, 1], cls[1, 1] = -0.2, 0.2
    other = np.zeros(H)
    other[2] = 0.7
    y = (rng.random(n) < share1).astype(int)
    centre = base + cls[y] + np.outer(rng.random(n) < foreign, other)
    x = centre + rng.normal(0, 0.11, (n, H))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pred = np.where(rng.random(n) < 0.8, y, 1 - y)  # an 80 %-accurate model
    return x, pred


def _gaps(sites, rounds=4, seed=0, std=STD, count_std=COUNT_STD):
    """sites: name -> (n, share of class 1, foreign share); returns domain_gaps after `rounds` noised releases."""
    rng = np.random.default_rng(seed)
    data = {s: _texts(rng, *spec) for s, spec in sites.items()}
    evidence = {s: SiteEvidence(n_train=spec[0], noised=std > 0) for s, spec in sites.items()}
    for r in range(1, rounds + 1):
        for s, (x, pred) in data.items():
            sums = np.zeros((2, H))
            np.add.at(sums, pred, x)
            counts = np.bincount(pred, minlength=2).astype(float)
            evidence[s].embeddings[r] = (sums + rng.normal(0, std, sums.shape) if std else sums,
                                         counts + (rng.normal(0, count_std, 2) if count_std else 0.0), std ** 2,
                                         count_std ** 2)
    return domain_gaps(evidence)


def test_foreign_texts_sit_apart_and_the_gap_reads_their_share():
    gaps = _gaps({"a": (1200, 0.5, 0.0), "b": (1300, 0.5, 0.0), "c": (1100, 0.5, 0.0), "d": (1200, 0.5, 0.4),
                  "e": (1250, 0.5, 0.0)})
    assert departs(gaps["d"], 4.0)
    # 40 % of its texts moved by 0.7 before normalising: its centroids sit ~0.25 from the others'.
    assert 0.15 < gaps["d"].gap < 0.35 and gaps["d"].z > 6 and gaps["d"].rounds == 4
    assert not any(departs(gaps[s], 4.0) for s in "abce")


@pytest.mark.parametrize("seed", range(5))
def test_a_skewed_label_mix_alone_does_not_sit_apart(seed):
    # Grouped by the class the model predicts, a site that holds 85 % of one class compares like with like.
    gaps = _gaps({"a": (1200, 0.5, 0.0), "b": (1300, 0.85, 0.0), "c": (1100, 0.5, 0.0), "d": (1200, 0.15, 0.0),
                  "e": (1250, 0.5, 0.0)}, seed=seed)
    assert not any(departs(g, 4.0) for g in gaps.values()), {s: (round(g.gap, 3), round(g.z, 1)) for s, g in gaps.items()}


def test_without_noise_the_null_is_sampling_alone():
    gaps = _gaps({"a": (400, 0.5, 0.0), "b": (500, 0.5, 0.0), "c": (450, 0.5, 0.0), "d": (400, 0.5, 0.2)}, std=0.0,
                 count_std=0.0)
    assert departs(gaps["d"], 4.0) and gaps["d"].gap >= MIN_GAP
    assert max(abs(gaps[s].excess) for s in "abc") < 0.002  # sampling taken out: the honest sites' excess is ~0


def test_a_domain_the_model_reads_as_well_is_a_note_and_a_worse_one_a_data_shift():
    gaps = _gaps({"a": (1200, 0.5, 0.0), "b": (1300, 0.5, 0.0), "c": (1100, 0.5, 0.0), "d": (1200, 0.5, 0.5),
                  "e": (1250, 0.5, 0.0)})
    ev = SiteEvidence(n_train=1200, noised=True, confidence=[(0.8, 1e-4)] * 4)
    calm = Agreement(excess=0.01, scale=0.02, rate=0.0, pattern=np.zeros((2, 2)), entries=4, confidence_drop=0.004,
                     confidence_z=0.3)
    note = data_shift("site-3", ev, calm, None, gaps["d"])
    assert note.kind == "domain_difference" and note.severity == "info"
    assert note.message.startswith(f"site-3's texts differ from the other sites': its texts sit {gaps['d'].gap:.2f} "
                                   "from the others' in the encoder's space")
    assert "over 4 noised releases" in note.message and "reads them as well as the others'" in note.message
    assert "confidence -0.00 against theirs, z = -0.3" in note.message
    unsure = Agreement(excess=0.03, scale=0.02, rate=0.05, pattern=np.zeros((2, 2)), entries=4,
                       confidence_drop=0.03, confidence_z=2.5)
    shift = data_shift("site-3", ev, unsure, None, gaps["d"])
    assert shift.kind == "data_shift" and shift.severity == "warning"
    assert "reads them worse: its mean confidence on them is 0.03 below the others' (z = 2.5)" in shift.message
    # Garbled text at a site holding one class, read *more* confidently as it: no reading "as well" either.
    surer = Agreement(excess=-0.3, scale=0.04, rate=-1.0, pattern=np.zeros((2, 2)), entries=4,
                      confidence_drop=-0.1, confidence_z=-3.9)
    shift = data_shift("site-3", ev, surer, None, gaps["d"])
    assert shift.kind == "data_shift"
    assert "reads them otherwise: its mean confidence on them is 0.10 above the others' (z = 3.9)" in shift.message
    assert data_shift("site-3", ev, calm, None, gaps["a"]) is None  # no gap, no confidence drop: nothing
    exact = SiteEvidence(n_train=1200, noised=False, confidence=[(0.8, 0.0)] * 4)
    assert "exact releases" in data_shift("site-3", exact, calm, None, gaps["d"]).message


def test_a_block_of_another_width_is_left_out_not_a_crash():
    rng = np.random.default_rng(0)
    sites = {s: SiteEvidence(n_train=1000, noised=True) for s in "abcde"}
    for r in (1, 2):
        for s, ev in sites.items():
            width = 16 if s == "e" else H  # site e declares another width (a malformed or lying reply)
            sums = rng.normal(0, 1, (2, width)) + 200.0 / np.sqrt(width)
            ev.embeddings[r] = (sums, np.array([500.0, 500.0]), STD ** 2, COUNT_STD ** 2)
    gaps = domain_gaps(sites)
    assert "e" not in gaps and set(gaps) == set("abcd")


def test_a_class_the_site_hardly_predicts_is_left_out():
    # 30 texts predicted as class 1 under count noise of std ~34: the class's centroid scale is noise, so it must
    # not make the site read as apart (a count that small at this noise is below COUNT_NOISE stds).
    rng = np.random.default_rng(1)
    sites = {s: SiteEvidence(n_train=1000, noised=True) for s in "abcde"}
    for r in range(1, 5):
        for s, ev in sites.items():
            n1 = 30.0 if s == "c" else 500.0
            mu = np.zeros(H)
            mu[0] = 0.46
            sums = np.stack([1000.0 - n1, n1])[:, None] * mu + rng.normal(0, STD, (2, H))
            counts = np.array([1000.0 - n1, n1]) + rng.normal(0, COUNT_STD, 2)
            ev.embeddings[r] = (sums, counts, STD ** 2, COUNT_STD ** 2)
    assert not any(departs(g, 4.0) for g in domain_gaps(sites).values())
