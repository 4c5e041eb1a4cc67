"""The evaluation summary: exact counts stay at the site, the release is Gaussian with the stated sensitivity."""

import math

import numpy as np

from client.summary import SENSITIVITY, LocalCounts, local_counts, release
from common.metrics import accuracy, macro_f1, per_class_f1
from common.model import build_model


def test_local_counts_cover_the_validation_split(tiny_cfg, site_data):
    model = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0)
    counts = local_counts(model, site_data.train, site_data.val, num_classes=3, loss_clip=3.0)
    assert counts.confusion.sum() == len(site_data.val)
    assert counts.confusion.sum(axis=1).tolist() == np.bincount(site_data.val.labels.numpy(), minlength=3).tolist()
    assert 0 < counts.train_loss_sum <= 3.0 * len(site_data.train)


def test_release_noise_has_std_sigma_times_sqrt2_and_is_clamped():
    counts = LocalCounts(np.full((3, 3), 50), 30.0, 60.0, 450, 900)
    rng = np.random.default_rng(0)
    draws = np.stack([release(counts, noise_multiplier=3.0, loss_clip=3.0, rng=rng).confusion for _ in range(4000)])
    assert SENSITIVITY == math.sqrt(2)
    assert abs(draws.std() - 3.0 * math.sqrt(2)) < 0.1
    assert abs(draws.mean() - 50) < 0.2
    small = release(LocalCounts(np.zeros((3, 3), int), 0.0, 0.0, 0, 0), noise_multiplier=3.0, loss_clip=3.0, rng=rng)
    assert (small.confusion >= 0).all() and small.val_loss_sum >= 0


def test_metrics_from_a_hand_built_confusion_matrix():
    c = np.array([[5, 0, 5], [0, 0, 2], [0, 0, 8]])
    assert accuracy(c) == 13 / 20
    np.testing.assert_allclose(per_class_f1(c), [2 * 5 / 15, 0.0, 2 * 8 / 23])
    assert macro_f1(np.array([[0, 0, 10], [0, 0, 5], [0, 0, 20]])) == (2 * 20 / 55) / 3  # collapsed: ≈ 1/K of F1
