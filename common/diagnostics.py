"""Step 3's contract, read at step 4: what a site's error summary is made of, how much one example can move it, and what can be read from it.

A summary is a set of named blocks of counts and bounded sums. A site computes them exactly (client/summary.py),
adds Gaussian noise once to all of them, and sends only the noised blocks (unclamped, so that they stay unbiased). Everything below `derive` is
post-processing of the noised blocks: it costs no ε.

Sensitivity (neighbouring relation: add or remove one example of the site, as Opacus uses). An example sits in exactly
one split (the split is decided per row by a keyed hash of its text, common/datasets.py), so it moves either the
validation blocks or the train blocks, never both. In each block it moves one cell by at most 1; the step-averaged
gradient blocks move by at most 1/steps in each of `steps` cells, i.e. by at most 1 in L2 too. Block b is scaled by
its weight w_b before the noise is added, so Δ² = max(Σ_val w_b², Σ_train w_b²) and block b's noise std is σ·Δ / w_b:
the confusion matrix, label histogram and loss sums (weight 1) get twice the precision of the secondary histograms.
The validation side's Σ w_b² is 3, the train side's 4 (Δ = 2): the train side's confusion at the received model
came at no cost in noise, its texts' embeddings per predicted class (weight 1: a gap between centroids is a squared
distance over the encoder's width, so its z-score grows as 1 / noise variance) at 15 % more noise on every block, and
the opt-in cross-site counts (validation side 3 → 4) now at none. The embedding block holds unit vectors (each
example's pooled encoder output divided by its norm), so one example moves one of its rows by exactly 1 in L2, as a
count moves one cell by 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.metrics import accuracy, macro_f1, per_class_f1, prediction_share
from common.rounds import SiteRoundRow, SiteSummary

VAL, TRAIN = "val", "train"
CONF_BINS = 10  # calibration: confidence of the predicted class in [0, 1], equal bins
LOSS_BINS = 10  # per-example cross-entropy clipped to [0, dp.loss-clip], equal bins
# Per-sample gradient norms in units of the clip C; clipping happens from the 1.0 edge on.
GRAD_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, math.inf)
EMBEDDING = "train_embedding"  # the one block whose width is the encoder's, not a function of K
DEFAULT_THRESHOLD = 0.5  # confident-learning threshold before any noised self-confidence has been released


@dataclass(frozen=True)
class Block:
    name: str
    split: str  # whose examples move it: VAL or TRAIN
    weight: float  # precision weight (see the module docstring)
    meaning: str

    def shape(self, k: int, dims: int = 0) -> tuple[int, ...]:
        """The block's cells for K classes (`dims`: the encoder's output width, public model metadata)."""
        if self.name == EMBEDDING:
            return (k, dims)
        return {
            "confusion": (k, k), "val_loss_sum": (1,), "val_loss_hist": (LOSS_BINS,), "calibration": (2, CONF_BINS),
            "self_confidence": (k,), "label_issues": (k, k), "train_labels": (k,), "train_loss_sum": (1,),
            "train_loss_hist": (LOSS_BINS,), "grad_norm_hist": (len(GRAD_EDGES) - 1,), "clipped_sum_norm": (1,),
            "train_confusion": (k, k),
        }[self.name]


BLOCKS = (
    Block("confusion", VAL, 1.0, "validation counts, rows = given label, columns = prediction"),
    Block("val_loss_sum", VAL, 1.0, "Σ over validation of min(loss, L) / L"),
    Block("val_loss_hist", VAL, 0.5, "validation examples per loss bin over [0, L]"),
    Block("calibration", VAL, 0.5, "validation examples per confidence bin; row 0 correct, row 1 wrong"),
    Block("self_confidence", VAL, 0.5, "Σ p(given label | x) per given label (next round's thresholds)"),
    Block("label_issues", VAL, 0.5, "confident joint off the diagonal: given label i, confidently class j"),
    Block("train_labels", TRAIN, 1.0, "train examples per label"),
    Block("train_loss_sum", TRAIN, 1.0, "Σ over train of min(loss, L) / L, each at its first use in the round"),
    Block("train_loss_hist", TRAIN, 0.5, "train examples per loss bin over [0, L], at their first use in the round"),
    Block("grad_norm_hist", TRAIN, 0.5, "per-sample gradient norms / C per bin, averaged over the round's DP steps"),
    Block("clipped_sum_norm", TRAIN, 0.5, "‖Σ clipped per-sample gradients‖ / C, averaged over the round's DP steps"),
    # Per-class evidence that does not rest on the label mix: how the model every site received labels each
    # site's own train texts, against the labels they carry (class-conditional noise, swaps and partial flips move
    # its rows; a site that is only skewed does not). Read off the first use, like the losses.
    Block("train_confusion", TRAIN, 0.5, "train counts, rows = given label, columns = the received model's "
          "prediction at first use in the round"),
    # Input-side evidence that does not rest on the model's confidence: where each site's texts sit in the
    # encoder's space, per class the received model predicts (label-free: label faults leave it alone; a site that is
    # only skewed compares like with like). A domain the model reads as confidently as its own shows here only.
    Block(EMBEDDING, TRAIN, 1.0, "Σ of train texts' unit-norm encoder outputs (the head's "
          "input) per class the received model predicts, at first use in the round; rows = class, columns = dims"),
)
# Measured by the round's training pass (client/train.py): only a site that trained this round has them.
TRAINING_BLOCKS = ("train_loss_sum", "train_loss_hist", "grad_norm_hist", "clipped_sum_norm", "train_confusion",
                   EMBEDDING)
MAX_EMBEDDING_DIMS = 8192  # a reply declaring a wider embedding block is refused before its values are read
# Cross-site evaluation (opt-in, server.cross-site-eval): the site also counts how many of its validation examples
# each of M other sites' local models gets right. One validation example moves each of the M counts by ≤ 1, so the
# block gets weight 1/√M: its share of Δ² is 1 whatever M, and the validation side's Δ² goes from 3 to 4.
CROSS = "cross_correct"
CROSS_WEIGHT_SQ = 1.0


def sensitivity(cross_models: int = 0) -> float:
    """Δ of one release: the larger split's √(Σ w_b²), with the cross-site block when `cross_models` > 0."""
    val = sum(b.weight ** 2 for b in BLOCKS if b.split == VAL) + (CROSS_WEIGHT_SQ if cross_models else 0.0)
    return math.sqrt(max(val, sum(b.weight ** 2 for b in BLOCKS if b.split == TRAIN)))


SENSITIVITY = sensitivity()


def cross_weight(cross_models: int) -> float:
    return math.sqrt(CROSS_WEIGHT_SQ / cross_models)


def noise_std(noise_multiplier: float, cross_models: int = 0) -> dict[str, float]:
    """Std of the noise in each block's cells, for a release at `noise_multiplier` (σ·Δ / w_b)."""
    delta = sensitivity(cross_models)
    out = {b.name: noise_multiplier * delta / b.weight for b in BLOCKS}
    if cross_models:
        out[CROSS] = noise_multiplier * delta / cross_weight(cross_models)
    return out


def empty_blocks(k: int, dims: int = 0) -> dict[str, np.ndarray]:
    return {b.name: np.zeros(b.shape(k, dims), dtype=np.float64) for b in BLOCKS}


def loss_blocks(losses: np.ndarray, loss_clip: float) -> tuple[float, np.ndarray]:
    """(Σ min(loss, L) / L, examples per loss bin over [0, L]) of per-example losses: each example adds ≤ 1 to each."""
    clipped = np.minimum(np.asarray(losses, dtype=np.float64), loss_clip)
    idx = np.minimum((clipped / loss_clip * LOSS_BINS).astype(int), LOSS_BINS - 1)
    return float(clipped.sum() / loss_clip), np.bincount(idx, minlength=LOSS_BINS).astype(np.float64)


def loss_bin_edges(loss_clip: float) -> np.ndarray:
    return np.linspace(0.0, loss_clip, LOSS_BINS + 1)


def thresholds(self_confidence: np.ndarray, label_counts: np.ndarray, *, min_count: float = 5.0) -> np.ndarray:
    """Per-class confident-learning thresholds (Cleanlab's: the mean self-confidence of each given label), from
    noised sums; a class with too few (noised) examples keeps DEFAULT_THRESHOLD. Clamped to [1/K, 1]."""
    k = len(label_counts)
    out = np.full(k, DEFAULT_THRESHOLD)
    ok = label_counts >= min_count
    out[ok] = np.clip(self_confidence[ok], 0.0, None) / label_counts[ok]
    return np.clip(out, 1.0 / k, 1.0)


def clamp_to_total(x: np.ndarray, total: float) -> np.ndarray:
    """Noised cells clamped at 0, then rescaled to the public total (a site's split sizes are public).

    Free post-processing. Ratios (accuracy, F1, shares) are unchanged by the rescaling; histograms become
    comparable across sites. Measured on the demo sites, it beats the L2 projection onto {x ≥ 0, Σx = total}:
    the projection zeroes small cells, and per-class F1 from the sparse matrix it leaves is further from the truth
    (mean absolute error 0.36 vs 0.31 at ε = 0.5 per round; docs/ARCHITECTURE.md).
    """
    clamped = np.clip(np.asarray(x, dtype=np.float64), 0.0, None)
    mass = clamped.sum()
    return clamped * (total / mass) if mass > 0 and total > 0 else clamped


def derive(blocks: dict[str, np.ndarray], *, loss_clip: float, n_val: int, n_train: int,
           dpsgd_noise_multiplier: float = 0.0, trainable_values: int = 0, trained: bool = True,
           release_noise_multiplier: float = 0.0, cross_models: int = 0) -> dict:
    """Everything an engineer reads from a (noised) summary. Pure post-processing: no data, no ε.

    Sites send the noised blocks unclamped (unbiased: sums over cells stay unbiased). Here histograms over one split
    are clamped at 0 and rescaled to their public total, sums are clamped to their range, and totals of cells are
    taken before clamping.
    Sizes are public (they weight FedAvg). Returned floats may be NaN where a quantity is undefined.
    """
    blocks = {**blocks}
    blocks.setdefault("train_confusion", np.zeros_like(blocks["confusion"]))  # stores from before it existed
    for name, n in (("confusion", n_val), ("calibration", n_val), ("val_loss_hist", n_val),
                    ("train_labels", n_train), ("train_loss_hist", n_train), ("train_confusion", n_train)):
        blocks[name] = clamp_to_total(blocks[name], n)
    blocks["val_loss_sum"] = np.clip(blocks["val_loss_sum"], 0.0, max(n_val, 0))
    blocks["train_loss_sum"] = np.clip(blocks["train_loss_sum"], 0.0, max(n_train, 0))
    c = blocks["confusion"]
    k = c.shape[0]
    f1 = per_class_f1(c)
    predicted, actual = c.sum(axis=0), c.sum(axis=1)
    tp = np.diag(c)
    precision = np.divide(tp, predicted, out=np.full(k, np.nan), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.full(k, np.nan), where=actual > 0)

    cal = blocks["calibration"]
    per_bin = cal.sum(axis=0)
    mids = (np.arange(CONF_BINS) + 0.5) / CONF_BINS
    acc_bin = np.divide(cal[0], per_bin, out=np.zeros(CONF_BINS), where=per_bin > 0)
    ece = float(np.sum(per_bin * np.abs(acc_bin - mids)) / per_bin.sum()) if per_bin.sum() > 0 else math.nan

    issues = blocks["label_issues"].copy()
    np.fill_diagonal(issues, 0.0)
    issues_total = float(np.clip(issues.sum(), 0.0, n_val))  # summed before clamping: unbiased
    issues = np.clip(issues, 0.0, None)
    val_loss = float(blocks["val_loss_sum"][0] * loss_clip / n_val) if n_val else math.nan
    # Train losses are measured by the round's training pass: a site that did not train this round has none.
    train_loss = float(blocks["train_loss_sum"][0] * loss_clip / n_train) if n_train and trained else math.nan

    out = {
        "accuracy": accuracy(c), "macro_f1": macro_f1(c), "confusion": c.tolist(),
        "per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist()},
        "label_histogram": actual.tolist(), "prediction_histogram": predicted.tolist(),
        "train_label_histogram": blocks["train_labels"].tolist(),
        "calibration": {"accuracy": acc_bin.tolist(), "count": per_bin.tolist(), "ece": ece},
        "label_issues": {"matrix": issues.tolist(), "total": issues_total,
                         "share": issues_total / n_val if n_val else math.nan},
        "loss": {"val": val_loss, "train": train_loss, "gap": val_loss - train_loss,
                 "edges": loss_bin_edges(loss_clip).tolist(), "val_histogram": blocks["val_loss_hist"].tolist(),
                 "train_histogram": blocks["train_loss_hist"].tolist()},
        # The train split at the received model (rows = given label): NaN-free zeros when the site did not train.
        "train_confusion": blocks["train_confusion"].tolist() if trained else None,
        "dp_health": None,
    }
    g = np.clip(blocks["grad_norm_hist"], 0.0, None)
    if trained and dpsgd_noise_multiplier > 0 and g.sum() > 0:
        mids_g = np.array([(a + b) / 2 if math.isfinite(b) else a for a, b in zip(GRAD_EDGES[:-1], GRAD_EDGES[1:], strict=True)])
        signal = max(float(blocks["clipped_sum_norm"][0]), 0.0)
        out["dp_health"] = {
            "clip_fraction": float(g[4:].sum() / g.sum()),  # bins from 1.0·C up: clipped
            "mean_grad_norm": float(np.sum(mids_g * g) / g.sum()),  # in units of C; the top bin counts as 8·C
            "grad_norm_histogram": g.tolist(), "grad_norm_edges": [e if math.isfinite(e) else None for e in GRAD_EDGES],
            # Per DP step: ‖Σ clipped gradients‖ / (σ·C). The noise is isotropic, so only its component along the
            # signal's direction (std σ·C) competes with the signal for progress; the rest of its σ·C·√d norm
            # moves the weights sideways. Below ~1 a step's progress along its own gradient is mostly noise.
            "signal_to_noise": signal / dpsgd_noise_multiplier,
            # That reading is itself released with noise (the clipped-sum block's std, public): its std here.
            "signal_to_noise_std": (noise_std(release_noise_multiplier, cross_models)["clipped_sum_norm"]
                                    / dpsgd_noise_multiplier),
            # Deprecated (report schema ≤ 3, kept because report keys are never removed): the whole noise norm
            # σ·√d over the signal. √d ≈ 274 too pessimistic for learning: the sideways noise does not cancel it.
            "noise_to_signal": (dpsgd_noise_multiplier * math.sqrt(trainable_values) / signal if signal > 0
                                else math.inf),
        }
    return out


def fill_row(row: SiteRoundRow, d: dict, *, blocks: dict[str, np.ndarray], noise_multiplier: float,
             round_trained: int, n_train: int, n_val: int, cross: np.ndarray | None = None,
             cross_models: tuple[str, ...] = ()) -> None:
    """A site's evaluate row from its released blocks and their `derive`d reading: the headline numbers as columns,
    the whole summary as a SiteSummary (rounded: noised values carry no meaning beyond a few decimals)."""
    row.accuracy, row.macro_f1 = d["accuracy"], d["macro_f1"]
    confusion = np.asarray(d["confusion"])
    row.max_prediction_share = float(prediction_share(confusion).max()) if confusion.sum() > 0 else None
    row.loss, row.train_loss = _finite(d["loss"]["val"]), _finite(d["loss"]["train"])
    row.ece = _finite(d["calibration"]["ece"])
    row.label_issues = _finite(d["label_issues"]["share"])
    if d["dp_health"] is not None:
        h = d["dp_health"]
        row.clip_fraction, row.grad_norm = h["clip_fraction"], h["mean_grad_norm"]
        row.signal_to_noise = _finite(h["signal_to_noise"])
        row.signal_to_noise_std = _finite(h["signal_to_noise_std"])
    row.confusion = np.round(confusion, 3).tolist()  # clamped, rescaled
    std = noise_std(noise_multiplier, len(cross_models))
    cross_site = None
    if cross is not None:
        cross_site = {"models": list(cross_models), "correct": _round_floats(cross.tolist()),
                      "accuracy": _round_floats(np.clip(cross / max(n_val, 1), 0.0, 1.0).tolist()),
                      "noise_std": std.get(CROSS, 0.0)}
    row.summary = SiteSummary(round_trained=round_trained, noise_multiplier=noise_multiplier, noise_std=std,
                              n_train=n_train, derived=_round_floats(d), cross_site=cross_site,
                              # As released (unclamped, unbiased): what later analyses average over rounds.
                              released={k: _round_floats(v.tolist()) for k, v in blocks.items()})


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _round_floats(x):  # noqa: ANN001, ANN202
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _round_floats(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_round_floats(v) for v in x]
    return x
