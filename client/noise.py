"""Steps 1-3 at a site, their DP randomness: Gaussian noise and Poisson sampling from an OS-keyed cryptographic
generator.

Nothing here takes a seed. Seeding the noise from the run config (train.seed + round, both public) lets the server
regenerate the noise a site added and subtract it from the weights it sent: with one SGD step that gives back the
site's exact clipped-gradient sum. So every `SiteRandom` is a ChaCha20 key stream under a fresh 256-bit key from
`os.urandom` (the construction the Linux kernel's own generator uses), one per site per round, and is never stored.

Gaussians are Box-Muller pairs from 53-bit uniforms, and each value is the mean of four such draws times 2 (std
unchanged). A single floating-point Gaussian draw leaks through the gaps between representable values (Mironov
2012; Jin et al. 2022); summing draws is the countermeasure of Holohan & Braghin 2021, as Opacus's secure mode does.
Cost: 32 random bytes per noised value, ~50 ms per million values here (LoRA: ~75k values a step).
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

CHUNK = 1 << 20  # values per key-stream request: bounds the memory a large full-fine-tuning tensor needs


class Randomness(Protocol):
    """Where a DP mechanism's randomness comes from (the audit swaps in broken ones to show it can catch them)."""

    def uniform(self, n: int) -> np.ndarray: ...

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray: ...


class SiteRandom:
    """A ChaCha20 key stream keyed from OS entropy: uniforms in (0, 1) and noise-grade Gaussians (float64)."""

    def __init__(self) -> None:
        self._stream = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()

    def _words(self, n: int) -> np.ndarray:
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        """n uniforms on the open interval (0, 1), 53 random bits each."""
        return ((self._words(n) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53

    def _standard(self, n: int) -> np.ndarray:
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs).reshape(2, pairs)
        r = np.sqrt(-2.0 * np.log(u[0]))
        return np.concatenate([r * np.cos(2 * math.pi * u[1]), r * np.sin(2 * math.pi * u[1])])[:n]

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        size = int(np.prod(shape, dtype=np.int64))
        out = np.empty(size, dtype=np.float64)
        for start in range(0, size, CHUNK):
            m = min(CHUNK, size - start)
            out[start:start + m] = (self._standard(4 * m).reshape(4, m).sum(axis=0)) / 2.0
        return (out * std).reshape(shape)


def normal_like(rng: Randomness, reference: torch.Tensor, std: float) -> torch.Tensor:
    if std == 0:
        return torch.zeros_like(reference)
    noise = rng.normal(tuple(reference.shape), std)
    return torch.from_numpy(noise).to(device=reference.device, dtype=reference.dtype)


def use_randomness(optimizer: DPOptimizer, rng: Randomness) -> None:
    """Make an Opacus DPOptimizer draw its noise from `rng` instead of torch's seeded generator.

    Opacus's own `add_noise`, with the noise source replaced (same std σ·C per coordinate of the clipped sum, same
    processed-flag bookkeeping). Only the flat-clipping DPOptimizer is known to draw noise nowhere else.
    """
    if type(optimizer) is not DPOptimizer:
        raise TypeError(f"{type(optimizer).__name__}: only Opacus's flat-clipping DPOptimizer is supported")

    def add_noise(self: DPOptimizer) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + normal_like(rng, p.summed_grad,
                                                   self.noise_multiplier * self.max_grad_norm)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise.__get__(optimizer)


class PoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson sampler (each example in each batch independently with probability q, exactly `steps`
    batches) with the inclusion mask drawn from the site's generator. Empty batches are yielded like any other:
    the step they stand for is still noised and counted."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, rng: Randomness) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.rng = rng

    def __iter__(self):  # noqa: ANN204
        for _ in range(self.steps):
            if self.sample_rate >= 1.0:
                yield list(range(self.num_samples))
            else:
                yield np.flatnonzero(self.rng.uniform(self.num_samples) < self.sample_rate).tolist()
