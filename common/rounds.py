"""Steps 4 → 5 → findings: the round as a typed record. The server builds one per round (server/strategy.py), the
findings engine reads it (server/findings/), and only the run store (common/run_store.py) turns it into rows and JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class FindingKind(StrEnum):
    """Every kind of finding, one name each (README "What each finding means"). Stored as its value."""

    # Observed directly in the round's replies.
    SITE_FAILED = "site_failed"  # raised, timed out, bad data file
    UPDATE_REJECTED = "update_rejected"  # NaN/Inf, wrong shape, norm or example count out of bounds
    BUDGET_EXHAUSTED = "budget_exhausted"  # the site refused, by its own privacy policy
    # Run-level, from the global model and its curves.
    MAJORITY_COLLAPSE = "majority_collapse"
    DP_NOISE_DOMINATES = "dp_noise_dominates"
    UNDERFITTING = "underfitting"
    GLOBAL_OVERFITTING = "global_overfitting"
    MISCALIBRATION = "miscalibration"
    LABEL_SKEW = "label_skew"  # an info note: the label, loss and probe tests are withheld
    # Cross-site, per round: updates and timing.
    FREE_RIDER = "free_rider"
    DIVERGENCE = "divergence"
    STRAGGLER = "straggler"
    # Statistical, from the noised summaries (and the public schedule and probe) over rounds.
    CLASS_MISSING = "class_missing"
    LABEL_FLIP = "label_flip"
    LABEL_NOISE = "label_noise"
    DATA_SHIFT = "data_shift"
    DOMAIN_DIFFERENCE = "domain_difference"  # an info note: a site's texts differ, the model reads them as well
    OVERFITTING = "overfitting"

    @classmethod
    def read(cls, stored: str) -> FindingKind | str:
        """A kind as a store holds it, older names included; an unknown kind (a newer version's) stays a string."""
        stored = OLD_NAMES.get(stored, stored)
        return cls(stored) if stored in cls._value2member_map_ else stored


# Names older stores hold: hyphenated kinds, and the straggler finding's first name.
OLD_NAMES = {"site-failed": FindingKind.SITE_FAILED, "update-rejected": FindingKind.UPDATE_REJECTED,
             "dropout": FindingKind.STRAGGLER}


@dataclass
class SiteSummary:
    """What the server keeps of one site's released error summary: noised numbers and public sizes only."""

    round_trained: int  # the round whose training the summary's training blocks measured (0: none)
    noise_multiplier: float  # σ of the release (0: an exact summary, no DP)
    noise_std: dict[str, float]  # block -> std of each of its cells' noise (public: σ, Δ, weights)
    n_train: int  # the site's released train size
    derived: dict[str, Any]  # common/diagnostics.derive of the blocks: per-class P/R/F1, ECE, label issues, DP health
    released: dict[str, Any]  # block -> its cells as released (unclamped, unbiased): what analyses average over rounds
    cross_site: dict[str, Any] | None = None  # {"models", "correct", "accuracy", "noise_std"} when cross-site eval ran


@dataclass
class SiteRoundRow:
    site: str
    phase: str  # "train" | "evaluate"
    status: str  # "ok" | "refused" | "failed"
    reason: str = ""
    num_examples: int | None = None
    epsilon: float | None = None
    epsilon_budget: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    seconds: float | None = None
    update_norm: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    loss: float | None = None
    train_loss: float | None = None
    max_prediction_share: float | None = None
    confusion: list[list[float]] | None = None  # clamped to its released total and rescaled
    epsilon_training: float | None = None
    epsilon_diagnostics: float | None = None
    ece: float | None = None  # expected calibration error, from the noised calibration bins
    label_issues: float | None = None  # share of validation examples confidently labelled otherwise (noised)
    clip_fraction: float | None = None  # share of per-sample gradients clipped in the round's DP-SGD (noised)
    grad_norm: float | None = None  # mean per-sample gradient norm / C (noised, binned)
    # ‖Σ clipped gradients‖ / (σ·C) per step: the signal against the noise along its own direction (noised
    # signal; common/diagnostics.derive). Older stores' noise_to_signal (σ·√d over it) is no longer written.
    signal_to_noise: float | None = None
    signal_to_noise_std: float | None = None  # the std of that reading (release noise on the clipped-sum block / σ)
    epsilon_lifetime: float | None = None  # the site's lifetime ε on its data (all runs), at its own δ
    epsilon_cap: float | None = None  # the site's own lifetime cap
    summary: SiteSummary | None = None  # the site's released summary (evaluate rows)
    diagnostics_seconds: float | None = None  # of `seconds`, the site's diagnostics work (health, summary)
    started_at: float | None = None  # the site's wall clock around its handler (round-overhead benchmark)
    ended_at: float | None = None
    # Robust aggregation's view of the update: Krum's score (Σ squared distances to its nearest updates), or the
    # share of its values the trimmed mean / median kept; None under plain FedAvg.
    aggregation_score: float | None = None
    # The site's local model on the server's public probe texts: its mean predicted class distribution.
    probe: list[float] | None = None
    update_cosine: float | None = None  # of its update to the mean of the other sites' updates
    update_cosine_median: float | None = None  # ... to their coordinate-wise median
    # The step size its update shows, read off the DP noise alone (server/aggregate.noise_scale): equal at honest
    # sites whatever their data; a blown-up learning rate multiplies it.
    noise_scale: float | None = None

    @property
    def left_out(self) -> bool:
        """A train row whose update the server did not average although it was readable (server/strategy.py: an
        outlier norm); the row stays ok, its reason says why."""
        return self.status == "ok" and self.reason.startswith(LEFT_OUT)


LEFT_OUT = "left out of the average"  # how a train row's reason starts when its update was not averaged


# The neighbouring relation every ledger entry is accounted under (client/privacy.py; `fedlens report` states it).
NEIGHBOURING_RELATION = "add_remove"


@dataclass
class LedgerRow:
    """One entry of a site's privacy ledger, as the site reported spending it."""

    site: str
    round: int
    kind: str  # "dpsgd" | "summary" | "census"
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    sensitivity: float


@dataclass
class Event:
    kind: str  # "site-failed" | "site-refused" | "site-joined" | "run-failed" | ...
    message: str
    site: str | None = None


@dataclass
class Finding:
    kind: FindingKind
    severity: str  # "critical" | "warning" | "info"
    message: str  # the evidence, as a sentence with the numbers behind it
    site: str | None = None  # None: about the whole run
    confidence: float = 1.0  # 1 for what was observed directly; statistical findings: a heuristic in (0, 1)


@dataclass
class RoundRecord:
    """Everything one round produced; written in one transaction."""

    round: int
    seconds: float
    metrics: dict[str, float | None] = field(default_factory=dict)  # keys from run_store.ROUND_METRICS
    sites: list[SiteRoundRow] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    ledger: list[LedgerRow] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
