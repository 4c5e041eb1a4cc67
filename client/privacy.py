"""Step 2 at a site: its privacy ledger (every DP-SGD segment and every released summary) and its ε.

One ledger per site lives across rounds in the ClientApp's `context.state`. Its entries compose under RDP:
a DP-SGD segment is the Poisson-subsampled Gaussian (σ, q, steps) that Opacus accounts; a released summary is one
Gaussian mechanism on counts with L2 sensitivity Δ and noise std σ·Δ, i.e. the entry (σ, q=1, steps=1).
The neighbouring relation is add/remove one example, as Opacus uses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from opacus.accountants import RDPAccountant

DPSGD, SUMMARY = "dpsgd", "summary"


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    kind: str  # "dpsgd" | "summary"
    mechanism: str  # "subsampled-gaussian" | "gaussian"
    noise_multiplier: float
    sample_rate: float
    steps: int
    sensitivity: float  # L2 sensitivity the noise was scaled to (max_grad_norm for DP-SGD)


class BudgetExceeded(RuntimeError):
    """The next step would take a site past its ε budget; the site refuses it and says so."""


def epsilon(entries: list[LedgerEntry], delta: float) -> float:
    """Total ε at `delta` of everything in the ledger (RDP composition, Opacus's accountant)."""
    acc = RDPAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.steps > 0]
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta=delta))


def budget_check(ledger: list[LedgerEntry], entry: LedgerEntry, *, budget: float, delta: float) -> str:
    """Why `entry` may not be spent ("" when it may): the ledger's ε after it would exceed `budget`."""
    projected = epsilon([*ledger, entry], delta)
    if projected <= budget + 1e-9:
        return ""
    return (f"round {entry.round} {entry.kind} would bring ε to {projected:.3f} > budget {budget:g} "
            f"(spent {epsilon(ledger, delta):.3f})")


def dpsgd_schedule(*, n_train: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample_rate, steps per round) exactly as Opacus will account them: q = 1 / len(loader)."""
    batches = math.ceil(n_train / batch_size)
    return 1.0 / batches, batches * local_epochs


def planned_entries(*, noise_multiplier: float, sample_rate: float, steps_per_round: int, rounds: int,
                    release_noise_multiplier: float) -> list[LedgerEntry]:
    """What a site will spend if it takes part in every planned round: one DP-SGD segment + one release each."""
    out: list[LedgerEntry] = []
    for r in range(1, rounds + 1):
        out.append(LedgerEntry(r, DPSGD, "subsampled-gaussian", noise_multiplier, sample_rate, steps_per_round, 1.0))
        out.append(LedgerEntry(r, SUMMARY, "gaussian", release_noise_multiplier, 1.0, 1, 1.0))
    return out


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps_per_round: int,
                               rounds: int, release_noise_multiplier: float, tolerance: float = 0.01) -> float:
    """The smallest DP-SGD σ whose plan (all rounds, with their releases) stays within `target_epsilon`.

    Calibrated once for all planned rounds, not per round: a site then reports its cumulative spend.

    Raises:
        ValueError: the releases alone already exceed the budget (names the keys to change).
    """
    releases = [e for e in planned_entries(noise_multiplier=1.0, sample_rate=sample_rate, steps_per_round=0,
                                           rounds=rounds, release_noise_multiplier=release_noise_multiplier)
                if e.kind == SUMMARY]
    floor = epsilon(releases, delta)
    if floor >= target_epsilon:
        raise ValueError(
            f"dp.target-epsilon = {target_epsilon} leaves nothing for training: {rounds} released summaries at "
            f"dp.release-noise-multiplier = {release_noise_multiplier} already cost ε = {floor:.2f}; raise the "
            "budget or the release noise multiplier"
        )

    def eps(sigma: float) -> float:
        return epsilon(planned_entries(noise_multiplier=sigma, sample_rate=sample_rate,
                                       steps_per_round=steps_per_round, rounds=rounds,
                                       release_noise_multiplier=release_noise_multiplier), delta)

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
