"""Steps 1-3 at a site, what it allows: its own privacy policy (its lifetime ε cap, its δ, its minimum noise, and
whether it takes non-DP runs).

The run config is the coordinator's; a site's policy is not. It comes from the site's side only, in this order:
the defaults in pyproject `[tool.fedlens.site-policy]`, then `policy.toml` in the site's state folder (or the
folder above it, which `fedlens simulate` fills for all its simulated sites), then the SuperNode's node config
(`fedlens site --epsilon-cap ...`). Whatever a run asks, a site refuses any spend that would break it, and says why.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from client.census import Census
from client.privacy import EXACT, LedgerEntry, budget_check, epsilon_split, lifetime_epsilon
from client.state import Lifetime
from common.config import pyproject_path

POLICY_FILE = "policy.toml"


@dataclass(frozen=True)
class SitePolicy:
    epsilon_cap: float  # lifetime ε over everything ever released from this dataset, in all runs
    delta: float  # the site's δ: lifetime ε is at this δ, and no run may ask for a larger one (0 = auto)
    min_noise_multiplier: float  # no DP-SGD step or release with less noise (σ = noise std / sensitivity)
    allow_non_dp: bool  # take part in runs with dp.enabled = false (their weights and summaries are exact)
    allow_injected_faults: bool  # apply the run config's `faults` (simulated sites only: they change the data)
    source: str = "defaults"  # where the values came from, for messages at the site

    def site_delta(self, n_released: float) -> float:
        """The δ this site accounts at. Auto (0): 1e-5, or the power of ten at most 1 / (10 n) for large sites,
        from the *released* size so that the δ, which is public, says nothing the census did not."""
        if self.delta > 0:
            return self.delta
        return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / (10.0 * max(n_released, 1.0)))))


_KEYS = {f.name.replace("_", "-"): f for f in fields(SitePolicy) if f.name != "source"}


def _defaults() -> dict[str, Any]:
    return dict(_installed_defaults())


@lru_cache(maxsize=1)
def _installed_defaults() -> dict[str, Any]:
    # Read once per process: every message loads the policy, and the installed package does not change under it.
    with pyproject_path().open("rb") as f:
        return dict(tomllib.load(f)["tool"]["fedlens"]["site-policy"])


def load_policy(folder: Path, node_config: dict[str, Any]) -> SitePolicy:
    """The site's policy: defaults, then policy.toml (its folder, else the one above), then node-config keys.

    Raises:
        ValueError: naming the file or key and the expected type when a value is not usable.
    """
    values, source = _defaults(), "defaults"
    for candidate in (folder / POLICY_FILE, folder.parent / POLICY_FILE):
        if candidate.is_file():
            try:
                with candidate.open("rb") as f:
                    values.update(tomllib.load(f))
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"site policy {candidate} is not valid TOML: {e}") from e
            source = str(candidate)
            break
    overrides = {k: v for k, v in node_config.items() if k in _KEYS}
    if overrides:
        values.update(overrides)
        source += " + node config"
    unknown = sorted(set(values) - set(_KEYS))
    if unknown:
        raise ValueError(f"site policy ({source}): unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    out = {}
    for key, f in _KEYS.items():
        v = values[key]
        try:
            out[f.name] = _bool(v) if f.type in (bool, "bool") else float(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"site policy ({source}): {key} = {v!r} is not a {f.type}") from e
    policy = SitePolicy(**out, source=source)
    if policy.epsilon_cap < 0 or policy.delta < 0 or policy.min_noise_multiplier < 0:
        raise ValueError(f"site policy ({source}): epsilon-cap, delta and min-noise-multiplier must be ≥ 0")
    return policy


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise ValueError(v)


def too_little_noise(policy: SitePolicy, entry: LedgerEntry) -> str:
    """Why `entry` has less noise than the site accepts ("" when it has enough)."""
    if entry.noise_multiplier < policy.min_noise_multiplier:
        return (f"{entry.kind} noise multiplier {entry.noise_multiplier:.3g} is below this site's minimum "
                f"{policy.min_noise_multiplier:g} (its policy)")
    return ""


def refusal(policy: SitePolicy, *, lifetime: list[LedgerEntry], entry: LedgerEntry, site_delta: float) -> str:
    """Why the site's lifetime ledger forbids spending `entry` ("" when it allows it): exact values already left
    (a run without DP), or a lifetime ε (every entry ever spent on this data, all runs) above the cap."""
    if any(e.kind == EXACT for e in lifetime):
        return ("this site took part in a run without DP on its data: exact values left it, so no DP guarantee is "
                "left to spend (lifetime ε = ∞)")
    projected = lifetime_epsilon([*lifetime, entry], site_delta)
    if projected > policy.epsilon_cap + 1e-9:
        return (f"round {entry.round} {entry.kind} would bring this site's lifetime ε on this data to "
                f"{projected:.3f} > its cap {policy.epsilon_cap:g} (spent {lifetime_epsilon(lifetime, site_delta):.3f} "
                "over all runs so far)")
    return ""


@dataclass
class Accounts:
    """One site's privacy position in one run: its policy, its lifetime ledger, and the run's own budget.

    A spend must fit both: the run's target (dp.target-epsilon at dp.target-delta, over this run's entries: the
    coordinator's plan) and the site's policy (its cap, over every entry ever spent on this data, at its δ).
    """

    policy: SitePolicy
    lifetime: Lifetime
    run_id: str
    run_budget: float
    run_delta: float

    def site_delta(self) -> float:
        c = self.lifetime.census
        return self.policy.site_delta(c.n_train + c.n_val if c is not None else 0.0)

    def run_entries(self) -> list[LedgerEntry]:
        return self.lifetime.of_run(self.run_id)

    def why_not(self, entry: LedgerEntry) -> str:
        """Why `entry` may not be spent ("" when it may): too little noise for the site, the run's budget, the
        site's lifetime cap."""
        return (too_little_noise(self.policy, entry)
                or budget_check(self.run_entries(), entry, budget=self.run_budget, delta=self.run_delta)
                or refusal(self.policy, lifetime=self.lifetime.all(), entry=entry, site_delta=self.site_delta()))

    def spend(self, entry: LedgerEntry) -> str:
        """Charge `entry` if the run's budget and the site's policy allow it, checked against the ledger as it is on
        disk now (another run may have spent since); "" when charged, else why not."""
        with self.lifetime.locked():
            why = self.why_not(entry)
            if not why:
                self.lifetime.charge(self.run_id, entry)
            return why

    def expose(self) -> None:
        """Record that this run releases exact values (no DP): the lifetime ε of the site's data is ∞ from now on,
        and the site will refuse every DP spend after it (its policy's allow-non-dp let this happen)."""
        with self.lifetime.locked():
            if not any(e.kind == EXACT for e in self.run_entries()):
                self.lifetime.charge(self.run_id, LedgerEntry(0, EXACT, "none", 0.0, 1.0, 1, 0.0))

    def census(self, entry: LedgerEntry, take: Callable[[], Census]) -> tuple[Census | None, str]:
        """This dataset's census: the one kept, else `take()` released now and charged as `entry` (unless that
        would break the budget or the policy: then (None, why))."""
        with self.lifetime.locked():
            if self.lifetime.census is not None:
                return self.lifetime.census, ""
            why = self.why_not(entry)
            if why:
                return None, why
            released = take()
            self.lifetime.charge(self.run_id, entry, census=released)
            return released, ""

    def epsilons(self) -> tuple[float, float, float, float]:
        """(this run's total, its training, its diagnostics, the lifetime total at the site's δ)."""
        total, train, diag = epsilon_split(self.run_entries(), self.run_delta)
        return total, train, diag, lifetime_epsilon(self.lifetime.all(), self.site_delta())
