"""Step 2 at a site: its privacy ledger (every DP-SGD segment, every released summary, its census) and its ε.

Each site keeps one lifetime ledger on its own disk (client/state.Lifetime); a run's ε is the composition of that
run's entries, the lifetime ε that of all of them (`lifetime_epsilon`). Entries compose under RDP: a DP-SGD
segment is the Poisson-subsampled Gaussian (σ, q, steps) that Opacus accounts; a released summary or the census
is one Gaussian mechanism with L2 sensitivity Δ and noise std σ·Δ, i.e. the entry (σ, q=1, steps=1).
The neighbouring relation is add/remove one example (NEIGHBOURING_RELATION), as Opacus and dp-accounting's RDP
accountant use; `noise_multiplier` is always the noise std over the entry's one-example sensitivity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from common.rounds import NEIGHBOURING_RELATION  # noqa: F401 (the relation every entry here is accounted under)

DPSGD, SUMMARY, CENSUS = "dpsgd", "summary", "census"
EXACT = "exact"  # a run without DP: exact weights, sizes and summaries left the site (ε = ∞ on that data)


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    kind: str  # "dpsgd" | "summary" | "census"
    mechanism: str  # "subsampled-gaussian" | "gaussian"
    noise_multiplier: float
    sample_rate: float
    steps: int
    sensitivity: float  # L2 sensitivity the noise was scaled to (max_grad_norm for DP-SGD)


# RDP orders of dp-accounting's RdpAccountant. Opacus's default stops at α = 63, which overstates a small ε badly
# (one Gaussian release at σ = 40 reads ε ≈ 0.4 instead of 0.12); the large orders fix that and nothing else moves.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def epsilon(entries: list[LedgerEntry], delta: float) -> float:
    """Total ε at `delta` of everything in the ledger (RDP composition, Opacus's accountant); ∞ once anything left
    exactly (an EXACT entry)."""
    if any(e.kind == EXACT for e in entries):
        return math.inf
    steps: dict[tuple[float, float], int] = {}
    for e in entries:
        if e.steps > 0:  # RDP is linear in steps: equal (σ, q) segments are computed once
            steps[(e.noise_multiplier, e.sample_rate)] = steps.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
    acc = RDPAccountant()
    acc.history = [(sigma, q, n) for (sigma, q), n in steps.items()]
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta=delta, alphas=ORDERS))


# The lifetime cap (client/policy.py) stops a sequence of runs that the coordinator chooses one after another, each
# after seeing the last one's outputs. For one fixed order α, exp((α−1)(L_t − Σρ(α))) of the privacy loss L_t is a
# supermartingale, so by Ville's inequality L_t < Σρ(α) + log(1/δ)/(α−1) at every t at once with probability 1 − δ;
# over a few fixed orders, a union bound. So the lifetime ε uses these orders, δ / their number, and that plain
# conversion (the tighter one `epsilon` uses holds for a mechanism fixed in advance, not for a stopping rule).
LIFETIME_ORDERS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)


def lifetime_epsilon(entries: list[LedgerEntry], delta: float) -> float:
    """ε at `delta` of a ledger whose entries were chosen adaptively and stopped by a cap (see LIFETIME_ORDERS);
    ∞ once anything left exactly. One demo run (ε = 8 at 1e-5 by `epsilon`) reads about 9.5 here."""
    if any(e.kind == EXACT for e in entries):
        return math.inf
    orders = np.asarray(LIFETIME_ORDERS)
    rdp = sum((compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=orders)
               for e in entries if e.steps > 0), np.zeros(len(orders)))
    if not np.any(rdp):
        return 0.0
    return float(np.min(rdp + np.log(len(orders) / delta) / (orders - 1)))


def epsilon_split(entries: list[LedgerEntry], delta: float) -> tuple[float, float, float]:
    """(total, training, diagnostics) ε at `delta`. Each part alone; the total composes both (≤ their sum)."""
    return (epsilon(entries, delta), epsilon([e for e in entries if e.kind == DPSGD], delta),
            epsilon([e for e in entries if e.kind == SUMMARY], delta))


def budget_check(ledger: list[LedgerEntry], entry: LedgerEntry, *, budget: float, delta: float) -> str:
    """Why `entry` may not be spent ("" when it may): the ledger's ε after it would exceed `budget`."""
    projected = epsilon([*ledger, entry], delta)
    if projected <= budget + 1e-9:
        return ""
    return (f"round {entry.round} {entry.kind} would bring ε to {projected:.3f} > budget {budget:g} "
            f"(spent {epsilon(ledger, delta):.3f})")


@dataclass(frozen=True)
class Schedule:
    """What DP-SGD runs at a site in a round, fixed by public numbers only (never by the exact size n).

    Under add/remove neighbours the sampling rate, the step count and the mean's denominator must not depend on n
    (a step count that moves with n would itself reveal whether an example is there, at ε = ∞): they follow the
    site's *released* size, the noised count of its census (client/census.py).
    """

    sample_rate: float  # Poisson rate q: each example is in each logical batch with this probability
    steps_per_epoch: int  # ⌈n_released / batch⌉ = 1 / q logical steps, empty batches included
    epochs: int
    expected_batch: float  # q · n_released: what the clipped, noised sum is divided by (a public constant)

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def dpsgd_schedule(*, n_public: float, batch_size: int, local_epochs: int) -> Schedule:
    """The round's schedule from a public size: q = 1 / ⌈n / batch⌉ (as Opacus derives it from a loader), 1 / q
    steps an epoch."""
    batches = max(1, math.ceil(max(n_public, 1.0) / batch_size))
    q = 1.0 / batches
    return Schedule(q, batches, local_epochs, max(1.0, q * n_public))


def planned_entries(*, noise_multiplier: float, sample_rate: float, steps_per_round: int, rounds: int,
                    release_noise_multiplier: float | None,
                    per_round: list[tuple[float, int]] | None = None) -> list[LedgerEntry]:
    """What a site will spend if it takes part in every planned round: one DP-SGD segment + one release each.

    `per_round`: each round's own (q, steps), when rounds differ (LP-FT: full-batch probe rounds, then adapter rounds
    at another rate); else every round runs (sample_rate, steps_per_round).
    Sensitivities are 1 here: ε depends on σ (noise std / sensitivity) alone, whatever the sensitivity.
    """
    out: list[LedgerEntry] = []
    for r in range(1, rounds + 1):
        q, steps = per_round[r - 1] if per_round else (sample_rate, steps_per_round)
        out.append(LedgerEntry(r, DPSGD, "subsampled-gaussian", noise_multiplier, q, steps, 1.0))
        if release_noise_multiplier:
            out.append(LedgerEntry(r, SUMMARY, "gaussian", release_noise_multiplier, 1.0, 1, 1.0))
    return out


def calibrate_release_noise_multiplier(*, epsilon_diagnostics: float, delta: float, rounds: int) -> float:
    """The smallest σ whose `rounds` Gaussian summary releases alone cost at most `epsilon_diagnostics`."""
    def eps(sigma: float) -> float:
        return epsilon([LedgerEntry(0, SUMMARY, "gaussian", sigma, 1.0, rounds, 1.0)], delta)

    lo, hi = 0.0, 1.0
    while eps(hi) > epsilon_diagnostics:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no release noise multiplier reaches ε = {epsilon_diagnostics} at δ = {delta}")
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > epsilon_diagnostics else (lo, mid)
    return hi


def release_noise_multiplier(*, configured: float, diagnostics_share: float, target_epsilon: float, delta: float,
                             rounds: int) -> float | None:
    """σ of each released summary: configured (> 0), or calibrated so that the summaries of all planned rounds
    alone spend `diagnostics_share` of the budget. None when the share is 0: the site releases no summaries."""
    if configured > 0:
        return configured
    if diagnostics_share <= 0:
        return None
    return calibrate_release_noise_multiplier(epsilon_diagnostics=diagnostics_share * target_epsilon, delta=delta,
                                              rounds=rounds)


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps_per_round: int,
                               rounds: int, release_noise_multiplier: float | None, tolerance: float = 0.01,
                               spent: list[LedgerEntry] = (), per_round: list[tuple[float, int]] | None = None) -> float:
    """The smallest DP-SGD σ whose plan (all rounds, with their releases, after `spent`) stays within
    `target_epsilon`.

    Calibrated once for all planned rounds, not per round: a site then reports its cumulative spend. `spent` is
    what the run already released before its first training round (its census). `per_round`: as planned_entries.

    Raises:
        ValueError: the releases alone already exceed the budget (names the keys to change).
    """
    releases = [e for e in planned_entries(noise_multiplier=1.0, sample_rate=sample_rate, steps_per_round=0,
                                           rounds=rounds, release_noise_multiplier=release_noise_multiplier)
                if e.kind == SUMMARY]
    floor = epsilon([*spent, *releases], delta) if releases or spent else 0.0
    if floor >= target_epsilon:
        raise ValueError(
            f"dp.target-epsilon = {target_epsilon} leaves nothing for training: "
            + (f"{rounds} released summaries at dp.release-noise-multiplier = {release_noise_multiplier:.3g}"
               if release_noise_multiplier else "the census") + f" already cost ε = {floor:.2f}; raise the "
            "budget or the release noise multiplier, or lower dp.diagnostics-share"
        )

    def eps(sigma: float) -> float:
        return epsilon([*spent, *planned_entries(noise_multiplier=sigma, sample_rate=sample_rate,
                                                 steps_per_round=steps_per_round, rounds=rounds,
                                                 release_noise_multiplier=release_noise_multiplier,
                                                 per_round=per_round)], delta)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches ε = {target_epsilon} at δ = {delta}")
    # Bisect on σ until the achieved ε is within `tolerance` below the target (never above it).
    while True:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
        if target_epsilon - eps(hi) < tolerance or hi - lo < 1e-6:
            return hi


def to_state(entries: list[LedgerEntry]) -> dict[str, list]:
    """Column lists for a Flower ConfigRecord (which holds lists of one scalar type)."""
    cols = {k: [] for k in LedgerEntry.__dataclass_fields__}
    for e in entries:
        for k, v in asdict(e).items():
            cols[k].append(v)
    return cols


def from_state(cols: dict[str, list]) -> list[LedgerEntry]:
    if not cols or not cols.get("round"):
        return []
    n = len(cols["round"])
    return [LedgerEntry(int(cols["round"][i]), str(cols["kind"][i]), str(cols["mechanism"][i]),
                        float(cols["noise_multiplier"][i]), float(cols["sample_rate"][i]), int(cols["steps"][i]),
                        float(cols["sensitivity"][i])) for i in range(n)]
