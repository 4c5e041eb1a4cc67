"""Step 4 → findings from the global model's curves over rounds (run-level): underfitting, global overfitting, miscalibration.

history holds each round's metrics, oldest first: the sites' training loss and the server's test loss, accuracy and
confidence.
"""

from __future__ import annotations

import math

from common.rounds import Finding
from common.rounds import FindingKind as K


def trends(history: list[dict[str, float | None]], round_: int) -> dict[tuple[str | None, str], Finding]:
    """Run-level findings from the global curves so far (history: each round's metrics, oldest first)."""
    return {**miscalibration(history, round_), **underfitting(history, round_), **global_overfitting(history, round_)}


# Trends of the global model over rounds (run-level).
TREND_ROUNDS = 3  # rounds a trend must span
UNDERFIT_DROP = 0.02  # the sites' training loss fell by less than this share since round 1: not learning


def underfitting(history: list[dict[str, float | None]], round_: int) -> dict[tuple[str | None, str], Finding]:
    """The sites' training loss barely fell since round 1, over at least TREND_ROUNDS rounds."""
    out: dict[tuple[str | None, str], Finding] = {}
    if len(history) < TREND_ROUNDS:
        return out
    train = [m.get("train_loss") for m in history]
    if all(v is not None for v in train[-TREND_ROUNDS:]) and train[0] is not None and train[0] > 0:
        drop = (train[0] - train[-1]) / train[0]
        if drop < UNDERFIT_DROP:
            # the sentence quotes the change, so a loss that rose reads "+4.9%", one that barely fell "-1.2%"
            out[(None, K.UNDERFITTING)] = Finding(
                K.UNDERFITTING, "warning", f"the sites' training loss went from {train[0]:.3f} in round 1 to "
                f"{train[-1]:.3f} in round {round_} ({-drop:+.1%}): the model is not learning the sites' data (too "
                "much DP noise per step, too low a learning rate, or too few trainable values)", None, confidence=0.8)
    return out


OVERFIT_RISE = 0.05  # server test loss this share above its best while the sites' training loss keeps falling
# and its test accuracy falls by at least this much over those rounds (a fall of 0.001 with a rising loss was a model
# growing more confident: a clean natural movie run of the seed-2 benchmark pass, 0.756 → 0.755; set after that
# pass), and by OVERFIT_SE binomial standard errors of the test accuracy at the test part's size (test_examples):
# on a few hundred drug reviews a fall of 0.03 is one standard error, and the server's validation part of the same
# run rose 0.61 → 0.70 meanwhile (the seed-5 pass's clean drug-review run; set after it).
OVERFIT_ACC_DROP = 0.01
OVERFIT_SE = 2.0


def global_overfitting(history: list[dict[str, float | None]], round_: int) -> dict[tuple[str | None, str], Finding]:
    """The server's test loss rose for the last TREND_ROUNDS − 1 rounds, and its test accuracy fell (by
    OVERFIT_SE standard errors at the test part's size, and OVERFIT_ACC_DROP at least), while the
    sites' training loss fell. (A loss that rises while the accuracy rises is a model growing more confident, as DP
    runs do round by round: not overfitting.)"""
    out: dict[tuple[str | None, str], Finding] = {}
    if len(history) < TREND_ROUNDS:
        return out
    train = [m.get("train_loss") for m in history]
    test = [m.get("test_loss") for m in history]
    recent = test[-TREND_ROUNDS:]
    if all(v is not None for v in recent) and all(v is not None for v in train[-TREND_ROUNDS:]):
        best = min(v for v in test if v is not None)
        rising = all(b > a for a, b in zip(recent, recent[1:], strict=False))
        falling = train[-1] < train[-TREND_ROUNDS]
        acc = [m.get("test_accuracy") for m in history[-TREND_ROUNDS:]]
        worse = None in acc or acc[-1] <= acc[0] - _significant_fall(acc[0], history[-1].get("test_examples"))
        if rising and falling and worse and recent[-1] >= best * (1 + OVERFIT_RISE):
            out[(None, K.GLOBAL_OVERFITTING)] = Finding(
                K.GLOBAL_OVERFITTING, "warning", f"the server's test loss rose for {TREND_ROUNDS - 1} rounds to "
                f"{recent[-1]:.3f} (best {best:.3f}) while the sites' training loss fell to {train[-1]:.3f}: the "
                "global model is overfitting the sites; an earlier round's checkpoint generalises better", None,
                confidence=0.8)
    return out


def _significant_fall(accuracy: float, examples: float | None) -> float:
    """The fall of the test accuracy that the test part's sampling alone would rarely show (OVERFIT_SE standard
    errors at its size), and at least OVERFIT_ACC_DROP; OVERFIT_ACC_DROP where the size is not recorded."""
    if not examples:
        return OVERFIT_ACC_DROP
    return max(OVERFIT_ACC_DROP, OVERFIT_SE * math.sqrt(accuracy * (1 - accuracy) / examples))


# Miscalibration is read on the server's held-out set only: a site's noised calibration histogram (~24 validation
# examples against noise of std ~15 per cell at σ ≈ 4) cannot tell a 10-point gap from chance.
MISCAL_GAP = 0.10  # |mean confidence − accuracy|: ≈ 4 standard errors of the accuracy on the 379 test reviews
MISCAL_ROUNDS = 2  # consecutive rounds it must hold (one round's model can be caught mid-swing)


def miscalibration(history: list[dict[str, float | None]], round_: int) -> dict[tuple[str | None, str], Finding]:
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
