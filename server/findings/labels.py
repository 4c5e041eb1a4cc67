"""Step 4 → findings from the label histograms: label skew between sites, and a site's missing class, flip or noisy labels.

Label skew first: a site's label counts are compared with the others' shares by χ² per degree of freedom (~1 when
all sites share one label mix). Label faults are the exception and skew the rule, so when more than a third of the
sites (and at least 2) depart by χ²/dof ≥ 16, the run gets a `label_skew` note and the label, loss and probe tests
are withheld: on label counts a skewed site and a faulty one look alike, and a site's loss and local model
follow its label mix. (Natural and IID partitions of the drug reviews read χ²/dof ≤ 5 at clean sites; a Dirichlet
α = 0.5 partition reads 12–216.)

Each site's label histogram (train split, weight-1 block) against the others' class shares p:

- class_missing  a class the others hold ≥ 5 % of is absent at s;
- label_flip     a class absent at s whose mass turned up as an excess in one other class;
- label_noise    the histogram moved toward uniform: r̂ = (K−1)/K · ⟨m − e, u − e⟩ / ‖u − e‖² estimates the share of
                 labels replaced by a random other one (e = n·p, u = n/K).

The label tests wait for a site's second release (one release's noise alone raised most false alarms).
"""

from __future__ import annotations

import math

import numpy as np

from common.rounds import Finding
from common.rounds import FindingKind as K
from server.findings.evidence import Z_ALARM, SiteEvidence, class_name, confidence

# Releases a site's label histogram must have before it is tested: one release's noise (std ~7 per count) turns a
# small class into an apparent gap in ~1 of 50 clean runs; two halve its variance (measured on synthetic releases).
MIN_LABEL_RELEASES = 2


def reference(others: list[SiteEvidence]) -> tuple[np.ndarray, np.ndarray] | None:
    """(the others' typical class shares, each other site's shares sorted per class), or None.

    Per class, the mean over sites without the highest and the lowest (with 4 or more), so that one faulty site
    among them does not shift the reference (a pooled sum would let a flipped site make a clean one look
    short), while small classes keep an unbiased estimate (a median of a few noisy small counts reads them far
    too low)."""
    each = np.sort(np.array([e.label_mean() / e.n_train for e in others]), axis=0)
    shares = np.clip((each[1:-1] if len(each) >= 4 else each).mean(axis=0), 0.0, None)
    return (shares / shares.sum(), each) if shares.sum() > 0 else None


def _sampling_var(ev: SiteEvidence, p: np.ndarray) -> np.ndarray:
    """Per-cell variance of an honest site's mean label counts if it shared the shares p: multinomial sampling of
    its n examples plus the release noise (its mean over rounds)."""
    n = float(ev.n_train)
    return n * p * (1 - p) + ev.label_var / ev.label_rounds


def _departure(ev: SiteEvidence, ref: tuple[np.ndarray, np.ndarray] | None, n_others: int) -> float:
    """χ² per degree of freedom of the site's label counts against the others' shares, with only the sampling
    variance as the honest spread (~1 when all sites share one label mix)."""
    if ref is None:
        return 0.0
    p, m = ref[0], ev.label_mean()
    var = _sampling_var(ev, p) * (1 + 1 / n_others)
    return float(np.sum((m - ev.n_train * p) ** 2 / np.maximum(var, 1e-9)) / max(1, len(p) - 1))


SKEW_DEPARTURE = 16.0  # χ²/dof of a site's label counts against the others' shares that counts as a departure
SKEW_SHARE = 1 / 3  # more than this share of sites departing (and at least 2) = label skew, not faults


def label_skew(labelled: dict[str, SiteEvidence],
               refs: dict[str, tuple[np.ndarray, np.ndarray] | None]) -> Finding | None:
    """The `label_skew` note when many sites' label mixes depart from the others' (module docstring), else None.

    Args:
        labelled: the sites whose label histograms are tested, with their evidence.
        refs: each of them -> the others' reference (`reference`, leave-one-out).
    """
    m = len(labelled) - 1
    departure = {s: _departure(ev, refs[s], m) for s, ev in labelled.items()}
    skewed = sorted(s for s, d in departure.items() if d >= SKEW_DEPARTURE)
    if len(skewed) >= 2 and len(skewed) > SKEW_SHARE * len(labelled):
        return Finding(
            K.LABEL_SKEW, "info",
            f"{len(skewed)} of {len(labelled)} sites' label mixes differ from the others' far beyond sampling "
            f"and release noise ({', '.join(f'{s} χ²/dof {departure[s]:.0f}' for s in skewed)}; honest "
            "sites with one shared mix read ~1): the sites' label mixes are skewed (non-IID), so the "
            "label, loss and probe tests are withheld: on label counts alone a faulty site looks like a "
            "skewed one, and a site's loss and local model follow its label mix", None, confidence=0.8)
    return None


def label_fault(site: str, ev: SiteEvidence, ref: tuple[np.ndarray, np.ndarray] | None, n_others: int, *,
                names: tuple[str, ...] | None) -> Finding | None:
    """The site's label histogram against the others' reference: a class gone (missing, or flipped into another),
    else labels spread toward uniform (noise); None when it reads as an honest site's.

    Args:
        site: the site.
        ev: its evidence (at least MIN_LABEL_RELEASES label releases and a split size).
        ref: the other sites' reference (`reference`), None when they hold no labels.
        n_others: how many sites the reference pools.
        names: the run's class names (data.labels), for the sentence.
    """
    if ref is None:
        return None
    p, each = ref
    n = float(ev.n_train)
    # Per-cell spread of an honest site: at least its sampling variance; more where the other sites' shares
    # spread more (label skew between sites, as in natural or Dirichlet partitions, is not a fault).
    # × (1 + 1/m): the reference is itself estimated from m noisy sites.
    spread = (1.4826 * np.median(np.abs(each - np.median(each, axis=0)), axis=0)) ** 2 * n ** 2
    var = np.maximum(_sampling_var(ev, p), spread) * (1 + 1 / n_others)
    return _absent_class(site, ev, p, var, n_others, names=names) or _label_noise(site, ev, p, var)


# z-score a label-histogram departure must reach before it is reported (Z_ALARM's counterpart: its honest spread is
# known exactly, multinomial)
Z_LABELS = 3.0
FLIP_MARGIN = 1.0  # χ² by which "class a relabelled as b" must beat "class a missing" to be reported as a flip
MIN_SHARE = 0.05  # a class the others hold less of than this cannot be called missing


def _absent_class(site: str, ev: SiteEvidence, p: np.ndarray, var: np.ndarray, n_others: int, *,
                  names: tuple[str, ...] | None) -> Finding | None:
    """class_missing or label_flip: a class the others hold is absent at the site; where did its mass go?"""
    k = len(ev.labels)
    n = float(ev.n_train)
    m = ev.label_mean()
    e = n * p
    z = (e - m) / np.sqrt(var)
    share = lambda v: f"{v / n:.0%}"  # noqa: E731
    absent = [c for c in range(k) if p[c] >= MIN_SHARE and z[c] >= Z_LABELS and m[c] <= 0.25 * e[c]]
    if not absent:
        return None
    a = max(absent, key=lambda c: z[c])
    # Where did class a go? Missing: the site's n examples spread over the other classes in proportion.
    # Flipped to b: the other classes as usual and b holding a's share too. The better fit wins; ties go to
    # the simpler "missing" (a flip must fit better by FLIP_MARGIN in χ²).
    rest = [c for c in range(k) if c != a]
    missing = np.zeros(k)
    missing[rest] = n * p[rest] / max(1e-9, p[rest].sum())
    chi_missing = float(np.sum((m - missing) ** 2 / var))
    fits = {}
    for b in rest:
        flipped = n * p
        flipped[b], flipped[a] = n * (p[a] + p[b]), 0.0
        fits[b] = float(np.sum((m - flipped) ** 2 / var))
    b = min(fits, key=fits.get)
    if fits[b] + FLIP_MARGIN <= chi_missing:
        return Finding(
            K.LABEL_FLIP, "critical",
            f"{site}: no training examples labelled {class_name(names, a)} ({share(m[a])}, others {p[a]:.0%}) and "
            f"{share(m[b])} labelled {class_name(names, b)} (others {p[b]:.0%}): {class_name(names, a)} looks "
            f"relabelled as {class_name(names, b)} (z = {z[a]:.1f}; χ² {fits[b]:.1f} as a flip vs "
            f"{chi_missing:.1f} as a missing class, {ev.label_rounds} noised releases)", site,
            confidence=confidence(float(z[a])))
    return Finding(
        K.CLASS_MISSING, "warning",
        f"{site} holds no training examples of {class_name(names, a)} ({share(m[a])} vs {p[a]:.0%} at the other "
        f"{n_others} sites; z = {z[a]:.1f} over {ev.label_rounds} noised releases): the model learns "
        "nothing about that class there", site, confidence=confidence(float(z[a])))


MIN_NOISE_RATE = 0.35  # estimated share of randomised labels below which label noise is not reported


def _label_noise(site: str, ev: SiteEvidence, p: np.ndarray, var: np.ndarray) -> Finding | None:
    """label_noise: the histogram moved toward uniform by an estimated share r̂ of randomised labels."""
    k = len(ev.labels)
    n = float(ev.n_train)
    m = ev.label_mean()
    e = n * p
    share = lambda v: f"{v / n:.0%}"  # noqa: E731
    u = np.full(k, n / k)
    d = u - e
    norm2 = float(d @ d)
    if norm2 <= 0:
        return None
    rate = (k - 1) / k * float((m - e) @ d) / norm2
    rate_sd = (k - 1) / k * math.sqrt(float(d @ (var * d))) / norm2
    zr = rate / rate_sd if rate_sd > 0 else 0.0
    if rate >= MIN_NOISE_RATE and zr >= Z_ALARM:
        return Finding(
            K.LABEL_NOISE, "critical",
            f"{site}'s training labels are spread toward uniform ({', '.join(share(v) for v in m)} vs the others' "
            f"{', '.join(f'{v:.0%}' for v in p)}): about {min(rate, 1.0):.0%} of its labels look randomised "
            f"(z = {zr:.1f}, {ev.label_rounds} noised releases)", site, confidence=confidence(zr))
    return None
