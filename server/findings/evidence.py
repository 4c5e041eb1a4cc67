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

from common.diagnostics import CONF_BINS, EMBEDDING
from common.rounds import RoundRecord

Z_ALARM = 4.0  # z-score a loss departure must reach (noise + the honest sites' spread) before it is reported
Z_CORROBORATE = 2.0  # a second reading pointing the same way must reach this z-score
MIN_SITES = 3


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def median_spread(values: list[float]) -> tuple[float, float]:
    """(median, robust std = 1.4826 × median absolute deviation) of the other sites' values."""
    typical = statistics.median(values)
    return typical, 1.4826 * statistics.median(abs(v - typical) for v in values)


def scale_against(others: list[float], own_sd: float) -> tuple[float, float]:
    """(the others' median, the standard error of a site's departure from it): the others' spread (their data
    differ too), at least the site's own noise, plus that noise again, and the reference's error."""
    typical, spread = median_spread(others)
    return typical, math.sqrt(max(spread ** 2, own_sd ** 2) + own_sd ** 2) * math.sqrt(1 + 1 / len(others))


def relative_spread(values: list[float]) -> float:
    """Robust std of log(values): how much the sites' readings differ among themselves (0 with fewer than 2)."""
    logs = [math.log(v) for v in values if v > 0]
    if len(logs) < 2:
        return 0.0
    mid = statistics.median(logs)
    return 1.4826 * statistics.median(abs(v - mid) for v in logs)


def confidence(z: float) -> float:
    return round(min(0.999, _phi(z - 2.0)), 3)


def class_name(names: tuple[str, ...] | None, c: int) -> str:
    """Class c by the run's label names, else "class c"."""
    return names[c] if names and c < len(names) else f"class {c}"


def mean_confidence(calibration: np.ndarray, var: float, n: float, k: int) -> tuple[float, float]:
    """(mean confidence, its noise variance) of a noised calibration block (2 × CONF_BINS, both rows summed).

    The top class's probability is at least 1/K, so the bins below it are structurally empty and are left out
    (public knowledge, free post-processing); the sum is centred on those bins' middle, so its noise grows with
    the spread of the bin mids, not their size."""
    mids = (np.arange(CONF_BINS) + 0.5) / CONF_BINS
    live = mids >= 1.0 / k - 0.5 / CONF_BINS
    h = np.asarray(calibration, dtype=np.float64).sum(axis=0)
    centre = float(mids[live].mean())
    m = centre + float(np.sum(h[live] * (mids[live] - centre))) / n
    return m, 2 * var * float(np.sum((mids[live] - centre) ** 2)) / n ** 2


@dataclass
class SiteEvidence:
    """One site's released blocks summed over rounds, and how many went in (so means and their noise are known)."""

    n_train: int = 0
    noised: bool = False  # its releases carry DP noise (a non-DP run's are exact)
    labels: np.ndarray | None = None  # Σ over rounds of the noised train-label histogram
    label_rounds: int = 0
    label_var: float = 0.0  # noise variance of one round's cell
    loss_sum: float = 0.0  # Σ over rounds of the noised mean first-use train loss (nats)
    loss_rounds: int = 0
    loss_var_sum: float = 0.0  # Σ over rounds of that mean's noise variance
    steps: list[int] = field(default_factory=list)
    left_out: list[int] = field(default_factory=list)  # rounds its update was left out of the average (norm outlier)
    passes: list[float] = field(default_factory=list)  # per round: DP steps × q = passes over what it trained on
    # per round it trained: (its train handler's seconds, seconds per example trained: steps × q × n public)
    spans: list[tuple[float, float | None]] = field(default_factory=list)
    probe: np.ndarray | None = None  # Σ over rounds of its local model's mean predicted distribution on public texts
    probe_rounds: int = 0
    # (round, "val" | "train") -> (noised confusion at a model every site holds, its cell variance, its size):
    # validation at the round's global model, train at the model received for the round's training.
    confusions: dict[tuple[int, str], tuple[np.ndarray, float, float]] = field(default_factory=dict)
    confidence: list[tuple[float, float]] = field(default_factory=list)  # per round: (mean confidence, its variance)
    # per round: (share of validation examples the model confidently puts in another class than their label
    # (Cleanlab's confident joint off the diagonal), its noise variance)
    issues: list[tuple[float, float]] = field(default_factory=list)
    # round -> (noised calibration block [2, CONF_BINS]: right / wrong per confidence bin, its cell variance)
    calibration: dict[int, tuple[np.ndarray, float]] = field(default_factory=dict)
    # round -> (noised train_embedding [K, H], texts per predicted class (the train confusion's column sums), the
    # embedding cells' noise variance, those counts' noise variance): where its texts sit in the encoder's space
    # (domain.py)
    embeddings: dict[int, tuple[np.ndarray, np.ndarray, float, float]] = field(default_factory=dict)

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
            if row.left_out:
                ev.left_out.append(rec.round)
            ev.passes.append(float(row.steps) * (row.sample_rate or 0.0) if row.sample_rate else float(row.steps))
            span = (row.ended_at - row.started_at) if row.started_at and row.ended_at else row.seconds
            if span is not None:
                work = (row.steps or 0) * (row.sample_rate or 0.0) * (row.num_examples or 0)
                ev.spans.append((float(span), float(span) / work if work > 0 else None))
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
        ev.noised = ev.noised or ev.label_var > 0
        n = ev.n_train or max(float(labels.sum()), 1.0)
        n_val = float(row.num_examples or 0)
        if released.get("confusion") is not None and n_val > 0:
            c = np.asarray(released["confusion"], dtype=np.float64)
            var = float(std.get("confusion", 0.0)) ** 2
            ev.confusions[(rec.round, "val")] = (c, var, n_val)
            if released.get("label_issues") is not None:
                li = np.asarray(released["label_issues"], dtype=np.float64)
                off = ~np.eye(len(li), dtype=bool)
                ev.issues.append((float(li[off].sum()) / n_val,
                                  float(std.get("label_issues", 0.0)) ** 2 * int(off.sum()) / n_val ** 2))
            if released.get("calibration") is not None:
                ev.calibration[rec.round] = (np.asarray(released["calibration"], dtype=np.float64),
                                             float(std.get("calibration", 0.0)) ** 2)
                ev.confidence.append(mean_confidence(np.asarray(released["calibration"], dtype=np.float64),
                                                     float(std.get("calibration", 0.0)) ** 2, n_val, len(c)))
        trained = summary.round_trained == rec.round
        if trained and released.get("train_confusion") is not None:
            c = np.asarray(released["train_confusion"], dtype=np.float64)
            # An overfitting site trained on a few of its examples: the block covers those (its noised total).
            size = float(np.clip(c.sum(), 1.0, max(ev.n_train, 1)))
            ev.confusions[(rec.round, "train")] = (c, float(std.get("train_confusion", 0.0)) ** 2, size)
            emb = np.asarray(released.get(EMBEDDING, []), dtype=np.float64)
            if emb.ndim == 2 and emb.shape[0] == len(c) and emb.shape[1] > 0:
                # Texts per predicted class: the train confusion's column sums, K noised cells each.
                ev.embeddings[rec.round] = (emb, c.sum(axis=0),
                                            float(std.get(EMBEDDING, 0.0)) ** 2,
                                            len(c) * float(std.get("train_confusion", 0.0)) ** 2)
        if trained and released.get("train_loss_sum") is not None:
            # Σ min(loss, L) / L over the train split -> mean loss in nats, and its noise variance.
            ev.loss_sum += float(released["train_loss_sum"][0]) * loss_clip / n
            ev.loss_var_sum += (float(std.get("train_loss_sum", 0.0)) * loss_clip / n) ** 2
            ev.loss_rounds += 1
