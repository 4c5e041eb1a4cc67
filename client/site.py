"""Steps 1-3 at a site, their privacy plan: whether it takes part in a run, its census, σ, each charge, its replies.

Everything a handler of client/client_app.py decides before and after the maths, as plain functions and one
dataclass (`SiteRun`) that never see a Flower `Message`. What must outlive one message (the planned rounds, σ,
the round's training health) lives in the site's `context.state`, under the record names of common/records.py;
the functions that keep it take that RecordDict. Every number a reply reports is assembled here (`train_reply`,
`eval_reply`), in the fields of common/records.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from client import census, privacy
from client.census import Census
from client.data import SiteData, SiteIdentity, load_site_data
from client.faults import faulty_training, scheduled_size
from client.policy import Accounts, load_policy
from client.state import Lifetime, features_folder, site_folder
from client.summary import Summary
from client.train import TrainHealth
from common import diagnostics, records
from common.config import AppConfig, Fault, TrainConfig
from common.features import cached_features, encoder_identity
from common.log import get_logger
from common.model import Features, Split, build_model, load_tokenizer

if TYPE_CHECKING:
    from flwr.app import RecordDict
    from torch import nn

NOT_PRIVATE = -1.0  # the ε a site reports when dp.enabled is false


# ---------------------------------------------------------------------------------------------------------------------
# Per process: a simulation actor hosts many sites in turn, and a SuperNode sees every round of a run.


@lru_cache(maxsize=2)
def _config(run_config_json: str) -> AppConfig:
    return AppConfig.from_run_config(json.loads(run_config_json))


@lru_cache(maxsize=8)
def _site_data(run_config_json: str, site: SiteIdentity, faults_allowed: bool) -> SiteData:
    # A simulation actor hosts many sites in turn; loading and tokenising once per site spares every round.
    cfg = _config(run_config_json)
    return load_site_data(cfg, site, _tokenizer(run_config_json), faults_allowed=faults_allowed)


@lru_cache(maxsize=2)
def _tokenizer(run_config_json: str):  # noqa: ANN202
    return load_tokenizer(_config(run_config_json).model)


@lru_cache(maxsize=8)
def _features(run_config_json: str, site: SiteIdentity, faults_allowed: bool, folder: Path) -> tuple[Features, Features]:
    # Head mode: the frozen encoder's output for the site's train and validation splits, computed once per process
    # and kept in the site's own folder for later runs (common/features.py); never sent.
    cfg = _config(run_config_json)
    data = _site_data(run_config_json, site, faults_allowed)
    identity = encoder_identity(cfg.model, cfg.train.seed)
    model = _model(run_config_json)
    return tuple(cached_features(model, split, identity=identity, folder=folder) for split in (data.train, data.val))


@lru_cache(maxsize=2)
def _model(run_config_json: str):  # noqa: ANN202
    # Safe to reuse across messages and sites: every trainable weight is overwritten by the received ones.
    cfg = _config(run_config_json)
    return build_model(cfg.model, cfg.data.labels, seed=cfg.train.seed)


# ---------------------------------------------------------------------------------------------------------------------
# Whether the site takes part, and its census.


def admit(acc: Accounts, cfg: AppConfig) -> str:
    """Why this site takes no part in this run at all, by its own policy ("" when it does)."""
    if cfg.faults_at(acc.lifetime.site) and not acc.policy.allow_injected_faults:
        return ("the run injects faults at this site, which its policy does not allow (allow-injected-faults = false: "
                "only simulated sites change their data for a scenario)")
    if not cfg.dp.enabled:
        return "" if acc.policy.allow_non_dp else ("this site takes part in no run without DP (its policy: "
                                                   "allow-non-dp = false)")
    if cfg.dp.target_delta > acc.site_delta():
        return f"dp.target-delta = {cfg.dp.target_delta:g} is above this site's δ = {acc.site_delta():g} (its policy)"
    return ""


def take_census(acc: Accounts, cfg: AppConfig, data: SiteData) -> tuple[Census | None, str]:
    """The site's census: exact without DP; else the one kept for this data, or released (and charged) now.
    (None, why) when the site may not release it."""
    if not cfg.dp.enabled:
        acc.expose()  # exact sizes, weights and summaries leave from here: recorded before the first reply
        return census.take(data.train.labels.numpy(), len(data.val), data.num_classes, noise_multiplier=0.0), ""
    entry = privacy.LedgerEntry(0, privacy.CENSUS, "gaussian", cfg.dp.census_noise_multiplier, 1.0, 1,
                                census.SENSITIVITY)
    released, why = acc.census(entry, lambda: census.take(data.train.labels.numpy(), len(data.val), data.num_classes,
                                                          noise_multiplier=cfg.dp.census_noise_multiplier))
    return released, f"site {data.site.name}: {why}; census withheld" if why else ""


def site_info(data: SiteData, census_: Census | None, status: str = records.STATUS_OK, reason: str = "",
              paid_by: str = "") -> records.SiteInfo:
    """Who this site is and its *released* sizes (the census; exact only in a run without DP)."""
    if census_ is None:
        return records.SiteInfo(data.site.name, 0, 0, status, reason)
    n_train, n_val = census_.sizes()
    return records.SiteInfo(data.site.name, n_train, n_val, status, reason, census_.train_labels, census_.n_val,
                            census_.count_std(), paid_by)


# ---------------------------------------------------------------------------------------------------------------------
# The noise of each release, planned once per run (kept in context.state).


def planned_rounds(state: RecordDict, num_rounds: int) -> int:
    """The number of rounds the budget is planned for: fixed at a site's first message of the run."""
    if records.read_state(state, records.PLAN) is None:
        records.write_state(state, records.PLAN, {"rounds": num_rounds})
    return int(records.read_state(state, records.PLAN)["rounds"])


def release_noise_multiplier(cfg: AppConfig, rounds: int) -> float | None:
    return privacy.release_noise_multiplier(configured=cfg.dp.release_noise_multiplier,
                                            diagnostics_share=cfg.dp.diagnostics_share,
                                            target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.target_delta,
                                            rounds=rounds)


def noise_multiplier(state: RecordDict, cfg: AppConfig, schedules: list[privacy.Schedule], acc: Accounts, name: str,
                     num_rounds: int) -> float:
    """σ of DP-SGD: configured, or calibrated once (then kept in state) for all planned rounds of this site, after
    what the run already spent (its census). `schedules`: each planned round's (they differ under LP-FT)."""
    if cfg.dp.noise_multiplier > 0:
        return cfg.dp.noise_multiplier
    kept = records.read_state(state, records.DP)
    if kept is not None:
        return float(kept["noise-multiplier"])
    release_sigma = release_noise_multiplier(cfg, num_rounds)
    sigma = privacy.calibrate_noise_multiplier(target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.target_delta,
                                               sample_rate=schedules[0].sample_rate, steps_per_round=schedules[0].steps,
                                               rounds=num_rounds, release_noise_multiplier=release_sigma,
                                               spent=acc.run_entries(),
                                               per_round=[(x.sample_rate, x.steps) for x in schedules])
    records.write_state(state, records.DP, {"noise-multiplier": sigma})
    get_logger().info("site %s: DP-SGD σ = %.4f, summary σ = %s for ε = %s over %d rounds", name, sigma,
                      f"{release_sigma:.3f}" if release_sigma else "none", cfg.dp.target_epsilon, num_rounds)
    return sigma


# ---------------------------------------------------------------------------------------------------------------------
# What a round's training measured, kept for its evaluation (state never leaves the site).


def save_health(state: RecordDict, server_round: int, health: TrainHealth | None) -> None:
    if health is not None:
        records.write_state(state, records.HEALTH, {
            "round": server_round, "grad-norm-hist": health.grad_norm_hist, "clipped-sum-norm": health.clipped_sum_norm,
            "train-loss-sum": health.train_loss_sum, "train-loss-hist": health.train_loss_hist,
            "train-confusion": [x for row in health.train_confusion for x in row],
            "train-embedding": [x for row in health.train_embedding for x in row]})


def trained_health(state: RecordDict, server_round: int) -> TrainHealth | None:
    """What this round's training measured, if the site trained this round (state never leaves the site)."""
    rec = records.read_state(state, records.HEALTH)
    if rec is None or int(rec["round"]) != server_round:
        return None
    flat = [float(x) for x in rec.get("train-confusion", [])]
    k = int(round(len(flat) ** 0.5))
    emb = [float(x) for x in rec.get("train-embedding", [])]
    dims = len(emb) // k if k else 0  # K rows of the encoder's width
    return TrainHealth([float(x) for x in rec["grad-norm-hist"]], float(rec["clipped-sum-norm"]),
                       float(rec["train-loss-sum"]), [float(x) for x in rec["train-loss-hist"]],
                       [flat[i * k:(i + 1) * k] for i in range(k)],
                       [emb[i * dims:(i + 1) * dims] for i in range(k)] if dims else [])


def coarse(seconds: float) -> float:
    # Timings leave a site rounded to 0.1 s: enough to see a straggler, too coarse to time single examples. (The
    # server sees when a reply arrives anyway; timing is outside the DP guarantee, README "Privacy".)
    return round(seconds, 1)


# ---------------------------------------------------------------------------------------------------------------------
# One site in one run.


@dataclass(frozen=True)
class TrainPlan:
    """What this site will actually run this round (an injected training fault changes it): σ, the schedule and
    the budget check all follow it, so no fault can make a site overspend."""

    train_cfg: TrainConfig
    train_data: Split
    noise_multiplier: float = 0.0  # 0 without DP
    schedule: privacy.Schedule | None = None  # None without DP
    entry: privacy.LedgerEntry | None = None  # the charge training will cost; None without DP
    problem: str = ""  # why the site may not spend `entry` ("" when it may)

    @property
    def sample_rate(self) -> float:
        return self.schedule.sample_rate if self.schedule else 0.0


@dataclass(frozen=True)
class SiteRun:
    """Everything a handler starts from: the run's config, this site's data, and its own policy and lifetime
    ledger (from its own folder, never the run config's) against this run's budget."""

    key: str  # the run config as sorted JSON: keys the per-process caches
    cfg: AppConfig
    data: SiteData
    acc: Accounts
    census: Census | None  # the released sizes; None when the site may not release them
    refused: str  # why the site refuses this run ("" when it takes part)
    features_dir: Path  # where the site keeps head mode's features (its own disk: client/state.features_folder)

    @classmethod
    def open(cls, run_config: dict, node_config: dict, run_id: str) -> SiteRun:
        """The site as a message of run `run_id` finds it; takes (and charges) its census if it has none yet.

        Raises:
            ValueError: a SiteDataError, or a policy file the site must fix.
        """
        key = json.dumps(run_config, sort_keys=True)
        cfg = _config(key)
        site = SiteIdentity.from_node_config(node_config)
        folder = site_folder(node_config, site.name)
        policy = load_policy(folder, node_config)
        data = _site_data(key, site, policy.allow_injected_faults)
        acc = Accounts(policy, Lifetime(folder, site.name, data.fingerprint), run_id, cfg.dp.target_epsilon,
                       cfg.dp.target_delta)
        why = admit(acc, cfg)
        released, why = (None, why) if why else take_census(acc, cfg, data)
        return cls(key, cfg, data, acc, released, why, features_folder(node_config, site.name))

    @property
    def name(self) -> str:
        return self.data.site.name

    @property
    def injected(self) -> dict[str, Fault]:
        """The faults this site applies: the run's at this site, if its policy allows them (else none)."""
        return self.cfg.faults_at(self.name) if self.acc.policy.allow_injected_faults else {}

    def model(self) -> nn.Module:
        """The process's cached model for this run (the caller loads the received weights into it)."""
        return _model(self.key)

    def splits(self, server_round: int) -> tuple[Split, Split]:
        """(train, validation) as round `server_round`'s model consumes them: token tensors, or the frozen features
        (head mode; LP-FT's probe rounds, whose adapters are still the identity)."""
        if self.cfg.on_features(server_round):
            return _features(self.key, self.data.site, self.acc.policy.allow_injected_faults, self.features_dir)
        return self.data.train, self.data.val

    def info(self, status: str = records.STATUS_OK, reason: str = "") -> records.SiteInfo:
        return site_info(self.data, self.census, status, reason, self.acc.lifetime.census_run())

    def epsilons(self) -> tuple[float, float, float, float]:
        return self.acc.epsilons() if self.cfg.dp.enabled else (NOT_PRIVATE,) * 4

    def planned_rounds(self, state: RecordDict, num_rounds: int) -> int:
        """The rounds this run's budget is planned for (the instruction's count, else num-server-rounds), fixed at
        the site's first message of the run."""
        return planned_rounds(state, num_rounds or self.cfg.num_server_rounds)

    def plan_training(self, state: RecordDict, server_round: int, num_rounds: int) -> TrainPlan:
        """This round's training: its config and data (after injected faults), σ, the schedule, and the charge,
        checked (not yet spent) against the run's budget and the site's policy."""
        injected = self.injected
        # As configured for this round (LP-FT's phases differ), with any injected training fault applied.
        train_cfg, train_data = faulty_training(injected, self.cfg.train_at(server_round),
                                                self.splits(server_round)[0])
        if not self.cfg.dp.enabled:
            return TrainPlan(train_cfg, train_data)
        n_public = scheduled_size(injected, self.census.n_train)  # the released size (an overfit fault's few)

        def schedule_at(r: int) -> privacy.Schedule:
            cfg_r, _ = faulty_training(injected, self.cfg.train_at(r), train_data)
            return privacy.dpsgd_schedule(n_public=n_public, batch_size=cfg_r.batch_size, local_epochs=cfg_r.local_epochs)

        schedule = schedule_at(server_round)
        rounds = self.planned_rounds(state, num_rounds)
        sigma = noise_multiplier(state, self.cfg, [schedule_at(r) for r in range(1, rounds + 1)], self.acc, self.name,
                                 rounds)
        entry = privacy.LedgerEntry(server_round, privacy.DPSGD, "subsampled-gaussian", sigma,
                                    schedule.sample_rate, schedule.steps, self.cfg.dp.max_grad_norm)
        # Checked first, then charged on the site's disk before training (`charge`).
        return TrainPlan(train_cfg, train_data, sigma, schedule, entry, self.acc.why_not(entry))

    def charge(self, entry: privacy.LedgerEntry | None) -> str:
        """Charge `entry` on the site's disk before the release is computed; "" when charged (or nothing to
        charge: no DP), else why not. The charge re-checks against the ledger as it is then (another run may be
        spending too), and a release that then fails stays charged (the safe side)."""
        return self.acc.spend(entry) if entry is not None else ""

    def summary_noise_multiplier(self, state: RecordDict, num_rounds: int) -> float:
        """σ of this round's summary release; 0 without DP, or with nothing to release (dp.diagnostics-share = 0)."""
        if not self.cfg.dp.enabled:
            return 0.0
        return release_noise_multiplier(self.cfg, self.planned_rounds(state, num_rounds)) or 0.0

    def summary_entry(self, server_round: int, sigma: float, cross_models: int) -> privacy.LedgerEntry:
        """The charge of a summary release (Δ grows with the local models of a cross-site evaluation)."""
        return privacy.LedgerEntry(server_round, privacy.SUMMARY, "gaussian", sigma, 1.0, 1,
                                   diagnostics.sensitivity(cross_models))

    def train_reply(self, arrays: dict[str, np.ndarray] | None, status: str = records.STATUS_OK, reason: str = "", *,
                    started: float, sigma: float = 0.0, q: float = 0.0, steps: int = 0, seconds: float = 0.0,
                    health_seconds: float = 0.0, n_claimed: int | None = None) -> records.TrainReply:
        """A train reply: the run's ε so far, the site's released size (or a bad_update fault's claim), timings."""
        total, eps_train, eps_diag, lifetime = self.epsilons()
        site = self.info(status, reason)
        dp = self.cfg.dp
        return records.TrainReply(
            site, arrays, site.n_train if n_claimed is None else n_claimed, total, dp.target_delta,
            dp.target_epsilon, sigma, q, steps, coarse(seconds), dp.max_grad_norm, eps_train, eps_diag,
            coarse(health_seconds), coarse(started), coarse(time.time()), lifetime, self.acc.policy.epsilon_cap)

    def eval_reply(self, status: str = records.STATUS_OK, reason: str = "", *, t0: float, started: float,
                   summary: Summary | None = None, sigma: float = 0.0, diag_seconds: float = 0.0) -> records.EvalReply:
        """An evaluate reply: the summary (noised, or exact without DP; None when withheld), ε so far, timings
        (`t0`: the handler's perf_counter at its start)."""
        total, eps_train, eps_diag, lifetime = self.epsilons()
        site = self.info(status, reason)
        return records.EvalReply(
            site, site.n_val, total, summary.blocks if summary else None, sigma,
            summary.sensitivity if summary else 0.0, summary.health_round if summary else 0, eps_train, eps_diag,
            coarse(time.perf_counter() - t0), coarse(diag_seconds), coarse(started), coarse(time.time()),
            summary.cross if summary else None, summary.cross_models if summary else (), lifetime,
            self.acc.policy.epsilon_cap)
