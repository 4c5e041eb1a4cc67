"""Step 4 → findings, statistical evidence: each site's released summaries accumulated over rounds, and the shared statistics.

Everything in the statistical diagnosis is post-processing of what sites already release (noised summaries, the
public ledger fields σ, q, steps, the public split sizes): no ε is spent. The noise of each released block is known
(σ·Δ / weight), so each test (labels.py, loss.py, probe.py, schedule.py) is a z-score against noise *plus* the
sampling spread an honest site would show, accumulated over rounds (a site's train-label histogram is the same every
round under fresh noise, so its mean sharpens as 1/√rounds).

Thresholds are a z-score plus an effect size, so that a clean run stays quiet; confidence is Φ(z − 2),
a heuristic, not a calibrated probability.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from common.rounds import RoundRecord

Z_ALARM = 4.0  # z-score a loss departure must reach (noise + the honest sites' spread) before it is reported
MIN_SITES = 3


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def median_spread(values: list[float]) -> tuple[float, float]:
    """(median, robust std = 1.4826 × median absolute deviation) of the other sites' values."""
    typical = statistics.median(values)
    return typical, 1.4826 * statistics.median(abs(v - typical) for v in values)


def confidence(z: float) -> float:
    return round(min(0.999, _phi(z - 2.0)), 3)


def class_name(names: tuple[str, ...] | None, c: int) -> str:
    """Class c by the run's label names, else "class c"."""
    return names[c] if names and c < len(names) else f"class {c}"


@dataclass
class SiteEvidence:
    """One site's released blocks summed over rounds, and how many went in (so means and their noise are known)."""

    n_train: int = 0
    labels: np.ndarray | None = None  # Σ over rounds of the noised train-label histogram
    label_rounds: int = 0
    label_var: float = 0.0  # noise variance of one round's cell
    loss_sum: float = 0.0  # Σ over rounds of the noised mean first-use train loss (nats)
    loss_rounds: int = 0
    loss_var_sum: float = 0.0  # Σ over rounds of that mean's noise variance
    steps: list[int] = field(default_factory=list)
    probe: np.ndarray | None = None  # Σ over rounds of its local model's mean predicted distribution on public texts
    probe_rounds: int = 0

    def label_mean(self) -> np.ndarray:
        return self.labels / self.label_rounds

    def loss_mean(self) -> float:
        return self.loss_sum / self.loss_rounds


def accumulate(sites: dict[str, SiteEvidence], rec: RoundRecord, *, loss_clip: float) -> None:
    """Add one round's released blocks, public schedule and probe to each site's evidence (in place).

    Args:
        sites: site -> its evidence so far; a site seen for the first time is added.
        rec: the round.
        loss_clip: the loss clip L of the sites' loss release (dp.loss-clip), to turn Σ min(loss, L) / L into nats.
    """
    for row in rec.sites:
        ev = sites.setdefault(row.site, SiteEvidence())
        if row.phase == "train" and row.status == "ok" and row.steps:
            ev.steps.append(int(row.steps))
            ev.n_train = ev.n_train or int(row.num_examples or 0)  # the summary's split size wins (below)
        if row.phase == "train" and row.probe:
            v = np.asarray(row.probe, dtype=np.float64)
            ev.probe = v if ev.probe is None else ev.probe + v
            ev.probe_rounds += 1
        if row.phase != "evaluate" or row.status != "ok" or row.summary is None:
            continue
        summary = row.summary
        released, std = summary.released, summary.noise_std
        if not released or "train_labels" not in released:
            continue
        # The histogram covers the site's whole train split (public size), whatever share of it the site
        # trained on this round (an overfitting site trains on a few examples).
        ev.n_train = int(summary.n_train or ev.n_train)
        labels = np.asarray(released["train_labels"], dtype=np.float64)
        ev.labels = labels if ev.labels is None else ev.labels + labels
        ev.label_rounds += 1
        ev.label_var = float(std.get("train_labels", 0.0)) ** 2
        n = ev.n_train or max(float(labels.sum()), 1.0)
        if summary.round_trained == rec.round and released.get("train_loss_sum") is not None:
            # Σ min(loss, L) / L over the train split -> mean loss in nats, and its noise variance.
            ev.loss_sum += float(released["train_loss_sum"][0]) * loss_clip / n
            ev.loss_var_sum += (float(std.get("train_loss_sum", 0.0)) * loss_clip / n) ** 2
            ev.loss_rounds += 1
