"""DP randomness no one else can reproduce: the noise of two identical trainings differs, and an honest-but-curious
server that knows everything public cannot strip the noise off a site's update (it could with seeded noise)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from client.noise import PoissonSampler, SiteRandom
from client.privacy import dpsgd_schedule
from client.train import train_local
from common.model import Encoded, build_model, load_trainable_state, trainable_state


class SeededRandom:
    """What the code did before: noise from a generator seeded by public numbers (train.seed + round)."""

    def __init__(self, seed: int) -> None:
        self.gen = np.random.default_rng(seed)

    def uniform(self, n):
        return self.gen.random(n)

    def normal(self, shape, std):
        return self.gen.normal(0.0, std, size=shape)


def test_gaussians_and_uniforms_have_the_right_law():
    rng = SiteRandom()
    x = rng.normal((200_000,), 3.0)
    assert x.mean() == pytest.approx(0.0, abs=0.03) and x.std() == pytest.approx(3.0, rel=0.01)
    assert abs(float(np.mean(x ** 4)) / 81.0 - 3.0) < 0.1  # Gaussian kurtosis, not a sum of few uniforms
    u = rng.uniform(100_000)
    assert 0.0 < u.min() and u.max() < 1.0 and u.mean() == pytest.approx(0.5, abs=0.01)
    assert not np.array_equal(SiteRandom().normal((8,), 1.0), SiteRandom().normal((8,), 1.0))


def test_poisson_batches_include_each_example_at_rate_q_and_always_yield_every_step():
    sampler = PoissonSampler(num_samples=1000, sample_rate=0.1, steps=50, rng=SiteRandom())
    batches = list(sampler)
    assert len(batches) == 50 and np.mean([len(b) for b in batches]) == pytest.approx(100, rel=0.1)
    tiny = list(PoissonSampler(num_samples=3, sample_rate=0.01, steps=200, rng=SiteRandom()))
    assert len(tiny) == 200 and sum(1 for b in tiny if not b) > 150  # empty batches are steps too


def _sgd_step(cfg, data, *, sigma, rng=None, received=None):
    """One full-batch SGD step (q = 1, lr 1 on every weight): sent = received − (Σ clip g + noise) / n."""
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    for m in model.modules():  # dropout masks are secret under DP too: switched off to isolate the noise
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if received is not None:
        load_trainable_state(model, received)
    before = trainable_state(model)
    train_cfg = replace(cfg.train, optimizer="sgd", lr=1.0, head_lr=1.0, batch_size=10_000, local_epochs=1)
    schedule = dpsgd_schedule(n_public=len(data), batch_size=train_cfg.batch_size, local_epochs=1)
    result = train_local(model, data, train_cfg=train_cfg, dp_cfg=cfg.dp, noise_multiplier=sigma, prior=None, seed=0,
                         schedule=schedule, rng=rng)
    assert result.steps == 1 and result.sample_rate == 1.0
    after = trainable_state(model)
    return before, after, schedule.expected_batch


def _flat(a, b, scale):
    return np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() * scale for k in a])


def _random_texts(data: Encoded) -> Encoded:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, data.input_ids.shape, generator=gen)
    return Encoded(ids, torch.ones_like(data.attention_mask), torch.randint(0, 3, data.labels.shape, generator=gen))


@pytest.mark.parametrize("source", ["site", "seeded"])
def test_an_honest_but_curious_server_cannot_strip_the_noise_off_an_update(tiny_cfg, site_data, source):
    sigma, c = 1.0, tiny_cfg.dp.max_grad_norm
    data = site_data.train
    make = (lambda: SiteRandom()) if source == "site" else (lambda: SeededRandom(tiny_cfg.train.seed + 1))
    # The site: one noised step on its data; the truth the attacker wants is its clipped sum (a σ = 0 step).
    received, sent, n = _sgd_step(tiny_cfg, data, sigma=sigma, rng=make())
    _, exact, _ = _sgd_step(tiny_cfg, data, sigma=0.0, received=received)
    truth = _flat(received, exact, n)
    # The attacker knows the config, seed, round and size, and both weights. It replays the site's training on
    # random texts of the same size, with and without noise, to learn the noise the site drew ...
    fake = _random_texts(data)
    _, replay, _ = _sgd_step(tiny_cfg, fake, sigma=sigma, rng=make(), received=received)
    _, replay_exact, _ = _sgd_step(tiny_cfg, fake, sigma=0.0, received=received)
    noise_guess = _flat(replay_exact, replay, n)
    # ... and subtracts it from what the site sent.
    estimate = _flat(received, sent, n) - noise_guess
    error = np.linalg.norm(estimate - truth)
    noise_norm = sigma * c * np.sqrt(truth.size)
    if source == "site":
        assert error > 0.9 * noise_norm  # ≈ √2 · ‖noise‖: the guess is an independent draw
        # Two trainings with the same config, seed, round and size add different noise.
        _, again, _ = _sgd_step(tiny_cfg, data, sigma=sigma, rng=make(), received=received)
        assert np.linalg.norm(_flat(sent, again, n)) > 0.9 * noise_norm
    else:  # the mechanism as it was: the attack recovers the clipped sum to float error
        assert error < 1e-3 * np.linalg.norm(truth)


def test_dropout_masks_under_dp_are_not_the_public_seeds(tiny_cfg, site_data):
    # With σ = 0 the only randomness left in a DP step is dropout: two trainings with the same config, seed and
    # round must still differ (a public seed would make one more example shift every other example's mask).
    model = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0)
    received = trainable_state(model)
    outs = []
    for _ in range(2):
        load_trainable_state(model, received)
        train_cfg = replace(tiny_cfg.train, batch_size=10_000, local_epochs=1)
        schedule = dpsgd_schedule(n_public=len(site_data.train), batch_size=10_000, local_epochs=1)
        train_local(model, site_data.train, train_cfg=train_cfg, dp_cfg=tiny_cfg.dp, noise_multiplier=0.0,
                    prior=None, seed=0, schedule=schedule)
        outs.append(trainable_state(model))
    assert any(not np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])
