"""The error summary: exact blocks stay at the site, one example moves them by at most Δ, the release is Gaussian
with std σ·Δ / w per block, and what is derived from it is pinned on hand-built numbers."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from client.noise import SiteRandom
from client.privacy import dpsgd_schedule
from client.summary import (
    Summary,
    confident_joint_issues,
    cross_site_counts,
    local_summary,
    release,
    weighted_vector,
    with_cross_site,
)
from client.train import TrainHealth, train_local
from common import diagnostics as dg
from common.model import Encoded, build_model

THRESHOLDS = np.array([0.4, 0.4, 0.4])


@pytest.fixture(scope="module")
def model(tiny_cfg):
    return build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0)


def _without(data: Encoded, i: int) -> Encoded:
    keep = torch.arange(len(data)) != i
    return Encoded(data.input_ids[keep], data.attention_mask[keep], data.labels[keep])


def test_local_summary_covers_both_splits(tiny_cfg, model, site_data):
    # The train-split losses and gradient norms come from the round's training pass, not a second forward pass.
    full = replace(tiny_cfg.train, batch_size=4096)  # q = 1: gradient statistics are measured
    result = train_local(model, site_data.train, train_cfg=full, dp_cfg=tiny_cfg.dp, noise_multiplier=1.0,
                         prior=None, seed=0, schedule=dpsgd_schedule(n_public=len(site_data.train), batch_size=4096,
                                                                     local_epochs=1))
    s = local_summary(model, site_data.train, site_data.val, num_classes=3, loss_clip=3.0, thresholds=THRESHOLDS,
                      health=result.health, health_round=1)
    b = s.blocks
    n_val, n_train = len(site_data.val), len(site_data.train)
    val_counts = np.bincount(site_data.val.labels.numpy(), minlength=3)
    assert b["confusion"].sum() == n_val and b["confusion"].sum(axis=1).tolist() == val_counts.tolist()
    assert b["calibration"].sum() == n_val and b["val_loss_hist"].sum() == n_val
    assert b["train_loss_hist"].sum() == n_train  # every train example's loss, once (Poisson-skipped ones after)
    assert 0.5 * n_train / 3 < b["train_loss_sum"][0] < n_train  # ≈ ln 3 / L per example for a fresh model
    assert b["grad_norm_hist"].sum() > 0 and s.health_round == 1
    without = local_summary(model, site_data.train, site_data.val, num_classes=3, loss_clip=3.0,
                            thresholds=THRESHOLDS)
    assert without.health_round == 0 and without.blocks["train_loss_hist"].sum() == 0  # did not train: nothing
    assert b["train_labels"].tolist() == np.bincount(site_data.train.labels.numpy(), minlength=3).tolist()
    assert b["train_confusion"].sum(axis=1).tolist() == b["train_labels"].tolist()
    assert without.blocks["train_confusion"].sum() == 0
    assert (b["self_confidence"] <= val_counts + 1e-9).all() and b["self_confidence"].sum() > 0
    assert np.trace(b["label_issues"]) == 0 and b["label_issues"].sum() <= n_val - np.trace(b["confusion"])
    # Calibration row 1 counts the wrong predictions: the confusion matrix's off-diagonal.
    assert b["calibration"][1].sum() == n_val - np.trace(b["confusion"])
    assert 0 < b["val_loss_sum"][0] <= n_val and 0 < b["train_loss_sum"][0] <= n_train
    assert s.noise_multiplier == 0 and s.sensitivity == dg.SENSITIVITY == pytest.approx(2.0)


def test_one_example_moves_the_summary_by_at_most_the_sensitivity(model, site_data):
    health = TrainHealth([3.0, 2.0, 1.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0], 1.7, 20.0, [5.0] * 10,
                         [[4.0, 1.0, 0.0], [2.0, 3.0, 1.0], [0.0, 0.0, 5.0]])

    def vec(train, val):
        return weighted_vector(local_summary(model, train, val, num_classes=3, loss_clip=3.0,
                                             thresholds=THRESHOLDS, health=health, health_round=1))

    full = vec(site_data.train, site_data.val)
    val_moves = [np.linalg.norm(full - vec(site_data.train, _without(site_data.val, i))) for i in range(8)]
    train_moves = [np.linalg.norm(full - vec(_without(site_data.train, i), site_data.val)) for i in range(8)]
    assert max(val_moves + train_moves) <= dg.SENSITIVITY + 1e-9
    assert min(val_moves) > 1.0  # each removal really moves several blocks (not a vacuous bound)
    # With the training pass's statistics held fixed, a train example moves its label count; its own loss and
    # gradient norm are one entry each in those blocks (test_train checks one loss per example).
    assert min(train_moves) == pytest.approx(1.0)


def test_cross_site_counts_keep_one_example_within_the_larger_sensitivity(tiny_cfg, model, site_data):
    from common.model import load_trainable_state, trainable_state

    others = {}
    for i, name in enumerate(("site-a", "site-b", "site-c")):  # three differently initialised "local models"
        other = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=10 + i)
        others[name] = trainable_state(other)
    mine = trainable_state(model)

    def vec(val):
        base = local_summary(model, site_data.train, val, num_classes=3, loss_clip=3.0, thresholds=THRESHOLDS)
        counts = cross_site_counts(model, others, val)
        load_trainable_state(model, mine)
        return weighted_vector(with_cross_site(base, tuple(others), counts, 0.0)), counts

    full, counts = vec(site_data.val)
    assert counts.shape == (3,) and ((0 <= counts) & (counts <= len(site_data.val))).all()
    # Each local model really is scored (the frozen base is shared, as at real sites): the counts match a direct
    # evaluation of one of them.
    from common.model import predict

    load_trainable_state(model, others["site-b"])
    probs, _ = predict(model, site_data.val)
    load_trainable_state(model, mine)
    assert counts[1] == (probs.argmax(axis=1) == site_data.val.labels.numpy()).sum()
    moves = [np.linalg.norm(full - vec(_without(site_data.val, i))[0]) for i in range(8)]
    assert dg.sensitivity(3) == 2.0 and max(moves) <= 2.0 + 1e-9
    # An example a local model got right moves that model's count: more than the validation blocks alone can (√3).
    assert max(moves) > math.sqrt(3)


def test_cross_site_counts_are_noised_with_their_own_weight():
    rng = SiteRandom()
    exact = with_cross_site(_exact(), ("a", "b", "c", "d"), np.full(4, 20.0), 0.0)
    assert exact.sensitivity == 2.0
    draws = [release(exact, noise_multiplier=2.0, rng=rng) for _ in range(3000)]
    cross = np.stack([d.cross for d in draws])
    # std σ·Δ / w with Δ = 2 and w = 1/√4: 2 · 2 · 2 = 8; the other blocks' std grows with Δ too (2·2/1).
    assert cross.std() == pytest.approx(8.0, rel=0.03) and abs(cross.mean() - 20) < 0.5
    assert np.stack([d.blocks["confusion"] for d in draws]).std() == pytest.approx(4.0, rel=0.03)
    assert draws[0].cross_models == ("a", "b", "c", "d")


def _exact(k=3, fill=50.0):
    blocks = {name: np.full(shape, fill) for name, shape in ((b.name, b.shape(k)) for b in dg.BLOCKS)}
    return Summary(blocks, k, 1, 0.0, dg.SENSITIVITY)


def test_release_noise_per_block_is_sigma_delta_over_weight_and_unbiased():
    rng = SiteRandom()
    draws = [release(_exact(), noise_multiplier=2.0, rng=rng).blocks for _ in range(3000)]
    conf = np.stack([d["confusion"] for d in draws])
    cal = np.stack([d["calibration"] for d in draws])
    assert conf.std() == pytest.approx(2.0 * 2.0, rel=0.03)  # weight 1
    assert cal.std() == pytest.approx(2.0 * 2.0 / 0.5, rel=0.03)  # weight 0.5
    assert abs(conf.mean() - 50) < 0.2
    # Near zero the cells go negative and stay so: the sum of many cells must stay unbiased.
    zeros = np.stack([release(_exact(fill=0.0), noise_multiplier=2.0, rng=rng).blocks["label_issues"]
                      for _ in range(3000)])
    # (The mean of 3000 sums of 9 cells of std σ·Δ / 0.5: its own std is 24 / √3000 = 0.44; 4 of them.)
    assert (zeros < 0).any() and abs(zeros.sum(axis=(1, 2)).mean()) < 4 * 3 * 2.0 * dg.SENSITIVITY / 0.5 / math.sqrt(3000)


def test_noise_off_reproduces_the_exact_summary_and_two_releases_differ(model, site_data):
    exact = local_summary(model, site_data.train, site_data.val, num_classes=3, loss_clip=3.0, thresholds=THRESHOLDS)
    off = release(exact, noise_multiplier=0.0)
    assert all(np.array_equal(off.blocks[k], exact.blocks[k]) for k in exact.blocks)
    a, b = release(exact, noise_multiplier=1.0), release(exact, noise_multiplier=1.0)  # OS-entropy seeds
    assert not np.array_equal(a.blocks["confusion"], b.blocks["confusion"])


def test_confident_joint_counts_examples_confidently_labelled_otherwise():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.9, 0.05, 0.05],   # agrees
                      [0.1, 0.8, 0.1],     # given 0, confidently 1: an issue
                      [0.3, 0.45, 0.25],   # given 1, nothing above its threshold: not counted
                      [0.1, 0.1, 0.8],     # given 1, confidently 2: an issue
                      [0.2, 0.2, 0.6],     # agrees
                      [0.7, 0.2, 0.1]])    # given 2, confidently 0: an issue
    issues = confident_joint_issues(labels, probs, np.array([0.5, 0.5, 0.5]))
    expected = np.zeros((3, 3))
    expected[0, 1] = expected[1, 2] = expected[2, 0] = 1
    np.testing.assert_array_equal(issues, expected)
    # Thresholds are per class: raising class 1's threshold above 0.8 drops the first issue.
    assert confident_joint_issues(labels, probs, np.array([0.5, 0.85, 0.5]))[0, 1] == 0
