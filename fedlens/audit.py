"""`fedlens audit privacy`: an empirical lower bound on the ε of a site's DP-SGD, from one real training run.

The method is one-run auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv:2305.08846). m canaries are each put into the site's training set by an independent fair coin
from the OS. The site then trains once, through the product's own DP-SGD, `client.train.train_local` (Opacus
clipping, our noise source, our Poisson loader, the public denominator, exactly `schedule.steps` steps). Each
canary is scored on the final weights; the auditor guesses "in" for the k highest scores and "out" for the k
lowest, and counts the correct guesses. Their theorem for (ε, δ)-DP bounds how likely that many correct guesses
are under any (ε, δ)-DP mechanism; the largest ε that the count rejects at the stated confidence is the lower bound.

The canaries are white-box "Dirac" gradient canaries. The audit model is a bag of embeddings (`BagOfEmbeddings`),
not MiniLM: the site's real examples (its tokenised train split) use rows below R, and canary i is a one-token
example with its own row R + i, so only its own gradient (always clipped to exactly C) and the noise ever touch
that row. Its score is how far the row moved in the direction its gradient descends. With plain SGD the final
weights are linear in the noised sums, so one final model shows the whole signal of every step.

What it covers: the DP-SGD mechanism at the scenario's schedule (the rounds, local epochs and sampling rate q of
its site 0; σ calibrated for the claimed ε): per-sample clipping, the scale of the noise and whether anyone can
predict it (the auditor also tries replaying noise seeded by the public train.seed + round), the sampling, the
mean's public denominator, and the accountant's ε for the (σ, q, steps) actually run (`client.privacy.epsilon`).
What it does not cover: the released error summaries and the census (their own Gaussian releases), the
transport, the server, or the production model's own gradients (MiniLM's clipping is the same code, not the same
per-sample gradients). It is a lower bound, not a proof: "consistent" means this attack found no violation;
"violated" means that, at the stated confidence, the mechanism does not deliver the claimed ε.

Run as:  fedlens audit privacy --json
         fedlens audit privacy --epsilon 1 --canaries 2000 --mechanism scaled-noise
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from client.noise import Randomness, SiteRandom
from client.privacy import DPSGD, LedgerEntry, Schedule, calibrate_noise_multiplier, dpsgd_schedule, epsilon
from client.train import train_local
from common.config import PROJECT_ROOT, AppConfig
from common.model import Encoded

MECHANISMS = ("fedlens", "scaled-noise", "seeded-noise")
DEFAULT_SCENARIO = PROJECT_ROOT / "simulations" / "smoke.toml"
REAL_ROWS = 1024  # embedding rows for the real examples' tokens (token id mod this); canary rows come after
GRAD_OVER_CLIP = 10.0  # a canary's gradient norm at the start, in units of C: clipping always cuts it to exactly C
LOGIT_BUDGET = 0.05  # the most a canary's logits may move: p stays near uniform, so its gradient keeps its direction
K_FRACTIONS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25)  # guesses on each side, as shares of m (fixed before the run)
SCALED_NOISE = 0.1  # the scaled-noise bug: this share of the noise std that the ledger claims


# ====================================================================================================================
# The audit model and the canaries


class BagOfEmbeddings(nn.Module):
    """logits = scale · mean of the embeddings of the unmasked tokens. No bias and a zero start: a row that no
    example uses never moves except by noise. Takes the product's forward kwargs and ignores the ones it has no
    use for (token_type_ids, position_ids), so `train_local` drives it like the real model."""

    def __init__(self, rows: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(rows, num_classes)
        nn.init.zeros_(self.embed.weight)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        mask = attention_mask.unsqueeze(-1).float()  # [B, L, 1]
        summed = (self.embed(input_ids) * mask).sum(dim=1)  # [B, L, K] -> [B, K]
        return SimpleNamespace(logits=self.scale * summed / mask.sum(dim=1).clamp(min=1.0))


@dataclass(frozen=True)
class Canaries:
    """m one-token canaries; canary i owns embedding row first_row + i."""

    included: np.ndarray  # [m] bool: the secret coin flips (OS entropy, never a seed)
    labels: np.ndarray  # [m] int: each canary's label (public, like its row)
    first_row: int

    def __len__(self) -> int:
        return len(self.labels)


def draw_canaries(m: int, num_classes: int, first_row: int) -> Canaries:
    """Coin flips from os.urandom: a seeded flip would be known to the mechanism and void the theorem's premise."""
    bits = np.unpackbits(np.frombuffer(os.urandom((m + 7) // 8), dtype=np.uint8))[:m].astype(bool)
    labels = np.array([secrets.randbelow(num_classes) for _ in range(m)], dtype=np.int64)
    return Canaries(bits, labels, first_row)


def audit_dataset(real: Encoded, canaries: Canaries) -> Encoded:
    """The site's real examples (token ids folded into rows < first_row) and the included canaries, each a single
    token in its own row at position 0 (the rest masked)."""
    ids = real.input_ids % canaries.first_row
    ids = torch.where(real.attention_mask.bool(), ids, torch.zeros_like(ids))
    rows = torch.from_numpy(np.flatnonzero(canaries.included) + canaries.first_row)
    c_ids = torch.zeros((len(rows), ids.shape[1]), dtype=ids.dtype)
    c_ids[:, 0] = rows
    c_mask = torch.zeros_like(c_ids)
    c_mask[:, 0] = 1
    c_labels = torch.from_numpy(canaries.labels[canaries.included])
    return Encoded(torch.cat([ids, c_ids]), torch.cat([real.attention_mask.to(ids.dtype), c_mask]),
                   torch.cat([real.labels, c_labels]))


def descent_directions(canaries: Canaries, num_classes: int) -> np.ndarray:
    """[m, K] unit vectors: how canary i's row moves when its own gradient is applied at the zero start.

    The cross-entropy gradient of the logits is p − e_y, with p uniform at the start; descending it moves the row
    along e_y − 1/K. The logits stay within LOGIT_BUDGET of zero, so the direction holds for the whole run.
    """
    u = np.full((len(canaries), num_classes), -1.0 / num_classes)
    u[np.arange(len(canaries)), canaries.labels] += 1.0
    return u / np.linalg.norm(u, axis=1, keepdims=True)


# ====================================================================================================================
# The mechanisms: the product's randomness, and two broken ones it must catch


class ScaledNoise:
    """Broken: noise of `factor` times the std asked for, while the ledger records the full σ."""

    def __init__(self, inner: Randomness, factor: float) -> None:
        self.inner, self.factor = inner, factor

    def uniform(self, n: int) -> np.ndarray:
        return self.inner.uniform(n)

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return self.inner.normal(shape, std * self.factor)


class SeededNoise:
    """Broken: the noise from a generator seeded by public numbers (train.seed + round), as the code once did.

    The Poisson masks still come from the OS: the bug under test is the noise alone.
    """

    def __init__(self, seed: int) -> None:
        self.gen = np.random.default_rng(seed)
        self.masks = SiteRandom()

    def uniform(self, n: int) -> np.ndarray:
        return self.masks.uniform(n)

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return self.gen.normal(0.0, std, size=shape)


def mechanism_randomness(mechanism: str, seed: int) -> Randomness:
    """A round's randomness for `mechanism`: fresh per round, as a site draws it (`seed` = train.seed + round)."""
    if mechanism == "fedlens":
        return SiteRandom()
    if mechanism == "scaled-noise":
        return ScaledNoise(SiteRandom(), SCALED_NOISE)
    if mechanism == "seeded-noise":
        return SeededNoise(seed)
    raise ValueError(f"--mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")


# ====================================================================================================================
# The bound (Steinke, Nasr & Jagielski 2023, their main theorem in its (ε, δ) form)


def p_value(*, m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """How likely an (ε, δ)-DP mechanism lets `correct` of `guesses` guesses about m fair-coin canaries be right.

    With q = e^ε / (1 + e^ε) (the accuracy of ε-randomised response), the bound is
    P[Bin(r, q) ≥ v] + 2 m δ · max_{1 ≤ i ≤ v} P[v − i ≤ Bin(r, q) < v] / i for r guesses and v correct.
    The δ term is what (ε, δ) adds to the pure-ε theorem: each of the m canaries' δ of slack, charged against the
    probability just below v.
    """
    assert 0 <= correct <= guesses <= m, f"need 0 ≤ correct ({correct}) ≤ guesses ({guesses}) ≤ m ({m})"
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, q))  # P[Bin ≥ v]
    if delta == 0 or correct == 0:
        return min(1.0, tail)
    # P[v − i ≤ Bin < v] for i = 1..v: the pmf below v, summed downwards.
    below = np.cumsum(stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))
    spread = float(np.max(below / np.arange(1, correct + 1)))
    return min(1.0, tail + 2.0 * m * delta * spread)


def epsilon_lower_bound(*, m: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε whose (ε, δ)-DP claim `correct` of `guesses` rejects at `significance` (0 if none).

    Bisection keeps `lo` a rejected ε throughout, so what it returns is always a value the test did reject.
    """
    def rejected(eps: float) -> bool:
        return p_value(m=m, guesses=guesses, correct=correct, epsilon=eps, delta=delta) <= significance

    if guesses == 0 or not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > 64:  # a claim this large would need more canaries than any audit draws
            return lo
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def guess_counts(scores: np.ndarray, included: np.ndarray, k: int) -> tuple[int, int]:
    """Guess "in" for the k highest scores and "out" for the k lowest, abstain on the rest: (guesses, correct).

    Ties are broken by a random permutation (from the OS), never by the canary's index.
    """
    perm = np.frombuffer(os.urandom(8 * len(scores)), dtype=np.uint64).argsort()
    order = perm[np.argsort(scores[perm], kind="stable")]  # ascending scores
    low, high = order[:k], order[len(order) - k:]
    return 2 * k, int(included[high].sum() + (~included[low]).sum())


def k_grid(m: int) -> list[int]:
    """Guesses on each side, fixed by m before the run (their count is the multiple-comparison cost)."""
    return sorted({max(1, round(f * m)) for f in K_FRACTIONS if 2 * max(1, round(f * m)) <= m})


# ====================================================================================================================
# One audit


@dataclass(frozen=True)
class Plan:
    """What the site's DP-SGD runs in the audit: the scenario's schedule at the audit's public size."""

    schedule: Schedule  # per round
    rounds: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    lr: float  # SGD learning rate: sized so no canary's logits move more than LOGIT_BUDGET
    scale: float  # the bag's logit scale: a canary's gradient norm starts at GRAD_OVER_CLIP · C


def plan_audit(cfg: AppConfig, *, n_real: int, m: int, target_epsilon: float, num_classes: int) -> Plan:
    """The scenario's schedule (rounds, local epochs, q of its real site) with the canaries in, and σ calibrated
    for `target_epsilon` over all of it (DP-SGD alone: the audit runs no summary releases).

    The schedule follows public numbers only: the real size and m / 2 expected canaries, never the secret count
    that got in. q is the real site's q, so the canaries change the batch, not the sampling.
    """
    real = dpsgd_schedule(n_public=n_real, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs)
    n_public = n_real + m / 2
    batch = math.ceil(n_public / real.steps_per_epoch)
    schedule = dpsgd_schedule(n_public=n_public, batch_size=batch, local_epochs=cfg.train.local_epochs)
    assert schedule.steps_per_epoch == real.steps_per_epoch, (
        f"the audit's schedule has {schedule.steps_per_epoch} steps an epoch, the site's {real.steps_per_epoch}")
    rounds = cfg.num_server_rounds
    sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=cfg.dp.target_delta,
                                       sample_rate=schedule.sample_rate, steps_per_round=schedule.steps,
                                       rounds=rounds, release_noise_multiplier=None)
    c = cfg.dp.max_grad_norm
    scale = GRAD_OVER_CLIP * c / math.sqrt((num_classes - 1) / num_classes)  # ‖p − e_y‖ at uniform p
    steps = schedule.steps * rounds
    # A row moves by lr / B · (clipped gradient + noise) a step: bound it by all steps' signal + 5 sd of noise
    # (the largest of a few thousand rows' noise is about 4 sd).
    lr = LOGIT_BUDGET * schedule.expected_batch / (scale * c * (steps + 5 * sigma * math.sqrt(steps)))
    return Plan(schedule, rounds, sigma, c, cfg.dp.target_delta, lr, scale)


def train_audited(cfg: AppConfig, plan: Plan, data: Encoded, rows: int, num_classes: int,
                  mechanism: str) -> tuple[np.ndarray, list[LedgerEntry]]:
    """Every planned round of the site's real DP-SGD (`train_local`) on the audit model: (final weights, ledger).

    The rounds continue one model (a site's rounds compose the same way); each round draws fresh randomness.
    """
    model = BagOfEmbeddings(rows, num_classes, plan.scale)
    # SGD: the final weights are linear in every step's noised sum. The physical batch is memory only: [b, rows, K].
    train_cfg = replace(cfg.train, optimizer="sgd", lr=plan.lr, head_lr=plan.lr, class_balance="none",
                        max_physical_batch=max(cfg.train.max_physical_batch, 256))
    dp_cfg = replace(cfg.dp, enabled=True)
    ledger = []
    for rnd in range(1, plan.rounds + 1):
        seed = cfg.train.seed + rnd  # what a site passes for round `rnd` (client_app): public
        result = train_local(model, data, train_cfg=train_cfg, dp_cfg=dp_cfg, noise_multiplier=plan.noise_multiplier,
                             prior=None, seed=seed, schedule=plan.schedule, rng=mechanism_randomness(mechanism, seed))
        ledger.append(LedgerEntry(rnd, DPSGD, "subsampled-gaussian", result.noise_multiplier, result.sample_rate,
                                  result.steps, plan.max_grad_norm))
    return model.embed.weight.detach().double().numpy(), ledger


def replayed_noise(cfg: AppConfig, plan: Plan, shape: tuple[int, ...]) -> np.ndarray:
    """The seed-replay attacker: the weight change that noise seeded by train.seed + round would have made.

    It knows what is public: the seeds, σ, C, the schedule, the learning rate and the code's draw order (per step,
    one std σ·C Gaussian per parameter tensor; the bag has one). Each step moves the weights by −lr / B · noise.
    """
    total = np.zeros(shape)
    for rnd in range(1, plan.rounds + 1):
        gen = np.random.default_rng(cfg.train.seed + rnd)
        for _ in range(plan.schedule.steps):
            total -= gen.normal(0.0, plan.noise_multiplier * plan.max_grad_norm, size=shape)
    return total * plan.lr / plan.schedule.expected_batch


def canary_scores(weights: np.ndarray, canaries: Canaries, num_classes: int, plan: Plan) -> np.ndarray:
    """Each canary row's movement along its descent direction, in clipped gradients (C · lr / B) of movement."""
    rows = weights[canaries.first_row:canaries.first_row + len(canaries)]  # [m, K]; every row started at zero
    moved = (rows * descent_directions(canaries, num_classes)).sum(axis=1)
    return moved * plan.schedule.expected_batch / (plan.lr * plan.max_grad_norm)


def best_guesses(scores: dict[str, np.ndarray], included: np.ndarray, *, delta: float,
                 significance: float) -> dict[str, Any]:
    """Every (attack, k) of the fixed grid, each tested at significance / comparisons (Bonferroni): the union
    bound keeps the chance that any of them rejects a true claim below `significance`."""
    m, grid = len(included), k_grid(len(included))
    each = significance / (len(scores) * len(grid))
    best = {"epsilon_lower_bound": 0.0, "attack": None, "k": 0, "guesses": 0, "correct": 0}
    for attack, s in scores.items():
        for k in grid:
            guesses, correct = guess_counts(s, included, k)
            eps = epsilon_lower_bound(m=m, guesses=guesses, correct=correct, delta=delta, significance=each)
            if eps > best["epsilon_lower_bound"] or best["attack"] is None:
                best = {"epsilon_lower_bound": eps, "attack": attack, "k": k, "guesses": guesses, "correct": correct}
    # The most this audit could ever certify: every guess right, at the best k. A claim at or above it cannot be
    # shown violated by this run, whatever the mechanism does ("inconclusive", not "consistent").
    reachable = max(epsilon_lower_bound(m=m, guesses=2 * k, correct=2 * k, delta=delta, significance=each)
                    for k in grid)
    return {**best, "comparisons": len(scores) * len(grid), "epsilon_reachable": reachable}


def check_settings(*, mechanism: str, canaries: int, target_epsilon: float | None, confidence: float) -> None:
    """Raises one ValueError naming every setting outside its range (before any data is loaded)."""
    problems = [p for ok, p in (
        (mechanism in MECHANISMS, f"--mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}"),
        (canaries >= 2, f"--canaries must be ≥ 2, got {canaries}"),
        (target_epsilon is None or target_epsilon > 0, f"--epsilon must be > 0, got {target_epsilon}"),
        (0 < confidence < 1, f"--confidence must be in (0, 1), got {confidence}"),
    ) if not ok]
    if problems:
        raise ValueError("; ".join(problems))


def run_audit(cfg: AppConfig, real: Encoded, *, num_classes: int, mechanism: str = "fedlens", canaries: int = 2000,
              target_epsilon: float | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """Audit the site's DP-SGD once: draw the canaries, train, score, guess, bound. Returns the JSON report.

    Raises:
        ValueError: a setting outside its range (named with its value).
    """
    check_settings(mechanism=mechanism, canaries=canaries, target_epsilon=target_epsilon, confidence=confidence)
    if not cfg.dp.enabled:
        raise ValueError("the scenario trains without DP (dp.enabled = false): there is no mechanism to audit")
    target = cfg.dp.target_epsilon if target_epsilon is None else target_epsilon
    t0 = time.perf_counter()
    plan = plan_audit(cfg, n_real=len(real), m=canaries, target_epsilon=target, num_classes=num_classes)
    drawn = draw_canaries(canaries, num_classes, REAL_ROWS)
    rows = REAL_ROWS + canaries
    weights, ledger = train_audited(cfg, plan, audit_dataset(real, drawn), rows, num_classes, mechanism)
    scores = {"white-box": canary_scores(weights, drawn, num_classes, plan),
              "seed-replay": canary_scores(weights - replayed_noise(cfg, plan, weights.shape), drawn, num_classes,
                                           plan)}
    best = best_guesses(scores, drawn.included, delta=plan.delta, significance=1.0 - confidence)
    claimed = epsilon(ledger, plan.delta)
    return {
        "scenario": cfg.scenario, "mechanism": mechanism, "epsilon_claimed": claimed,
        "epsilon_lower_bound": best["epsilon_lower_bound"], "confidence": confidence, "delta": plan.delta,
        "verdict": ("violated" if best["epsilon_lower_bound"] > claimed else
                    "inconclusive" if claimed >= best["epsilon_reachable"] else "consistent"),
        "epsilon_reachable": best["epsilon_reachable"],
        "canaries": canaries, "canaries_included": int(drawn.included.sum()), "real_examples": len(real),
        "guesses": best["guesses"], "correct": best["correct"], "attack": best["attack"], "k": best["k"],
        "comparisons": best["comparisons"],
        "schedule": {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.schedule.sample_rate,
                     "steps": sum(e.steps for e in ledger), "rounds": plan.rounds,
                     "steps_per_round": plan.schedule.steps, "max_grad_norm": plan.max_grad_norm,
                     "expected_batch": plan.schedule.expected_batch},
        "seconds": time.perf_counter() - t0,
    }


def audit_privacy(scenario: Path | None = None, *, mechanism: str = "fedlens", canaries: int = 2000,
                  target_epsilon: float | None = 1.0, confidence: float = 0.95,
                  progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """`fedlens audit privacy`: the scenario's config (the smoke scenario by default), its site 0's train split
    tokenised by the project tokenizer, then `run_audit`.

    Raises:
        FileNotFoundError: the scenario file does not exist.
        ValueError: an invalid scenario or setting.
    """
    from client.data import SiteIdentity, load_site_data
    from common.config import load_overrides
    from common.model import load_tokenizer

    check_settings(mechanism=mechanism, canaries=canaries, target_epsilon=target_epsilon, confidence=confidence)
    path = scenario if scenario is not None else (DEFAULT_SCENARIO if DEFAULT_SCENARIO.is_file() else None)
    cfg = AppConfig.from_run_config(load_overrides(path) if path else {})
    progress(f"audit: scenario {cfg.scenario} ({path or 'pyproject defaults'}), site-0's train split")
    site = load_site_data(cfg, SiteIdentity("site-0", 0, cfg.simulation.num_sites, ""), load_tokenizer(cfg.model))
    progress(f"audit: {len(site.train)} real examples + {canaries} canaries, mechanism {mechanism}")
    return run_audit(cfg, site.train, num_classes=site.num_classes, mechanism=mechanism, canaries=canaries,
                     target_epsilon=target_epsilon, confidence=confidence)


def format_text(out: dict[str, Any]) -> str:
    """A few readable lines of an audit report."""
    s = out["schedule"]
    verdict = {"consistent": "consistent with the claimed ε (no violation found; a lower bound, not a proof)",
               "inconclusive": f"inconclusive: {out['canaries']} canaries cannot certify more than "
                               f"{out['epsilon_reachable']:.2f}, below the claim (use more canaries or a smaller ε)",
               "violated": "VIOLATED: the mechanism leaks more than its ledger claims"}[out["verdict"]]
    return "\n".join([
        f"privacy audit of DP-SGD (one run, Steinke et al. 2023): scenario {out['scenario']}, "
        f"mechanism {out['mechanism']}",
        f"  schedule   σ = {s['noise_multiplier']:.3f}, q = {s['sample_rate']:.3g}, {s['steps']} steps "
        f"({s['rounds']} rounds), C = {s['max_grad_norm']:g}, δ = {out['delta']:g}",
        f"  canaries   {out['canaries']} ({out['canaries_included']} included by coin flip), best attack "
        f"{out['attack']}: {out['correct']} of {out['guesses']} guesses correct",
        f"  ε          claimed {out['epsilon_claimed']:.3f}, lower bound {out['epsilon_lower_bound']:.3f} at "
        f"{out['confidence']:.0%} confidence ({out['comparisons']} comparisons, Bonferroni)",
        f"  verdict    {verdict}  [{out['seconds']:.1f} s]",
    ])
