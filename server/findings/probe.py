"""Step 4 → findings from the probe: each site's local model (its released update) on public texts at the server.

FedDebug's idea, no site data and no ε: a model that predicts near-uniformly where the others are confident (label
noise), or confidently another class (a flip), when the label histogram did not already name the cause.
"""

from __future__ import annotations

import math

import numpy as np

from common.rounds import Finding
from common.rounds import FindingKind as K
from server.findings.evidence import Z_ALARM, class_name, confidence, median_spread

PROBE_TV = 0.3  # total-variation distance of a site model's predictions on public texts from the others' median
PROBE_MIN_MAD = 0.03  # floor on the others' spread of that distance (a few sites can agree by chance)
PROBE_UNIFORM = 0.93  # normalised entropy of predictions above which a model "predicts almost evenly"


def probe_fault(site: str, v: np.ndarray, others: dict[str, np.ndarray], rounds: int, *,
                names: tuple[str, ...] | None) -> Finding | None:
    """How the site's local model behaves on public texts, against the others' (FedDebug's idea: no site data,
    no ε). Only a shape that names a cause is reported: near-uniform where the others are confident (label
    noise), or confident in another class than the others (a flip).

    Args:
        site: the site.
        v: its local model's mean predicted class distribution on the public texts, averaged over rounds.
        others: the other sites' distributions, by site.
        rounds: how many rounds v averages.
        names: the run's class names (data.labels), for the sentence.
    """
    k = len(v)
    ref = np.median(np.stack(list(others.values())), axis=0)
    ref = ref / ref.sum()
    tv = 0.5 * float(np.abs(v - ref).sum())
    typical, spread = median_spread([0.5 * float(np.abs(w - ref).sum()) for w in others.values()])
    z = (tv - typical) / max(PROBE_MIN_MAD, spread)
    if tv < PROBE_TV or z < Z_ALARM:
        return None
    entropy = lambda p: float(-(p * np.log(np.clip(p, 1e-12, 1))).sum() / math.log(k))  # noqa: E731
    mix = ", ".join(f"{x:.0%}" for x in v)
    usual = ", ".join(f"{x:.0%}" for x in ref)
    if entropy(v) >= PROBE_UNIFORM and entropy(ref) <= 0.7:
        return Finding(
            K.LABEL_NOISE, "warning",
            f"{site}'s local model spreads its predictions on public texts almost evenly ({mix}) where the other "
            f"sites' models are confident ({usual}; distance {tv:.2f}, z = {z:.1f} over {rounds} rounds): it "
            "learned from labels that carry little signal (noisy labels)", site, confidence=confidence(z))
    a, b = int(np.argmax(ref)), int(np.argmax(v))
    if a != b and v[b] >= 0.6:
        return Finding(
            K.LABEL_FLIP, "warning",
            f"{site}'s local model predicts {class_name(names, b)} for {v[b]:.0%} of public texts where the other "
            f"sites' models predict {class_name(names, a)} ({mix} vs {usual}; z = {z:.1f} over {rounds} rounds): "
            f"its labels look flipped from {class_name(names, a)} to {class_name(names, b)}", site,
            confidence=confidence(z))
    return None
