"""Step 3 at a site: the error summary of the global model on local data, released only through Gaussian noise.

`local_summary` computes the blocks of common/diagnostics.py exactly; they never leave the site. `release` adds
noise of std σ·Δ / w_b to every cell of block b in one Gaussian mechanism (Δ = diagnostics.sensitivity(M), M the
local models of an opt-in cross-site evaluation, 0 without). Noised
cells may be negative; they are sent as they are, because sums of unclamped cells stay unbiased, and clamping or
projecting them (diagnostics.derive) is free post-processing wherever they are read. The site's ledger records it as the
Gaussian entry (σ, q = 1, steps = 1). The per-example label-issue list Cleanlab could give stays at the site.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from client.noise import Randomness, SiteRandom
from client.train import TrainHealth
from common import diagnostics as dg
from common.metrics import confusion_matrix
from common.model import Split, embedding_dims, predict


@dataclass(frozen=True)
class Summary:
    blocks: dict[str, np.ndarray]  # block name -> array of diagnostics.Block.shape(K)
    num_classes: int
    health_round: int  # round of the DP-SGD training the gradient blocks describe; 0 = none
    noise_multiplier: float  # 0 = exact (never sent under DP)
    sensitivity: float
    seconds: float = 0.0  # compute spent on the summary beyond plain evaluation (histograms, confident joint)
    # Cross-site evaluation: how many validation examples each other site's local model gets right (M counts, in
    # the order of cross_models); released in the same Gaussian mechanism, Δ then includes its block.
    cross: np.ndarray | None = None
    cross_models: tuple[str, ...] = ()


def confident_joint_issues(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[K, K] counts of examples with given label i that the model confidently puts in class j ≠ i (Cleanlab's
    confident joint, uncalibrated, off the diagonal). Thresholds are public (from earlier noised releases), so each
    example lands in at most one cell: sensitivity 1."""
    from cleanlab.count import compute_confident_joint

    k = probs.shape[1]
    if len(labels) == 0:
        return np.zeros((k, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about classes without examples: normal at a site
        joint = compute_confident_joint(labels, probs, thresholds=np.asarray(thresholds, dtype=np.float64),
                                        calibrate=False).astype(np.float64)
    np.fill_diagonal(joint, 0.0)  # the diagonal is agreement, and cleanlab forces it to ≥ 1 anyway
    return joint


def local_summary(model: nn.Module, train: Split, val: Split, *, num_classes: int, loss_clip: float,
                  thresholds: np.ndarray, health: TrainHealth | None = None, health_round: int = 0) -> Summary:
    """The exact summary of one site (it stays here; only `release(...)` of it is sent).

    `health` carries what the site's training pass measured this round (train losses, gradient norms); without it
    (the site did not train this round) those blocks stay 0 and health_round says so.
    """
    k = num_classes
    blocks = dg.empty_blocks(k, embedding_dims(model))  # the embedding block's width is the head's input's
    y_val, y_train = val.labels.numpy(), train.labels.numpy()

    probs, losses = predict(model, val)  # what any evaluation does; the rest below is the summary's own cost
    t0 = time.perf_counter()
    if len(y_val):
        pred = probs.argmax(axis=1)
        conf = probs.max(axis=1)
        blocks["confusion"] = confusion_matrix(y_val, pred, k).astype(np.float64)
        blocks["val_loss_sum"][0], blocks["val_loss_hist"] = dg.loss_blocks(losses, loss_clip)
        bins = np.minimum((conf * dg.CONF_BINS).astype(int), dg.CONF_BINS - 1)
        np.add.at(blocks["calibration"], ((pred != y_val).astype(int), bins), 1.0)
        np.add.at(blocks["self_confidence"], y_val, probs[np.arange(len(y_val)), y_val])
        blocks["label_issues"] = confident_joint_issues(y_val, probs, thresholds)

    blocks["train_labels"] = np.bincount(y_train, minlength=k).astype(np.float64)
    if health is not None:
        # Train-split losses and gradient statistics were read off this round's training pass (client/train.py):
        # no second pass over the train split.
        blocks["train_loss_sum"][0] = health.train_loss_sum
        if health.train_loss_hist:
            blocks["train_loss_hist"] = np.asarray(health.train_loss_hist, dtype=np.float64)
        if health.grad_norm_hist:
            blocks["grad_norm_hist"] = np.asarray(health.grad_norm_hist, dtype=np.float64)
        blocks["clipped_sum_norm"][0] = health.clipped_sum_norm
        if health.train_confusion:
            blocks["train_confusion"] = np.asarray(health.train_confusion, dtype=np.float64)
        emb = np.asarray(health.train_embedding, dtype=np.float64)
        if emb.shape == blocks[dg.EMBEDDING].shape:
            blocks[dg.EMBEDDING] = emb
    return Summary(blocks, k, health_round if health is not None else 0, 0.0, dg.SENSITIVITY,
                   time.perf_counter() - t0)


def cross_site_counts(model: nn.Module, local_models: dict[str, dict[str, np.ndarray]], val: Split) -> np.ndarray:
    """How many of the site's validation examples each local model gets right (FLARE's cross-site evaluation).
    Leaves the last local model loaded: the caller reloads the global weights before using the model again."""
    from common.model import load_trainable_state

    labels = val.labels.numpy()
    counts = []
    for arrays in local_models.values():
        load_trainable_state(model, arrays)
        probs, _ = predict(model, val)
        counts.append(float((probs.argmax(axis=1) == labels).sum()) if len(labels) else 0.0)
    return np.asarray(counts, dtype=np.float64)


def with_cross_site(summary: Summary, names: tuple[str, ...], counts: np.ndarray, seconds: float) -> Summary:
    """The summary with the cross-site counts added (its Δ grows to include their block)."""
    return replace(summary, cross=counts, cross_models=tuple(names), sensitivity=dg.sensitivity(len(names)),
                   seconds=summary.seconds + seconds)


def exact_summary(model: nn.Module, train: Split, val: Split, *, num_classes: int, loss_clip: float,
                  thresholds: list[float], health: TrainHealth | None, health_round: int,
                  global_arrays: dict[str, np.ndarray], local_models: dict[str, dict[str, np.ndarray]]) -> Summary:
    """`local_summary` of the model holding `global_arrays`, with the cross-site counts of `local_models` when an
    instruction carries them (server.cross-site-eval); the model holds the global weights again afterwards."""
    from common.model import load_trainable_state

    exact = local_summary(model, train, val, num_classes=num_classes, loss_clip=loss_clip, thresholds=thresholds,
                          health=health, health_round=health_round)
    if local_models:
        t_cross = time.perf_counter()
        counts = cross_site_counts(model, local_models, val)
        load_trainable_state(model, global_arrays)  # the cached model must hold the global weights again
        exact = with_cross_site(exact, tuple(local_models), counts, time.perf_counter() - t_cross)
    return exact


def release(summary: Summary, *, noise_multiplier: float, rng: Randomness | None = None) -> Summary:
    """The Gaussian mechanism on all blocks at once (std σ·Δ / w_b per cell), noise from a fresh OS-keyed
    generator (client/noise.py): release noise must never be reproducible from anything the server knows."""
    rng = rng or SiteRandom()
    std = dg.noise_std(noise_multiplier, len(summary.cross_models))
    noised = {}
    for name, exact in summary.blocks.items():
        noised[name] = exact + rng.normal(exact.shape, std[name])
    cross = None
    if summary.cross is not None:
        cross = summary.cross + rng.normal(summary.cross.shape, std[dg.CROSS])
    return replace(summary, blocks=noised, noise_multiplier=noise_multiplier, cross=cross)


def weighted_vector(summary: Summary) -> np.ndarray:
    """The vector the mechanism noises isotropically (block b scaled by w_b): its L2 change between neighbouring
    data sets is at most summary.sensitivity (tests check this on real models)."""
    weight = {b.name: b.weight for b in dg.BLOCKS}
    parts = [summary.blocks[name].ravel() * weight[name] for name in sorted(summary.blocks)]
    if summary.cross is not None:
        parts.append(summary.cross * dg.cross_weight(len(summary.cross_models)))
    return np.concatenate(parts)
