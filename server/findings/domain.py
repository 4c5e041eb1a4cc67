"""Step 4 → findings from the inputs' side, label-free: where each site's texts sit in the encoder's space.

Each site releases, per class the received model predicts, the sum of its train texts' unit-norm encoder outputs
(common/diagnostics: train_embedding). Per round and predicted class, the site's centroid is compared with the other
sites' pooled centroid of that class: the squared distance, less what the release noise and the sampling of its
texts put there under the null (both known: the noise std is public; unit vectors spread by 1 − ‖μ‖² around their
mean μ), is the domain gap². Classes are weighted by the site's count; rounds are averaged (fresh noise each round).

Grouping by the model's prediction, not the label, keeps it label-free (wrong labels do not move it) and compares
like with like at a site whose label mix differs; the directions between the class centroids are projected out,
because a predicted class holds the model's errors in the site's own proportion. A site whose texts sit apart from the others' (gap z ≥ 4 against
noise and the others' own gaps, gap ≥ MIN_GAP) is a data shift when the model also reads them worse (confidence,
agreement or loss: loss.py), and an info-level `domain_difference` when it reads them as well as the others': a
difference in its data, not a fault (another clinic's vocabulary, another product line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.findings.evidence import MIN_SITES, SiteEvidence, scale_against

MIN_GAP = 0.08  # distance between unit-norm centroids below which no domain difference is reported
MIN_COUNT = 20.0  # a predicted class with fewer (noised) texts at a site or among the others is left out,
COUNT_NOISE = 4.0  # as is one whose count is within this many noise stds of 0 (its centroid's scale is noise)


@dataclass(frozen=True)
class DomainGap:
    gap: float  # √ of the mean excess squared distance of the site's centroids to the others' (unit sphere)
    excess: float  # that mean excess squared distance (may be < 0 under noise)
    z: float  # its departure from the other sites' excesses, in units of its noise and their spread
    rounds: int


def _round_gaps(entries: dict[str, tuple[np.ndarray, np.ndarray, float, float]]) -> dict[str, tuple[float, float]]:
    """One round: site -> (count-weighted excess squared distance to the others' centroids, its null std).

    entries: site -> (embedding sums [K, H], texts per predicted class [K] (noised), noise variance of a sum's
    cell, noise variance of a count)."""
    out = {}
    for site, (e, n, var, var_n) in entries.items():
        others = [v for s, v in entries.items() if s != site]
        e_o = sum(v[0] for v in others)
        n_o = sum(np.clip(v[1], 0.0, None) for v in others)
        var_o, var_no = sum(v[2] for v in others), sum(v[3] for v in others)
        h = e.shape[1]
        floor, floor_o = (max(MIN_COUNT, COUNT_NOISE * math.sqrt(v)) for v in (var_n, var_no))
        live = [c for c in range(e.shape[0]) if n_o[c] >= floor_o]
        # A predicted class holds some texts of the other classes (the model errs); at a site whose label mix
        # differs it holds them in another proportion, which moves its centroid along the directions between the
        # class centroids. Those directions (from the others' centroids) are projected out: what is left is where
        # the texts sit apart from any mix of the others' classes. The null loses as many dimensions.
        basis = np.zeros((0, h))
        if len(live) > 1:
            diffs = np.stack([e_o[c] / n_o[c] - e_o[live[0]] / n_o[live[0]] for c in live[1:]])
            basis = np.linalg.svd(diffs, full_matrices=False)[2]
        h_left = max(h - len(basis), 1)
        num, den, sd2 = 0.0, 0.0, 0.0
        for c in live:
            if n[c] < floor:
                continue
            m, m_o = e[c] / n[c], e_o[c] / n_o[c]
            # ‖μ_c‖² of the others' texts of the class, its noise taken out: unit vectors spread by 1 − ‖μ‖².
            mu2 = float(np.clip(m_o @ m_o - h * var_o / n_o[c] ** 2, 0.0, 1.0))
            noise = h_left * (var / n[c] ** 2 + var_o / n_o[c] ** 2)
            # A noised count scales a centroid by n / (n + noise): ‖μ‖² · relative count variance, both sides.
            scale = mu2 * (var_n / n[c] ** 2 + var_no / n_o[c] ** 2)
            sampling = (1.0 - mu2) * (1.0 / n[c] + 1.0 / n_o[c]) * h_left / h
            null = noise + scale + sampling
            d = m - m_o
            d = d - basis.T @ (basis @ d)
            num += n[c] * (float(np.sum(d ** 2)) - null)
            den += n[c]
            # Under the null the squared distance is ~ (null / H) · χ²_H: its std is null · √(2 / H); the scale
            # term lies along one direction (μ), so it adds its own std of about itself · √2.
            sd2 += (n[c] * math.hypot((noise + sampling) * math.sqrt(2.0 / h_left), scale * math.sqrt(2.0))) ** 2
        if den > 0:
            out[site] = (num / den, math.sqrt(sd2) / den)
    return out


def domain_gaps(sites: dict[str, SiteEvidence]) -> dict[str, DomainGap]:
    """Each site's domain gap to the others, over the rounds in which at least MIN_SITES released the block."""
    rounds = sorted({r for ev in sites.values() for r in ev.embeddings})
    per_site: dict[str, list[tuple[float, float]]] = {}
    for r in rounds:
        entries = {s: ev.embeddings[r] for s, ev in sites.items() if r in ev.embeddings}
        # Sites compare like with like: a block of another shape than most sites' (a malformed or lying reply) is
        # left out of the round rather than let it break the sum.
        shapes = [v[0].shape for v in entries.values()]
        common = max(set(shapes), key=shapes.count) if shapes else None
        entries = {s: v for s, v in entries.items() if v[0].shape == common and np.isfinite(v[0]).all()}
        if len(entries) < MIN_SITES:
            continue
        for s, v in _round_gaps(entries).items():
            per_site.setdefault(s, []).append(v)
    means = {s: (float(np.mean([x for x, _ in v])), math.sqrt(sum(sd ** 2 for _, sd in v)) / len(v), len(v))
             for s, v in per_site.items()}
    out = {}
    for s, (excess, sd, k) in means.items():
        others = [m[0] for o, m in means.items() if o != s]
        if len(others) < MIN_SITES - 1:
            continue
        typical, scale = scale_against(others, sd)
        z = (excess - typical) / scale if scale > 0 else 0.0
        out[s] = DomainGap(math.sqrt(max(excess, 0.0)), excess, z, k)
    return out


def departs(g: DomainGap | None, z_alarm: float) -> bool:
    """The site's texts sit apart from the others' beyond noise and the others' own gaps."""
    return g is not None and g.rounds >= 2 and g.z >= z_alarm and g.gap >= MIN_GAP
