"""Steps 3-4: metrics derived from (possibly noised) counts: accuracy, per-class F1, macro-F1, mean loss. Stdlib + NumPy only."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts, rows = true label, columns = prediction."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    return confusion


def accuracy(confusion: np.ndarray) -> float:
    total = float(confusion.sum())
    return float(np.trace(confusion) / total) if total > 0 else 0.0


def per_class_f1(confusion: np.ndarray) -> np.ndarray:
    """F1 of each class from a [K, K] matrix (rows = true, columns = predicted); 0 where undefined."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    denom = predicted + actual
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes that occur (true or predicted); a model stuck on one class scores ~1/K of it."""
    f1 = per_class_f1(confusion)
    present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    return float(f1[present].mean()) if present.any() else 0.0


def prediction_share(confusion: np.ndarray) -> np.ndarray:
    """Share of predictions per class; one share near 1 means the model collapsed onto that class."""
    predicted = confusion.sum(axis=0).astype(np.float64)
    total = predicted.sum()
    return predicted / total if total > 0 else predicted


def calibration(probs: np.ndarray, labels: np.ndarray, *, bins: int = 10) -> dict[str, float]:
    """Expected calibration error (|accuracy − confidence| per equal-width confidence bin, weighted by the bin's
    examples) and the mean confidence of the predicted class; confidence − accuracy > 0 is overconfidence."""
    if len(labels) == 0:
        return {"ece": float("nan"), "confidence": float("nan")}
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, correct, bins) - np.bincount(idx, conf, bins))  # per bin: |Σ correct − Σ conf|
    return {"ece": float(gap.sum() / count.sum()), "confidence": float(conf.mean())}


def summary_metrics(confusion: np.ndarray, loss_sum: float) -> dict[str, float]:
    total = float(confusion.sum())
    return {
        "accuracy": accuracy(confusion),
        "macro_f1": macro_f1(confusion),
        "loss": loss_sum / total if total > 0 else float("nan"),
        "max_prediction_share": float(prediction_share(confusion).max()) if total > 0 else 0.0,
    }
