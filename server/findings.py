"""Findings: what the server concludes each round from what it saw, each with the sentence that justifies it.

These are the direct ones (a site failed, refused, sent an unusable update; the model collapsed; DP noise drowns
the updates) and gross cross-site departures (an update of norm 0 or many times the median, a straggler). A finding is recorded in the round it appears; it is recorded again only if it clears and comes back.
Statistical diagnosis across sites and rounds (which site has noisy labels, a missing class, ...) is in
server/diagnosis.py; the tracker merges both.
"""

from __future__ import annotations

import statistics

from common.rounds import Finding, RoundRecord
from common.rounds import FindingKind as K
from server.diagnosis import Diagnosis

COLLAPSE_SHARE = 0.9  # one class taking this share of the test predictions
# A round's signal-to-noise √T · ‖Σ clipped gradients‖ / (σ·C) below which its progress along the gradient is
# mostly noise: the noise's component along the signal's direction has std σ·C a step (√T·σ·C over T steps),
# against T·‖Σ‖ of signal if the direction holds. At 1 the two are equal.
NOISE_DOMINATED = 1.0
# Update geometry across sites. Under DP every honest update is mostly noise of the same scale (norms within a few
# % of each other, measured), so only gross departures are evidence: an update of norm ~0 (nothing trained) or many
# times the median (diverging, or not a trained update at all).
MIN_SITES = 3  # cross-site comparisons need a median of at least this many sites
ZERO_NORM = 1e-6  # × median update norm: the site sent back what it received
NORM_OUTLIER = 5.0  # × median update norm
STRAGGLER = 3.0  # × median training seconds (and at least STRAGGLER_MIN_S more), and × the median seconds per example
STRAGGLER_MIN_S = 5.0
# Trends of the global model over rounds (run-level).
TREND_ROUNDS = 3  # rounds a trend must span
UNDERFIT_DROP = 0.02  # the sites' training loss fell by less than this share since round 1: not learning
OVERFIT_RISE = 0.05  # server test loss this share above its best while the sites' training loss keeps falling
# Miscalibration is read on the server's held-out set only: a site's noised calibration histogram (~24 validation
# examples against noise of std ~15 per cell at σ ≈ 4) cannot tell a 10-point gap from chance.
MISCAL_GAP = 0.10  # |mean confidence − accuracy|: ≈ 4 standard errors of the accuracy on the 379 test reviews
MISCAL_ROUNDS = 2  # consecutive rounds it must hold (one round's model can be caught mid-swing)


def current(rec: RoundRecord) -> dict[tuple[str | None, str], Finding]:
    """Every finding that holds in this round, keyed by (site, kind)."""
    out: dict[tuple[str | None, str], Finding] = {}
    for row in rec.sites:
        if row.status == "failed" and row.reason.startswith("update rejected"):
            out[(row.site, K.UPDATE_REJECTED)] = Finding(
                K.UPDATE_REJECTED, "critical", f"{row.site}'s update was not averaged in round {rec.round}: "
                f"{row.reason.removeprefix('update rejected: ')}", row.site)
        elif row.status == "failed":
            out[(row.site, K.SITE_FAILED)] = Finding(
                K.SITE_FAILED, "critical", f"{row.site} failed in {row.phase} in round {rec.round}: {row.reason}",
                row.site)
        elif row.status == "refused":
            out[(row.site, K.BUDGET_EXHAUSTED)] = Finding(
                K.BUDGET_EXHAUSTED, "warning", f"{row.site} refused to {row.phase} in round {rec.round} to stay within "
                f"its privacy budget: {row.reason}", row.site)
    share = rec.metrics.get("test_max_prediction_share")
    if share is not None and share >= COLLAPSE_SHARE:
        f1 = rec.metrics.get("test_macro_f1")
        out[(None, K.MAJORITY_COLLAPSE)] = Finding(
            K.MAJORITY_COLLAPSE, "warning", f"the global model predicts one class for {share:.0%} of the server's test set "
            f"(round {rec.round}): it has collapsed onto the majority class"
            + (f"; macro-F1 {f1:.2f}" if f1 is not None else ""), None)
    # Each site's reading is itself noised (its std is public): a site counts with the upper end of its reading,
    # + 2 std, so that release noise alone cannot make the finding fire.
    steps = {r.site: r.steps for r in rec.sites if r.phase == "train" and r.status == "ok" and r.steps}
    snr = {r.site: (r.signal_to_noise + 2 * (r.signal_to_noise_std or 0.0)) * steps[r.site] ** 0.5 for r in rec.sites
           if r.phase == "evaluate" and r.signal_to_noise is not None and r.site in steps}
    if snr:
        median = statistics.median(snr.values())
        if median < NOISE_DOMINATED:
            out[(None, K.DP_NOISE_DOMINATES)] = Finding(
                K.DP_NOISE_DOMINATES, "warning", f"DP noise dominates the sites' training: the median round "
                f"signal-to-noise √steps · ‖Σ clipped gradients‖ / (σ·C), at the top of its noise (+2 std), is "
                f"{median:.2f} over the {len(snr)} sites that trained in round {rec.round} (below 1, the noise along "
                "the gradient outweighs the gradient). More examples per site, a larger ε or more steps per round "
                "help.", None)
    out.update(_cross_site(rec))
    return out


def _cross_site(rec: RoundRecord) -> dict[tuple[str | None, str], Finding]:
    """Sites whose update or timing departs grossly from the others' this round (post-processing only)."""
    out: dict[tuple[str | None, str], Finding] = {}
    trained = {r.site: r for r in rec.sites if r.phase == "train" and r.status == "ok" and r.update_norm is not None}
    if len(trained) < MIN_SITES:
        return out
    measured = {r.site for r in rec.sites if r.phase == "evaluate" and r.status == "ok" and r.train_loss is not None}
    median = statistics.median(r.update_norm for r in trained.values())
    for site, r in trained.items():
        if median <= 0:
            break
        if r.update_norm <= ZERO_NORM * median:
            out[(site, K.FREE_RIDER)] = Finding(
                K.FREE_RIDER, "critical", f"{site}'s update in round {rec.round} equals the global model it received "
                f"(update norm {r.update_norm:.2g} vs median {median:.3g} over {len(trained)} sites): it did not "
                "train, yet its weight counted in the average", site)
        elif r.update_norm >= NORM_OUTLIER * median:
            if site in measured:
                out[(site, K.DIVERGENCE)] = Finding(
                    K.DIVERGENCE, "critical", f"{site}'s update in round {rec.round} is {r.update_norm / median:.0f}× "
                    f"the median norm ({r.update_norm:.3g} vs {median:.3g} over {len(trained)} sites): its local "
                    "training diverges (learning rate too high, or far too many local steps)", site)
            else:
                out[(site, K.FREE_RIDER)] = Finding(
                    K.FREE_RIDER, "critical", f"{site}'s update in round {rec.round} is {r.update_norm / median:.0f}× "
                    f"the median norm and it measured no training losses this round: it sent weights it did not "
                    "train", site)
    # The site's whole handler span (what the round waits for), else its reported compute seconds.
    seconds = {s: (r.ended_at - r.started_at) if r.started_at and r.ended_at else r.seconds
               for s, r in trained.items() if r.seconds is not None or r.started_at}
    # Examples each site processed (steps × q × n, from the public DP-SGD schedule): a site holding 10× the data
    # honestly takes ~10× as long, so a straggler must also be slow per example.
    work = {s: r.steps * r.sample_rate * r.num_examples for s, r in trained.items()
            if r.steps and r.sample_rate and r.num_examples}
    per_example = {s: seconds[s] / work[s] for s in seconds if s in work} if set(work) >= set(seconds) else {}
    if len(seconds) >= MIN_SITES:
        typical = statistics.median(seconds.values())
        typical_rate = statistics.median(per_example.values()) if per_example else 0.0
        for site, sec in seconds.items():
            slow_per_example = not per_example or per_example[site] >= STRAGGLER * typical_rate
            if sec >= STRAGGLER * typical and sec >= typical + STRAGGLER_MIN_S and slow_per_example:
                out[(site, K.STRAGGLER)] = Finding(
                    K.STRAGGLER, "warning", f"{site} took {sec:.0f} s to train in round {rec.round}, {sec / typical:.0f}× "
                    f"the median {typical:.1f} s over {len(seconds)} sites: a straggler that every round waits for "
                    "(server.round-timeout drops it)", site)
    return out


def trends(history: list[dict[str, float | None]], round_: int) -> dict[tuple[str | None, str], Finding]:
    """Run-level findings from the global curves so far (history: each round's metrics, oldest first)."""
    out = _miscalibration(history, round_)
    if len(history) < TREND_ROUNDS:
        return out
    train = [m.get("train_loss") for m in history]
    test = [m.get("test_loss") for m in history]
    if all(v is not None for v in train[-TREND_ROUNDS:]) and train[0] is not None and train[0] > 0:
        drop = (train[0] - train[-1]) / train[0]
        if drop < UNDERFIT_DROP:
            out[(None, K.UNDERFITTING)] = Finding(
                K.UNDERFITTING, "warning", f"the sites' training loss went from {train[0]:.3f} in round 1 to "
                f"{train[-1]:.3f} in round {round_} ({drop:+.1%}): the model is not learning the sites' data (too "
                "much DP noise per step, too low a learning rate, or too few trainable values)", None, confidence=0.8)
    recent = test[-TREND_ROUNDS:]
    if all(v is not None for v in recent) and all(v is not None for v in train[-TREND_ROUNDS:]):
        best = min(v for v in test if v is not None)
        rising = all(b > a for a, b in zip(recent, recent[1:], strict=False))
        falling = train[-1] < train[-TREND_ROUNDS]
        if rising and falling and recent[-1] >= best * (1 + OVERFIT_RISE):
            out[(None, K.GLOBAL_OVERFITTING)] = Finding(
                K.GLOBAL_OVERFITTING, "warning", f"the server's test loss rose for {TREND_ROUNDS - 1} rounds to "
                f"{recent[-1]:.3f} (best {best:.3f}) while the sites' training loss fell to {train[-1]:.3f}: the "
                "global model is overfitting the sites; an earlier round's checkpoint generalises better", None,
                confidence=0.8)
    return out


def _miscalibration(history: list[dict[str, float | None]], round_: int) -> dict[tuple[str | None, str], Finding]:
    """The global model's confidence against its accuracy on the server's test set, over the last rounds."""
    last = history[-MISCAL_ROUNDS:]
    gaps = [m["test_confidence"] - m["test_accuracy"] for m in last
            if m.get("test_confidence") is not None and m.get("test_accuracy") is not None]
    if len(last) < MISCAL_ROUNDS or len(gaps) < MISCAL_ROUNDS or not (all(g >= MISCAL_GAP for g in gaps)
                                                                       or all(g <= -MISCAL_GAP for g in gaps)):
        return {}
    m = last[-1]
    how = ("overconfident: its probabilities overstate how often it is right; decisions that threshold them "
           "(triage, abstention) act on false certainty" if gaps[-1] > 0 else
           "underconfident: it is right more often than its probabilities say; thresholds on them discard good "
           "predictions")
    ece = f", ECE {m['test_ece']:.2f}" if m.get("test_ece") is not None else ""
    return {(None, K.MISCALIBRATION): Finding(
        K.MISCALIBRATION, "warning", f"on the server's test set the global model's mean confidence is "
        f"{m['test_confidence']:.2f} but its accuracy {m['test_accuracy']:.2f} in round {round_} (gap "
        f"{gaps[-1]:+.2f} for {len(gaps)} rounds{ece}): it is {how}. Temperature scaling on held-out data fixes it "
        "without retraining", None, confidence=0.8)}


class FindingsTracker:
    """Remembers which findings are open, so each is recorded when it appears (or reappears), not every round; the
    statistical diagnosis (server/diagnosis.py) accumulates its evidence over the rounds here."""

    def __init__(self, diagnosis: Diagnosis | None = None) -> None:
        self.open: set[tuple[str | None, str]] = set()
        self.diagnosis = diagnosis or Diagnosis()
        self.history: list[dict[str, float | None]] = []

    def update(self, rec: RoundRecord) -> list[Finding]:
        self.diagnosis.add(rec)
        self.history.append(dict(rec.metrics))
        now = {**self.diagnosis.findings(), **trends(self.history, rec.round), **current(rec)}
        new = [f for key, f in now.items() if key not in self.open]
        self.open = set(now)
        return new


def rediagnose(records: list[RoundRecord], *, loss_clip: float = 3.0,
               class_names: tuple[str, ...] | None = None) -> list[tuple[int, Finding]]:
    """The findings the current code draws from a stored run's rounds, as (round, finding) in the order they would
    have been recorded: for a run made before a diagnosis change, or to check what was recorded."""
    tracker = FindingsTracker(Diagnosis(loss_clip=loss_clip, class_names=class_names))
    return [(rec.round, f) for rec in records for f in tracker.update(rec)]


def rediagnose_store(store, run_id: str | None = None) -> tuple[dict, list[tuple[int, Finding]]]:  # noqa: ANN001
    """(the stored run, the findings this version draws from its rounds), with the run's own labels and loss clip."""
    from common.run_store import load_round_records, load_run

    run = load_run(store, run_id)
    labels = tuple(x.strip() for x in str(run["config"].get("data.labels", "")).split(",") if x.strip())
    return run, rediagnose(load_round_records(store, run["run_id"]),
                           loss_clip=float(run["config"].get("dp.loss-clip", 3.0)), class_names=labels or None)
