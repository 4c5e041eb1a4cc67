"""Step 1 at a site, its one public fact: the census, a noised count of its examples per train label and of its
validation examples, released once per dataset and reused by every run after.

The neighbour relation is add/remove one example (README "Privacy"). Under it a site's exact size is private: one
example more changes n. So nothing that leaves a site is a function of its exact size. FedAvg weights, the DP-SGD
sampling rate, the number of steps and the denominator of the noised mean follow the *released* sizes. The summaries'
histograms are projected onto them too. All of that is post-processing of the census. The census also gives the
class prior of the loss (client/train.balanced_loss): pooled over sites by the server, it replaces the exact label
counts that used to sit inside every example's gradient.

Sensitivity 1: an example sits in one split (keyed hash of its text), so it moves one train-label count or the
validation count by 1. The release is one Gaussian, (σ, q = 1, one step, Δ = 1) in the site's lifetime ledger. It
is kept in the site's lifetime state (client/state.py) with the fingerprint of the data it counted. A later run, a
replay or a resume on the same data gets the same numbers at no new cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from client.noise import Randomness, SiteRandom

SENSITIVITY = 1.0


@dataclass(frozen=True)
class Census:
    train_labels: tuple[float, ...]  # examples per label in the train split, noised (cells may be negative)
    n_val: float  # validation examples, noised
    noise_multiplier: float  # std / Δ of every value; 0 = exact (a run without DP, which releases exact sizes)

    @property
    def n_train(self) -> float:
        return float(sum(self.train_labels))  # a sum of unbiased cells: unbiased, std σ·√K

    def sizes(self) -> tuple[int, int]:
        """(train, validation) sizes as every message reports them: the noised counts, rounded, at least 1."""
        return max(1, round(self.n_train)), max(1, round(self.n_val))

    def count_std(self) -> float:
        """Std of each released value."""
        return self.noise_multiplier * SENSITIVITY

    def to_dict(self) -> dict:
        return {"train-labels": list(self.train_labels), "n-val": self.n_val,
                "noise-multiplier": self.noise_multiplier}

    @classmethod
    def from_dict(cls, d: dict) -> Census:
        return cls(tuple(float(x) for x in d["train-labels"]), float(d["n-val"]), float(d["noise-multiplier"]))


def take(train_labels: np.ndarray, n_val: int, num_classes: int, *, noise_multiplier: float,
         rng: Randomness | None = None) -> Census:
    """The census of one site's data: exact when noise_multiplier is 0 (no DP), else one Gaussian release."""
    exact = np.append(np.bincount(np.asarray(train_labels), minlength=num_classes).astype(np.float64), float(n_val))
    if noise_multiplier > 0:
        exact = exact + (rng or SiteRandom()).normal(exact.shape, noise_multiplier * SENSITIVITY)
    return Census(tuple(float(x) for x in exact[:-1]), float(exact[-1]), float(noise_multiplier))
