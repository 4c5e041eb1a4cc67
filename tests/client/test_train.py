"""The local loop: DP steps really change the travelling weights, full fine-tuning works under Opacus, and the loss of
two tiny DP rounds is pinned."""

from dataclasses import replace

import numpy as np
import pytest

from client.privacy import dpsgd_schedule
from client.train import prior_from_counts, train_local
from common.model import build_model, load_trainable_state, trainable_state


def _train(cfg, data, **dp):
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    before = trainable_state(model)
    schedule = dpsgd_schedule(n_public=len(data.train), batch_size=cfg.train.batch_size,
                              local_epochs=cfg.train.local_epochs)
    result = train_local(model, data.train, train_cfg=cfg.train, dp_cfg=replace(cfg.dp, **dp), noise_multiplier=1.0,
                         prior=prior_from_counts(data.label_counts()), seed=0, schedule=schedule)
    return before, trainable_state(model), result


def test_a_dp_round_changes_every_lora_weight_and_counts_its_steps(tiny_cfg, site_data):
    before, after, result = _train(tiny_cfg, site_data)
    changed = [k for k in before if np.abs(after[k] - before[k]).max() > 0]
    assert changed == list(before)  # guards opacus#820: LoRA weights that never move
    batches = -(-len(site_data.train) // tiny_cfg.train.batch_size)
    assert result.steps == batches * tiny_cfg.train.local_epochs
    assert result.sample_rate == pytest.approx(1 / batches)
    assert result.noise_multiplier == 1.0


def test_full_fine_tuning_works_with_opacus(tiny_cfg, site_data):
    # Without position ids expanded to [B, L], Opacus fails at the step: "stack expects each tensor to be equal size"
    cfg = replace(tiny_cfg, model=replace(tiny_cfg.model, mode="full"))
    before, after, result = _train(cfg, site_data)
    assert len(before) > 20 and result.steps > 0
    assert np.abs(after["bert.embeddings.position_embeddings.weight"]
                  - before["bert.embeddings.position_embeddings.weight"]).max() > 0


def test_non_dp_mode_runs_the_same_loop_without_noise(tiny_cfg, site_data):
    before, after, result = _train(tiny_cfg, site_data, enabled=False)
    assert result.noise_multiplier == 0.0 and result.sample_rate == 0.0
    assert any(np.abs(after[k] - before[k]).max() > 0 for k in before)


def test_weights_round_trip_and_mismatches_are_named(tiny_cfg):
    model = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0)
    state = trainable_state(model)
    shifted = {k: v + 1.0 for k, v in state.items()}
    load_trainable_state(model, shifted)
    assert all(np.allclose(trainable_state(model)[k], shifted[k]) for k in state)
    key = next(iter(state))
    with pytest.raises(ValueError, match=f"received weight {key} has shape"):
        load_trainable_state(model, {**shifted, key: np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(model, {})


def test_the_tiny_model_is_identical_in_every_process(tiny_cfg):
    # Frozen random weights never travel: server and sites must build the very same ones from the seed.
    a = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0).state_dict()
    b = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0).state_dict()
    assert all((a[k] == b[k]).all() for k in a if "lora" not in k)


def test_balanced_losses_pin_numbers():
    import torch

    from client.train import balanced_loss

    logits = torch.zeros(2, 3)
    labels = torch.tensor([0, 2])
    prior = prior_from_counts([1.0, 1.0, 2.0])  # smoothed: (2/7, 2/7, 3/7)
    assert prior.tolist() == pytest.approx([2 / 7, 2 / 7, 3 / 7])
    assert prior_from_counts([-3.0, 0.0, 1.0]).tolist() == pytest.approx([1 / 4, 1 / 4, 2 / 4])  # noised counts
    # logit-adjust: CE(0 + log prior) = -log prior[y]
    expected = (-np.log(2 / 7) - np.log(3 / 7)) / 2
    assert balanced_loss(logits, labels, mode="logit-adjust", prior=prior).item() == pytest.approx(expected)
    # weights: w = 1 / (K prior_y) = (7/6, 7/6, 7/9) on CE = ln 3, averaged over the batch
    assert balanced_loss(logits, labels, mode="weights", prior=prior).item() == pytest.approx(
        np.log(3) * (7 / 6 + 7 / 9) / 2)
    assert balanced_loss(logits, labels, mode="none", prior=prior).item() == pytest.approx(np.log(3))


def test_dp_health_reads_the_per_sample_norms_opacus_clips(tiny_cfg, site_data):
    # Full batch (q = 1): every step sees every example. With a huge clip nothing is clipped; with a tiny one
    # everything is, and the clipped sum is then at most n · C, i.e. the number of examples in units of C.
    full = replace(tiny_cfg, train=replace(tiny_cfg.train, batch_size=4096))
    _, _, loose = _train(full, site_data, max_grad_norm=1e6)
    _, _, tight = _train(full, site_data, max_grad_norm=1e-6)
    n = len(site_data.train)
    for r in (loose, tight):
        assert r.sample_rate == 1.0 and r.health is not None and sum(r.health.grad_norm_hist) == pytest.approx(n)
    assert sum(loose.health.grad_norm_hist[4:]) == 0  # no norm reaches 1e6
    assert sum(tight.health.grad_norm_hist[:4]) == 0  # every norm exceeds 1e-6 · C-units
    assert 0 < tight.health.clipped_sum_norm <= n + 1e-6
    _, _, plain = _train(tiny_cfg, site_data, enabled=False)
    assert plain.health.grad_norm_hist == []  # no per-sample gradients without DP
    assert sum(plain.health.train_loss_hist) == n  # losses are read off any training pass
    assert sum(tight.health.train_loss_hist) == n
    # The train confusion at the received model: every example once, in the row of its given label.
    labels = np.bincount(site_data.train.labels.numpy(), minlength=3)
    for r in (loose, tight, plain):
        assert np.asarray(r.health.train_confusion).sum(axis=1).tolist() == labels.tolist()
        # Its embedding block: one unit vector per example, in the row of the class the received model predicted.
        emb = np.asarray(r.health.train_embedding)
        assert emb.shape == (3, 32) and np.allclose(np.linalg.norm(emb, axis=1) <= np.asarray(
            r.health.train_confusion).sum(axis=0) + 1e-6, True)


def test_at_q_below_one_the_training_blocks_do_not_depend_on_the_poisson_mask(tiny_cfg, site_data):
    # Which examples a Poisson batch drew is secret and never released: at q < 1 the losses are taken at the
    # received model (the same in every draw) and gradient statistics are not measured.
    runs = [_train(tiny_cfg, site_data)[2] for _ in range(2)]
    assert runs[0].sample_rate < 1
    assert [r.health.grad_norm_hist for r in runs] == [[], []]
    assert runs[0].health.train_loss_hist == runs[1].health.train_loss_hist
    assert runs[0].health.train_confusion == runs[1].health.train_confusion
    assert np.allclose(runs[0].health.train_embedding, runs[1].health.train_embedding, atol=1e-9)
    assert runs[0].health.train_loss_sum == pytest.approx(runs[1].health.train_loss_sum, rel=1e-6)
    assert sum(runs[0].health.train_loss_hist) == len(site_data.train)


def _clipped_per_sample(model, batch, labels, prior, c=1.0):
    """Each example's clipped gradient (Opacus's per-sample gradients, flattened), as DP-SGD sums them."""
    import torch
    from opacus import GradSampleModule

    from client.train import balanced_loss
    from common.model import model_inputs

    gsm = GradSampleModule(model)
    torch.manual_seed(0)  # the same dropout masks in every call
    logits = gsm(**model_inputs(batch.input_ids, batch.attention_mask)).logits
    balanced_loss(logits, labels, mode="logit-adjust", prior=prior).backward()
    grads = torch.cat([p.grad_sample.reshape(len(labels), -1) for p in gsm.parameters() if p.requires_grad], dim=1)
    for p in gsm.parameters():
        p.grad, p.grad_sample = None, None
    gsm.to_standard_module()
    norms = grads.norm(dim=1, keepdim=True)
    return grads * (c / (norms + 1e-6)).clamp(max=1.0)


def test_one_example_moves_no_other_examples_clipped_gradient(tiny_cfg, site_data):
    # The sensitivity of DP-SGD's clipped sum is C only if each example's gradient depends on that example alone.
    # With a public prior (released counts, the server's data, config) it does: changing one example's label
    # leaves every other clipped gradient as it was. With the site's exact label counts in the loss (the old
    # logit adjustment) every other example moves, because the prior moved.
    import torch

    from common.model import Encoded

    model = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0)
    model.train()
    n = 24
    batch = Encoded(site_data.train.input_ids[:n], site_data.train.attention_mask[:n], site_data.train.labels[:n])
    flipped = batch.labels.clone()
    rare = int(torch.bincount(batch.labels, minlength=3).argmin())
    i = int(torch.nonzero(batch.labels != rare)[0])
    flipped[i] = rare  # one example becomes the rarest class
    public = prior_from_counts([30.0, 15.0, 80.0])  # e.g. the pooled noised census
    a = _clipped_per_sample(model, batch, batch.labels, public)
    b = _clipped_per_sample(model, batch, flipped, public)
    others = torch.arange(n) != i
    assert (a[others] - b[others]).norm() < 1e-5 * a[others].norm()
    assert (a[i] - b[i]).norm() > 0.1  # the changed example itself does move
    # Its text instead of its label (its tokens rolled by one, the same mask): the same holds.
    ids = batch.input_ids.clone()
    ids[i] = torch.where(batch.attention_mask[i].bool(), torch.roll(batch.input_ids[i], 1), batch.input_ids[i])
    c = _clipped_per_sample(model, Encoded(ids, batch.attention_mask, batch.labels), batch.labels, public)
    assert (a[others] - c[others]).norm() < 1e-5 * a[others].norm()
    assert (a[i] - c[i]).norm() > 1e-3
    # The exact counts inside the loss: every other example's clipped gradient moves with them.
    own = _clipped_per_sample(model, batch, batch.labels, prior_from_counts(torch.bincount(batch.labels, minlength=3)))
    own_flipped = _clipped_per_sample(model, batch, flipped, prior_from_counts(torch.bincount(flipped, minlength=3)))
    assert (own[others] - own_flipped[others]).norm() > 1e-2


class _SeededRandomness:
    """A reproducible client/noise.Randomness, for pinning numbers only: Poisson masks and DP noise from one seeded
    generator. A site never does this (its noise would be reproducible from public numbers: fedlens/audit.py)."""

    def __init__(self, seed):
        self.gen = np.random.default_rng(seed)

    def uniform(self, n):
        return self.gen.random(n)

    def normal(self, shape, std):
        return self.gen.normal(0.0, std, size=shape)


def test_the_loss_of_two_tiny_dp_rounds_is_pinned(tiny_cfg, site_data, monkeypatch):
    # Prepare: every draw seeded. Under DP train_local seeds dropout from os.urandom (a secret seed); here that is a
    # fixed one, and masks and noise come from _SeededRandomness. On CPU: the pinned numbers are CPU float32.
    import types

    import torch

    import client.train

    monkeypatch.setattr(client.train, "os", types.SimpleNamespace(urandom=lambda n: bytes(range(1, n + 1))))
    schedule = dpsgd_schedule(n_public=len(site_data.train), batch_size=tiny_cfg.train.batch_size,
                              local_epochs=tiny_cfg.train.local_epochs)
    prior = prior_from_counts([30.0, 15.0, 80.0])  # public, e.g. the pooled noised census
    weights = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0).cpu())
    losses = []
    # Execute: round 1 from the initial weights, round 2 from the weights round 1 sent (as a site receives them).
    for rnd in (1, 2):
        model = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0).cpu()
        load_trainable_state(model, weights)
        result = train_local(model, site_data.train, train_cfg=tiny_cfg.train, dp_cfg=tiny_cfg.dp,
                             noise_multiplier=1.0, prior=prior, seed=tiny_cfg.train.seed + rnd, schedule=schedule,
                             rng=_SeededRandomness(rnd))
        assert result.steps == schedule.steps and result.noise_multiplier == 1.0
        weights = trainable_state(model)
        losses.append(result.mean_loss)
    # Assert: pinned (229 examples, q = 0.125, 8 steps a round). σ or train.head-lr 1 % off move round 1 by ~1.6e-4
    # and round 2 by ~2e-3 (relative), train.lr doubled round 1 by 7e-5 (the tiny model's adapters barely matter
    # in 16 steps): all outside rtol, while CPU float32 differences stay well inside it.
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor([1.144727, 1.207529], dtype=torch.float64), rtol=2e-5, atol=0.0)


def test_head_mode_trains_the_head_alone_on_features_with_full_batch_dp_steps(site_data):
    from common.config import AppConfig
    from common.model import build_model, features
    from tests.conftest import TINY

    cfg = AppConfig.from_run_config({**TINY, "model.mode": "head", "train.batch-size": 8192, "train.local-epochs": 5,
                                     "train.optimizer": "sgd", "train.head-lr": 3.0})
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    train = features(model, site_data.train)
    schedule = dpsgd_schedule(n_public=len(train), batch_size=cfg.train.batch_size, local_epochs=5)
    assert (schedule.sample_rate, schedule.steps) == (1.0, 5)  # full batch: one DP step per epoch
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sent = []
    for _ in range(2):
        model.load_state_dict(before)
        r = train_local(model, train, train_cfg=cfg.train, dp_cfg=cfg.dp, noise_multiplier=1.0,
                        prior=prior_from_counts([1, 1, 1]), seed=0, schedule=schedule)
        assert r.steps == 5 and r.sample_rate == 1.0
        sent.append(trainable_state(model))
        moved = {k for k, v in model.state_dict().items() if not (v == before[k]).all()}
        assert moved == {"classifier.weight", "classifier.bias"}  # the encoder stays frozen
    assert set(sent[0]) == {"classifier.weight", "classifier.bias"}
    # Same config, seed, round and data: different noise (it never comes from the public seed).
    assert np.abs(sent[0]["classifier.weight"] - sent[1]["classifier.weight"]).max() > 1e-4
    # The training pass measured its health on the features too (q = 1).
    assert r.health.grad_norm_hist and sum(r.health.grad_norm_hist) == pytest.approx(len(train))


def test_ffa_lora_keeps_a_at_its_initialisation_and_sends_b_and_the_head(tiny_cfg, site_data):
    cfg = replace(tiny_cfg, model=replace(tiny_cfg.model, lora_freeze_a=True))
    before, after, result = _train(cfg, site_data)
    assert before and not any("lora_A" in k for k in before)  # A neither trains nor travels
    assert any("lora_B" in k for k in before) and any("classifier" in k for k in before)
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before) and result.steps > 0
    # Every site builds the same A from the public seed: what B multiplies is the same everywhere.
    a1, a2 = (dict(build_model(cfg.model, cfg.data.labels, seed=0).named_parameters()) for _ in range(2))
    names = [n for n in a1 if "lora_A" in n]
    assert names and all((a1[n] == a2[n]).all() for n in names)


def test_lp_ft_probes_the_head_on_features_with_the_adapters_untouched_then_adapts_them(site_data):
    import torch

    from common.config import AppConfig
    from common.model import build_model, features
    from tests.conftest import TINY

    cfg = AppConfig.from_run_config({**TINY, "model.mode": "head-then-lora", "model.probe-rounds": 1,
                                     "train.batch-size": 8192, "train.local-epochs": 3, "train.optimizer": "sgd",
                                     "train.head-lr": 3.0, "train.adapt-batch-size": 64})
    assert cfg.on_features(1) and not cfg.on_features(2) and cfg.train_at(2).local_epochs == cfg.train.adapt_epochs
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    start = trainable_state(model)
    assert any("lora_B" in k for k in start) and all(not v.any() for k, v in start.items() if "lora_B" in k)
    probe = features(model, site_data.train)  # B = 0: the adapted encoder is the pre-trained one
    for r in (1, 2):
        train_cfg = cfg.train_at(r)
        data = probe if cfg.on_features(r) else site_data.train
        schedule = dpsgd_schedule(n_public=len(data), batch_size=train_cfg.batch_size,
                                  local_epochs=train_cfg.local_epochs)
        before = trainable_state(model)
        train_local(model, data, train_cfg=train_cfg, dp_cfg=cfg.dp, noise_multiplier=1.0,
                    prior=prior_from_counts([1, 1, 1]), seed=r, schedule=schedule)
        after = trainable_state(model)
        moved = {k for k in before if np.abs(after[k] - before[k]).max() > 0}
        if r == 1:  # the probe: the head alone, on features; A and B exactly as received
            assert moved and all("classifier" in k for k in moved)
            assert features(model, site_data.train.first(8)).x.allclose(probe.x[:8], atol=1e-6)
        else:  # adaptation: the adapters join
            assert any("lora_B" in k for k in moved) and schedule.sample_rate < 1.0
    assert torch.is_tensor(probe.x)


def test_one_example_moves_one_cell_of_each_training_pass_block(tiny_cfg, site_data):
    # The training-pass blocks are read at the received model before any step, in eval mode: with or without one
    # example, every other example's loss and prediction are the same, whatever the dropout or the Poisson mask.
    import torch

    from common.model import Encoded

    full = replace(tiny_cfg.train, batch_size=4096)
    received = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0))

    def health(data):
        model = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0)
        load_trainable_state(model, received)
        return train_local(model, data, train_cfg=full, dp_cfg=tiny_cfg.dp, noise_multiplier=1.0, prior=None,
                           seed=0, schedule=dpsgd_schedule(n_public=len(data), batch_size=4096,
                                                           local_epochs=1)).health

    def summary(data, h):
        # The whole weighted release vector of the received model with this training pass's blocks.
        from client.summary import local_summary, weighted_vector

        model = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0)
        load_trainable_state(model, received)
        return weighted_vector(local_summary(model, data, site_data.val, num_classes=3, loss_clip=3.0,
                                             thresholds=np.full(3, 0.5), health=h, health_round=1))

    data = site_data.train
    base = health(data)
    whole = summary(data, base)
    for gone in (0, 7, len(data) - 1):
        keep = torch.arange(len(data)) != gone
        h = health(Encoded(data.input_ids[keep], data.attention_mask[keep], data.labels[keep]))
        assert np.abs(np.asarray(base.train_confusion) - np.asarray(h.train_confusion)).sum() == 1
        assert np.abs(np.asarray(base.train_loss_hist) - np.asarray(h.train_loss_hist)).sum() == 1
        # The embedding block loses exactly one unit vector, in one row (the class predicted for the example).
        moved = np.asarray(base.train_embedding) - np.asarray(h.train_embedding)
        assert np.linalg.norm(moved) == pytest.approx(1.0, abs=1e-5)
        assert (np.linalg.norm(moved, axis=1) > 1e-6).sum() == 1
        # The whole train side of the release, gradient blocks included, moves within Δ = 2.
        from common.diagnostics import SENSITIVITY

        kept = Encoded(data.input_ids[keep], data.attention_mask[keep], data.labels[keep])
        step = np.linalg.norm(whole - summary(kept, h))
        assert SENSITIVITY == 2.0 and 1.0 < step <= SENSITIVITY + 1e-6
        assert 0 < base.train_loss_sum - h.train_loss_sum <= 1 + 1e-6
