"""Step 4 → findings, measured: the detection limits of the statistical findings: the smallest fault rate found with
probability ≥ 0.9, by site size and ε, measured on synthetic releases (`fedlens bench limits`).

A synthetic release is what a site would send if the model every site received had a known behaviour: its
predictions follow a fixed matrix M (true class → predicted class) and its confidence a fixed histogram, lower on
corrupted texts. The site's labels carry the fault; the blocks (validation confusion, calibration, confident
joint, train labels and confusion, first-use loss) are computed exactly as a site computes them and noised with
the σ a site would use at that ε (client/privacy.py's calibration, the same dp.diagnostics-share). They go through
the real findings engine (server/findings), round by round. Sites differ by a heterogeneity term (each honest
site's M moves by a random amount, as natural partitions do), so the limits are not those of identical sites.

The simulations of `fedlens bench diagnosis` confirm the curve on the real model (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from common.diagnostics import CONF_BINS, LOSS_BINS, SENSITIVITY, noise_std
from common.rounds import FindingKind as K
from common.rounds import RoundRecord, SiteRoundRow, SiteSummary

LOSS_CLIP = 3.0
# The model every site received, as the demo run's releases show it on the movie snippets: its top-class
# probability has a mean of ~0.8 and it is about as often right as it is confident (calibrated: test ECE 0.02-0.08).
# Sites differ in how hard their texts are (the mean confidence moves by HETEROGENEITY from site to site, so their
# accuracies differ by ~0.03, as the natural partitions' do) and a little in calibration (CALIBRATION_SPREAD).
CONFIDENCE_MEAN = 0.80
HETEROGENEITY = 0.015
CALIBRATION_SPREAD = 0.01
CORRUPTED_MEAN = 0.62  # mean confidence on a corrupted text (towards 1/K)
# Where texts sit in the encoder's space (the train_embedding block), as measured with all-MiniLM-L6-v2 on 3,000
# movie snippets and the 600 drug reviews: unit-norm outputs of width 384 whose mean has norm 0.46, the two classes'
# centroids 0.14 apart, and the drug reviews' centroid (norm 0.53) 0.69 from the snippets'. A foreign text is read as
# confidently as a snippet (the model handles the drug reviews as it handles movies): only this block sees it.
DIMS = 384
CENTRE, CLASS_OFFSET, FOREIGN = 0.46, 0.071, (0.013, 0.53)
SITE_OFFSET = 0.02  # norm of an honest site's own centroid offset (natural movie sites: ~0 beyond sampling)


@dataclass(frozen=True)
class Fault:
    kind: str  # "label_noise" | "label_flip" | "class_missing" | "text_corruption" | "domain_shift" | "" (clean)
    rate: float = 0.0
    a: int = 1  # flip: from, class_missing: the class
    b: int = 0  # flip: to


EXPECTED = {"label_noise": {K.LABEL_NOISE}, "label_flip": {K.LABEL_FLIP}, "class_missing": {K.CLASS_MISSING},
            "text_corruption": {K.DATA_SHIFT}, "domain_shift": {K.DATA_SHIFT, K.DOMAIN_DIFFERENCE}}


def _draw(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One category per row of `probs` (rows sum to 1)."""
    return (rng.random((len(probs), 1)) > np.cumsum(probs, axis=1)).sum(axis=1).clip(0, probs.shape[1] - 1)


def _confidences(rng: np.random.Generator, n: int, mean: float, k: int) -> np.ndarray:
    """Top-class probabilities in [1/K, 1] with the given mean (a Beta of concentration 6 over that range)."""
    lo = 1.0 / k
    mu = float(np.clip((mean - lo) / (1 - lo), 0.05, 0.95))
    return lo + (1 - lo) * rng.beta(6 * mu, 6 * (1 - mu), size=n)


def _site(rng: np.random.Generator, n_train: int, n_val: int, shares: np.ndarray, fault: Fault, *,
          confidence_mean: float, calibration: float):
    """One site's exact per-split arrays: given label, prediction, confidence bin."""
    k = len(shares)
    if fault.kind == "class_missing":
        shares = np.where(np.arange(k) == fault.a, 0.0, shares)
        shares = shares / shares.sum()
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        y = _draw(rng, np.tile(shares, (n, 1)))
        g = y.copy()
        if fault.kind == "label_noise":
            hit = rng.random(n) < fault.rate
            g[hit] = (y[hit] + rng.integers(1, k, size=hit.sum())) % k
        elif fault.kind == "label_flip":
            hit = (y == fault.a) & (rng.random(n) < fault.rate)
            g[hit] = fault.b
        corrupt = rng.random(n) < (fault.rate if fault.kind == "text_corruption" else 0.0)
        conf = np.where(corrupt, _confidences(rng, n, CORRUPTED_MEAN, k), _confidences(rng, n, confidence_mean, k))
        right = rng.random(n) < np.clip(conf + calibration, 0.0, 1.0)
        pred = np.where(right, y, (y + rng.integers(1, k, size=n)) % k) if k > 1 else y
        out[split] = (y, g, pred, np.minimum((conf * CONF_BINS).astype(int), CONF_BINS - 1))
    y, _, pred, _ = out["train"]
    foreign = rng.random(n_train) < (fault.rate if fault.kind == "domain_shift" else 0.0)
    out["embedding"] = _embedding(rng, y, pred, foreign, k)
    return out


def _embedding(rng: np.random.Generator, y: np.ndarray, pred: np.ndarray, foreign: np.ndarray,
               k: int) -> np.ndarray:
    """[K, DIMS] sums of unit-norm encoder outputs per predicted class: each text's centroid (its class's, or the
    foreign domain's) plus its spread around it (1 − ‖μ‖² over the dimensions), summed as Gaussians."""
    site = rng.normal(0, SITE_OFFSET / np.sqrt(DIMS), DIMS)
    out = np.zeros((k, DIMS))
    for c in range(k):
        for cls in range(k):
            for away in (False, True):
                m = int(((pred == c) & (y == cls) & (foreign == away)).sum())
                if not m:
                    continue
                mu = np.zeros(DIMS)
                if away:
                    mu[0], mu[2] = FOREIGN
                else:
                    mu[0] = CENTRE
                    mu[1] = CLASS_OFFSET * (2 * cls / max(k - 1, 1) - 1)
                    mu += site
                spread = np.sqrt(m * (1 - float(mu @ mu)) / DIMS)
                out[c] += m * mu + rng.normal(0, spread, DIMS)
    return out


def _blocks(site: dict, k: int) -> dict[str, np.ndarray]:
    """The exact blocks a site would compute from its arrays (the gradient blocks left at 0)."""
    _, g, pred, conf = site["val"]
    b: dict[str, np.ndarray] = {}
    c = np.zeros((k, k))
    np.add.at(c, (g, pred), 1.0)
    b["confusion"] = c
    cal = np.zeros((2, CONF_BINS))
    np.add.at(cal, ((pred != g).astype(int), conf), 1.0)
    b["calibration"] = cal
    li = np.zeros((k, k))
    sure = (pred != g) & (conf >= 7)
    np.add.at(li, (g[sure], pred[sure]), 1.0)
    b["label_issues"] = li
    loss = np.where(pred == g, 0.35, 1.4)
    b["val_loss_sum"] = np.array([loss.sum() / LOSS_CLIP])
    _, gt, predt, _ = site["train"]
    b["train_labels"] = np.bincount(gt, minlength=k).astype(float)
    ct = np.zeros((k, k))
    np.add.at(ct, (gt, predt), 1.0)
    b["train_confusion"] = ct
    b["train_loss_sum"] = np.array([np.where(predt == gt, 0.35, 1.4).sum() / LOSS_CLIP])
    b["val_loss_hist"] = np.zeros(LOSS_BINS)
    b["train_loss_hist"] = np.zeros(LOSS_BINS)
    b["train_embedding"] = site["embedding"]
    return b


def synthetic_run(faults: dict[str, Fault], *, n_train: int, n_val: int, release_sigma: float, rounds: int = 4,
                  sites: int = 5, k: int = 2, shares: np.ndarray | None = None, heterogeneity: float = HETEROGENEITY,
                  seed: int = 0, site_shares: dict[str, np.ndarray] | None = None) -> list[RoundRecord]:
    """The rounds a run of `sites` sites would record, each site releasing synthetic summaries (module docstring);
    `faults`: site -> its fault; `site_shares`: a site's own label mix (a naturally skewed site)."""
    rng = np.random.default_rng(seed)
    shares = np.full(k, 1.0 / k) if shares is None else np.asarray(shares, dtype=float)
    std = noise_std(release_sigma)
    names = [f"site-{i}" for i in range(sites)]
    exact = {}
    for s in names:
        mix = (site_shares or {}).get(s, shares)
        exact[s] = _blocks(_site(rng, n_train, n_val, mix, faults.get(s, Fault("")),
                                 confidence_mean=CONFIDENCE_MEAN + rng.normal(0, heterogeneity),
                                 calibration=rng.normal(0, CALIBRATION_SPREAD)), k)
    out = []
    for r in range(1, rounds + 1):
        rec = RoundRecord(round=r, seconds=1.0)
        for s in names:
            released = {name: (v + rng.normal(0, std[name], v.shape) if release_sigma > 0 else v).tolist()
                        for name, v in exact[s].items()}
            rec.sites.append(SiteRoundRow(site=s, phase="train", status="ok", num_examples=n_train, steps=20))
            rec.sites.append(SiteRoundRow(site=s, phase="evaluate", status="ok", num_examples=n_val, summary=SiteSummary(
                round_trained=r, released=released, n_train=n_train, noise_multiplier=release_sigma, derived={},
                noise_std={name: (std[name] if release_sigma > 0 else 0.0) for name in exact[s]})))
        out.append(rec)
    return out


def summary_sigma(epsilon: float, rounds: int, *, delta: float = 1e-5, share: float = 0.25) -> float:
    """σ of each summary a site releases at ε over `rounds` rounds (dp.diagnostics-share of it for summaries)."""
    from client.privacy import calibrate_release_noise_multiplier

    return calibrate_release_noise_multiplier(epsilon_diagnostics=share * epsilon, delta=delta, rounds=rounds)


def detected(records: list[RoundRecord], site: str, kind: str) -> tuple[bool, bool]:
    """(the faulty site's findings after the last round name its fault, another site or the run was flagged)."""
    from server.findings import Diagnosis

    d = Diagnosis(loss_clip=LOSS_CLIP)
    for rec in records:
        d.add(rec)
    found = d.findings()
    hit = any(s == site and f.kind in EXPECTED[kind] for (s, _), f in found.items())
    other = any(s not in (None, site) and f.severity != "info" for (s, _), f in found.items())
    return hit, other


def power(kind: str, rate: float, *, n: int, epsilon: float, rounds: int = 4, trials: int = 40,
          val_fraction: float = 0.3, seed: int = 0) -> tuple[float, float]:
    """(share of trials in which a fault of `kind` at `rate` at one site of n rows is found, share with a false
    alarm at another site)."""
    sigma = summary_sigma(epsilon, rounds)
    n_val = max(1, int(round(n * val_fraction)))
    fault = Fault(kind, rate) if kind != "class_missing" else Fault(kind, 1.0, a=1)
    hits = alarms = 0
    for t in range(trials):
        recs = synthetic_run({"site-1": fault}, n_train=n - n_val, n_val=n_val, release_sigma=sigma, rounds=rounds,
                             seed=seed * 10_000 + t)
        h, o = detected(recs, "site-1", kind)
        hits += h
        alarms += o
    return hits / trials, alarms / trials


RATES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
MAX_RATE = {"label_noise": 0.5}  # beyond half the labels wrong (two classes), noise is a relabelling, not noise


def limits(*, sizes=(150, 500, 1000, 2000, 5000), epsilons=(1.0, 4.0, 8.0, 16.0),
           kinds=("label_noise", "label_flip", "text_corruption", "domain_shift"), trials: int = 40,
           progress=print) -> dict:  # noqa: ANN001
    """For each kind, site size and ε: the smallest rate in RATES detected with probability ≥ 0.9 (None: none).
    Rates: label noise, the share of labels replaced; a flip, the share of one class relabelled; text corruption,
    the share of texts the model reads at a corrupted text's confidence; a domain shift, the share of texts from
    another domain the model reads as confidently as its own (seen in the embedding block only)."""
    out: dict = {"rates": list(RATES), "trials": trials, "sensitivity": SENSITIVITY, "limits": {}}
    for kind in kinds:
        for eps in epsilons:
            # Largest site first: a smaller site's limit is no lower (power grows with n), so its scan starts
            # at the larger one's limit, and a rate no larger site saw is not looked for at a smaller one.
            start: float | None = 0.0
            rows = []
            for n in sorted(sizes, reverse=True):
                found, curve = None, []
                rates = [r for r in RATES if r <= MAX_RATE.get(kind, 1.0) and start is not None and r >= start]
                for rate in rates:
                    p, fa = power(kind, rate, n=n, epsilon=eps, trials=trials)
                    curve.append({"rate": rate, "power": p, "false_alarm": fa})
                    if p >= 0.9:
                        found = rate
                        break
                start = found
                progress(f"{kind} ε={eps:g} n={n}: limit {found}")
                rows.append({"epsilon": eps, "n": n, "limit": found, "curve": curve,
                             "release_sigma": round(summary_sigma(eps, 4), 2)})
            out["limits"].setdefault(kind, []).extend(sorted(rows, key=lambda r: r["n"]))
    return out


def format_limits(out: dict) -> str:
    lines = [f"{'kind':<16} {'ε':>4} " + " ".join(f"{'n=' + str(r['n']):>8}" for r in
                                                   next(iter(out['limits'].values())) if r['epsilon'] ==
                                                   next(iter(out['limits'].values()))[0]['epsilon'])]
    for kind, rows in out["limits"].items():
        for eps in sorted({r["epsilon"] for r in rows}):
            cells = [r for r in rows if r["epsilon"] == eps]
            lines.append(f"{kind:<16} {eps:>4g} " + " ".join(
                f"{'—' if r['limit'] is None else format(r['limit'], '.0%'):>8}" for r in cells))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(limits(trials=20), indent=1))
