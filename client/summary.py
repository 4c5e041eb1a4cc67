"""Step 3 at a site: evaluate the global model on local data, and release the counts only with Gaussian noise.

What leaves a site after an evaluation is one vector, noised once:
  [confusion matrix of the validation split (K×K counts), Σ clipped validation loss / L, Σ clipped train loss / L]
Adding or removing one example changes one confusion cell by 1 and one loss sum by at most 1 (losses are clipped to
[0, L] and divided by L), so the vector's L2 sensitivity is Δ = √2; the noise std is σ·Δ. The site's ledger records
the release as the Gaussian entry (σ, q=1, steps=1). Everything derived from the noised vector (accuracy, macro-F1,
losses) is post-processing and costs nothing more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from client.data import Encoded, eval_loader
from client.train import model_inputs
from common.metrics import confusion_matrix

SENSITIVITY = math.sqrt(2.0)


@dataclass(frozen=True)
class LocalCounts:
    """Exact counts at the site. These never leave it; only `release()` of them does."""

    confusion: np.ndarray  # [K, K] int, rows = true label, columns = prediction (validation split)
    val_loss_sum: float  # Σ min(loss, L) over the validation split
    train_loss_sum: float  # Σ min(loss, L) over the train split
    n_val: int
    n_train: int


@dataclass(frozen=True)
class ReleasedSummary:
    """The noised summary a site sends: counts clamped at 0 (post-processing), sums rescaled by L."""

    confusion: np.ndarray  # [K, K] float
    val_loss_sum: float
    train_loss_sum: float
    noise_multiplier: float
    sensitivity: float


@torch.no_grad()
def loss_and_predictions(model: nn.Module, data: Encoded, *, loss_clip: float,
                         batch_size: int = 64) -> tuple[np.ndarray, float]:
    """Predicted classes [N] and the sum of per-example cross-entropy clipped at `loss_clip`."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds, loss_sum = [], 0.0
    for input_ids, attention_mask, labels in eval_loader(data, batch_size):
        logits = model(**model_inputs(input_ids.to(dev), attention_mask.to(dev))).logits  # [B, K]
        losses = nn.functional.cross_entropy(logits, labels.to(dev), reduction="none").clamp(max=loss_clip)
        loss_sum += float(losses.sum())
        preds.append(logits.argmax(dim=-1).cpu().numpy())
    model.train(was_training)
    return (np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)), loss_sum


def local_counts(model: nn.Module, train: Encoded, val: Encoded, *, num_classes: int, loss_clip: float) -> LocalCounts:
    val_pred, val_loss = loss_and_predictions(model, val, loss_clip=loss_clip)
    _, train_loss = loss_and_predictions(model, train, loss_clip=loss_clip)
    confusion = confusion_matrix(val.labels.numpy(), val_pred, num_classes)
    return LocalCounts(confusion, val_loss, train_loss, len(val), len(train))


def release(counts: LocalCounts, *, noise_multiplier: float, loss_clip: float,
            rng: np.random.Generator | None = None) -> ReleasedSummary:
    """The Gaussian mechanism on the summary vector (std = noise_multiplier · √2), then free post-processing."""
    rng = rng or np.random.default_rng()  # seeded from OS entropy: release noise must not be reproducible
    k = counts.confusion.shape[0]
    vector = np.concatenate([counts.confusion.ravel().astype(np.float64),
                             [counts.val_loss_sum / loss_clip, counts.train_loss_sum / loss_clip]])
    noised = vector + rng.normal(0.0, noise_multiplier * SENSITIVITY, size=vector.shape)
    noised = np.clip(noised, 0.0, None)  # counts and loss sums are never negative
    return ReleasedSummary(
        confusion=noised[: k * k].reshape(k, k),
        val_loss_sum=float(noised[k * k] * loss_clip),
        train_loss_sum=float(noised[k * k + 1] * loss_clip),
        noise_multiplier=noise_multiplier,
        sensitivity=SENSITIVITY,
    )
