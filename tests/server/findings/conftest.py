"""Rounds for the findings tests: one round's replies for the direct rules, and synthetic noised releases for the
statistical tests (five sites' label histograms, losses and probes as the real releases carry them, through
Diagnosis round by round)."""

import numpy as np

from common.rounds import RoundRecord, SiteRoundRow, SiteSummary
from server.findings import Diagnosis

P = np.array([0.25, 0.11, 0.64])  # the drug reviews' label shares (negative, neutral, positive)
STD = 8.6  # noise std of a train-label cell at σ ≈ 4.3 (ε = 8, 4 rounds): σ·Δ, Δ = 2
NAMES = ("negative", "neutral", "positive")


def round_record(rnd, *, share=0.5, snr=(2.0, 3.0), fail=False):
    """One round: a, b trained; c refused; d's update rejected; e failed (with fail)."""
    # Sites a and b trained 4 steps: their round's signal-to-noise is √4 · the per-step value.
    sites = [SiteRoundRow("a", "train", "ok", steps=4), SiteRoundRow("b", "train", "ok", steps=4),
             SiteRoundRow("a", "evaluate", "ok", signal_to_noise=snr[0]),
             SiteRoundRow("b", "evaluate", "ok", signal_to_noise=snr[1]),
             SiteRoundRow("c", "train", "refused", reason="c: round 2 dpsgd would bring ε to 8.4 > budget 8"),
             SiteRoundRow("d", "train", "failed", reason="update rejected: weight w contains NaN or Inf")]
    if fail:
        sites.append(SiteRoundRow("e", "train", "failed", reason="no reply before the timeout"))
    return RoundRecord(rnd, 1.0, {"test_max_prediction_share": share, "test_macro_f1": 0.26}, sites)


def _histogram(rng, n, fault, p=P):
    labels = rng.choice(3, size=n, p=p)
    if fault == "class_missing":
        labels = labels[labels != 0]
    elif fault == "label_flip":
        labels[labels == 2] = 0
    elif fault == "label_noise":
        hit = rng.random(n) < 0.5
        labels[hit] = (labels[hit] + rng.integers(1, 3, size=hit.sum())) % 3
    return np.bincount(labels, minlength=3).astype(float)


def released_run(faults, rounds=4, n=96, seed=0, loss=None, shares=None, trained_on=None):
    """{(site, kind): (the round the site was first flagged, the finding that holds after the last round)}."""
    rng = np.random.default_rng(seed)
    truth = {f"site-{i}": _histogram(rng, n, faults.get(f"site-{i}"), P if shares is None else shares[i])
             for i in range(5)}
    diag, first = Diagnosis(loss_clip=3.0, class_names=NAMES), {}
    for r in range(1, rounds + 1):
        rec = RoundRecord(round=r, seconds=1.0)
        for site, h in truth.items():
            released = {"train_labels": (h + rng.normal(0, STD, 3)).tolist()}
            if loss:
                released["train_loss_sum"] = [loss.get(site, 1.0) * h.sum() / 3.0 + rng.normal(0, STD)]
            claimed = (trained_on or {}).get(site, int(h.sum()))  # examples the site trained on this round
            rec.sites.append(SiteRoundRow(site=site, phase="train", status="ok", num_examples=claimed, steps=2))
            rec.sites.append(SiteRoundRow(site=site, phase="evaluate", status="ok", summary=SiteSummary(
                round_trained=r, released=released, n_train=int(h.sum()), noise_multiplier=1.0, derived={},
                noise_std={"train_labels": STD, "train_loss_sum": STD})))
        diag.add(rec)
        now = diag.findings()
        for site, _ in now:
            first.setdefault(site, r)
    # What holds after the last round (the root cause sharpens as releases accumulate), and when each site was
    # first flagged.
    return {key: (first[key[0]], f) for key, f in now.items()}


def probed_run(vectors, rounds=2):
    """The findings after `rounds` rounds in which each site's local model gave `vectors[site]` on public texts."""
    diag = Diagnosis(loss_clip=3.0, class_names=NAMES)
    for r in range(1, rounds + 1):
        rec = RoundRecord(round=r, seconds=1.0)
        for site, v in vectors.items():
            rec.sites.append(SiteRoundRow(site=site, phase="train", status="ok", num_examples=100, steps=2,
                                          probe=list(v)))
        diag.add(rec)
    return diag.findings()
