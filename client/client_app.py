"""Flower glue at a site: Message + context.state -> site data (1) -> DP fine-tune (2) -> noised summary (3) -> Message."""

from __future__ import annotations

import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client import census, privacy
from client.census import Census
from client.data import SiteData, SiteIdentity, load_site_data
from client.policy import Accounts, load_policy
from client.state import Lifetime, persist, site_folder
from client.summary import Summary, cross_site_counts, local_summary, release, with_cross_site
from client.train import TrainHealth, train_local
from common import diagnostics, faults, records
from common.config import AppConfig
from common.log import get_logger
from common.model import Encoded, build_model, load_tokenizer, load_trainable_state, trainable_state

NOT_PRIVATE = -1.0  # the ε a site reports when dp.enabled is false
AUDIT_ENV = "FEDLENS_AUDIT_DIR"


def audit(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Keep a byte-exact copy of every message this site sends, when its operator sets $FEDLENS_AUDIT_DIR.

    A site's data officer can then check for themselves what left the site (tests scan these copies for text).
    """
    reply = call_next(msg, context)
    folder = os.environ.get(AUDIT_ENV)
    if folder:
        from flwr.common.serde import message_to_proto

        site = re.sub(r"[^A-Za-z0-9._-]", "_", SiteIdentity.from_node_config(dict(context.node_config)).name)
        out = Path(folder) / site
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{time.time_ns()}-{msg.metadata.message_type}.pb").write_bytes(
                message_to_proto(reply).SerializeToString())
        except OSError:  # outside `guard`: a copy that cannot be kept must not send the site's paths off-site
            get_logger().exception("site %s: the audit copy of a reply could not be written to %s", site, out)
    return reply


def guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Whatever goes wrong at a site, the server gets a short reason with no paths (the exception's type and
    message, through records.public_reason) and the site's own log keeps the traceback. Flower would otherwise
    send `str(exception)` as it is."""
    try:
        return call_next(msg, context)
    except Exception as e:  # noqa: BLE001
        name = SiteIdentity.from_node_config(dict(context.node_config)).name
        get_logger().exception("site %s: %s failed", name, msg.metadata.message_type)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=records.public_reason(f"{type(e).__name__}: {getattr(e, 'public', e)}")),
                       reply_to=msg)


app = ClientApp(mods=[audit, guard, persist])


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


@lru_cache(maxsize=2)
def _model(run_config_json: str):  # noqa: ANN202
    # Safe to reuse across messages and sites: every trainable weight is overwritten by the received ones.
    cfg = _config(run_config_json)
    return build_model(cfg.model, cfg.data.labels, seed=cfg.train.seed)


def _info(data: SiteData, census_: Census | None, status: str = records.STATUS_OK, reason: str = "",
          paid_by: str = "") -> records.SiteInfo:
    """Who this site is and its *released* sizes (the census; exact only in a run without DP)."""
    if census_ is None:
        return records.SiteInfo(data.site.name, 0, 0, status, reason)
    n_train, n_val = census_.sizes()
    return records.SiteInfo(data.site.name, n_train, n_val, status, reason, census_.train_labels, census_.n_val,
                            census_.count_std(), paid_by)


def _admit(acc: Accounts, cfg: AppConfig) -> str:
    """Why this site takes no part in this run at all, by its own policy ("" when it does)."""
    if faults.at_site(faults.parse(cfg.faults), acc.lifetime.site) and not acc.policy.allow_injected_faults:
        return ("the run injects faults at this site, which its policy does not allow (allow-injected-faults = false: "
                "only simulated sites change their data for a scenario)")
    if not cfg.dp.enabled:
        return "" if acc.policy.allow_non_dp else ("this site takes part in no run without DP (its policy: "
                                                   "allow-non-dp = false)")
    if cfg.dp.target_delta > acc.site_delta():
        return f"dp.target-delta = {cfg.dp.target_delta:g} is above this site's δ = {acc.site_delta():g} (its policy)"
    return ""


def _census(acc: Accounts, cfg: AppConfig, data: SiteData) -> tuple[Census | None, str]:
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


def _open(context: Context, msg: Message) -> tuple[str, AppConfig, SiteData, Accounts, Census | None, str]:
    """Everything a handler starts from: the run's config, this site's data, and its own policy and lifetime
    ledger (from its own folder, never the run config's) against this run's budget. The last item is why the site
    refuses this run ("" when it takes part)."""
    key = json.dumps(dict(context.run_config), sort_keys=True)
    cfg, node_config = _config(key), dict(context.node_config)
    site = SiteIdentity.from_node_config(node_config)
    folder = site_folder(node_config, site.name)
    policy = load_policy(folder, node_config)
    data = _site_data(key, site, policy.allow_injected_faults)
    acc = Accounts(policy, Lifetime(folder, site.name, data.fingerprint), records.unpack_run_id(msg.content),
                   cfg.dp.target_epsilon, cfg.dp.target_delta)
    why = _admit(acc, cfg)
    released, why = (None, why) if why else _census(acc, cfg, data)
    return key, cfg, data, acc, released, why


def _epsilons(acc: Accounts, cfg: AppConfig) -> tuple[float, float, float, float]:
    return acc.epsilons() if cfg.dp.enabled else (NOT_PRIVATE,) * 4


def _plan_rounds(context: Context, num_rounds: int) -> int:
    """The number of rounds the budget is planned for: fixed at a site's first message of the run."""
    if "plan" not in context.state.config_records:
        context.state["plan"] = ConfigRecord({"rounds": num_rounds})
    return int(context.state.config_records["plan"]["rounds"])


def _release_noise_multiplier(cfg: AppConfig, rounds: int) -> float | None:
    return privacy.release_noise_multiplier(configured=cfg.dp.release_noise_multiplier,
                                            diagnostics_share=cfg.dp.diagnostics_share,
                                            target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.target_delta,
                                            rounds=rounds)


def _noise_multiplier(context: Context, cfg: AppConfig, schedule: privacy.Schedule, acc: Accounts, name: str,
                      num_rounds: int) -> float:
    """σ of DP-SGD: configured, or calibrated once (then kept in state) for all planned rounds of this site, after
    what the run already spent (its census)."""
    if cfg.dp.noise_multiplier > 0:
        return cfg.dp.noise_multiplier
    if "dp" in context.state.config_records:
        return float(context.state.config_records["dp"]["noise-multiplier"])
    release_sigma = _release_noise_multiplier(cfg, num_rounds)
    sigma = privacy.calibrate_noise_multiplier(target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.target_delta,
                                               sample_rate=schedule.sample_rate, steps_per_round=schedule.steps,
                                               rounds=num_rounds, release_noise_multiplier=release_sigma,
                                               spent=acc.run_entries())
    context.state["dp"] = ConfigRecord({"noise-multiplier": sigma})
    get_logger().info("site %s: DP-SGD σ = %.4f, summary σ = %s for ε = %s over %d rounds", name, sigma,
                      f"{release_sigma:.3f}" if release_sigma else "none", cfg.dp.target_epsilon, num_rounds)
    return sigma


def _save_health(context: Context, server_round: int, health: TrainHealth | None) -> None:
    if health is not None:
        context.state["health"] = ConfigRecord({
            "round": server_round, "grad-norm-hist": health.grad_norm_hist, "clipped-sum-norm": health.clipped_sum_norm,
            "train-loss-sum": health.train_loss_sum, "train-loss-hist": health.train_loss_hist})


def _health(context: Context, server_round: int) -> TrainHealth | None:
    """What this round's training measured, if the site trained this round (state never leaves the site)."""
    rec = context.state.config_records.get("health")
    if rec is None or int(rec["round"]) != server_round:
        return None
    return TrainHealth([float(x) for x in rec["grad-norm-hist"]], float(rec["clipped-sum-norm"]),
                       float(rec["train-loss-sum"]), [float(x) for x in rec["train-loss-hist"]])


def _misbehave(injected: dict[str, faults.Fault], server_round: int, received) -> object:  # noqa: ANN001
    """Injected crash / straggler / free-rider behaviour; returns the weights a free rider sends, else None."""
    if "crash" in injected and server_round >= int(injected["crash"]["round"]):
        raise RuntimeError(f"site {injected['crash'].site}: injected crash at round {server_round}")
    if "straggler" in injected:
        time.sleep(float(injected["straggler"]["seconds"]))
    if "free_rider" in injected:
        if injected["free_rider"]["mode"] == "random":
            rng = np.random.default_rng(server_round)
            return OrderedDict((k, rng.normal(0.0, float(v.std()) or 0.02, v.shape).astype(v.dtype))
                               for k, v in received.items())
        return received  # echo: the weights it received, unchanged
    return None


def _faulty_training(injected: dict[str, faults.Fault], cfg: AppConfig, data: SiteData):  # noqa: ANN202
    """Injected training faults: a learning rate blown up, or many epochs on a few examples."""
    train_cfg, train_data = cfg.train, data.train
    if "lr_blowup" in injected:
        factor = float(injected["lr_blowup"]["factor"])
        train_cfg = replace(train_cfg, lr=train_cfg.lr * factor, head_lr=train_cfg.head_lr * factor)
    if "overfit" in injected:
        n = int(injected["overfit"]["examples"])
        train_cfg = replace(train_cfg, local_epochs=int(injected["overfit"]["epochs"]))
        train_data = Encoded(data.train.input_ids[:n], data.train.attention_mask[:n], data.train.labels[:n])
    return train_cfg, train_data


def _break_reply(fault: faults.Fault, server_round: int, arrays, num_examples: int):  # noqa: ANN001, ANN202
    """An injected bad_update: the trained weights (and example count) broken the way a buggy or hostile site
    would break them."""
    if server_round < int(fault["round"]):
        return arrays, num_examples
    mode = fault["mode"]
    if mode == "examples":
        return arrays, 10**9
    out = OrderedDict(arrays)
    key = next(iter(out))
    if mode in ("nan", "inf"):
        out[key] = np.full_like(out[key], np.nan if mode == "nan" else np.inf)
    elif mode == "shape":
        out[key] = np.zeros((*out[key].shape, 2), dtype=out[key].dtype)
    else:  # scale
        out = OrderedDict((k, (v * np.float32(1e30)).astype(v.dtype)) for k, v in out.items())
    return out, num_examples


def _coarse(seconds: float) -> float:
    # Timings leave a site rounded to 0.1 s: enough to see a straggler, too coarse to time single examples. (The
    # server sees when a reply arrives anyway; timing is outside the DP guarantee, README "Privacy".)
    return round(seconds, 1)


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Who this site is and its released sizes (the census, released here once per dataset); loading the data
    here surfaces a bad file before round 1, under the site's name (an error reply would only carry a random node
    id)."""
    name = SiteIdentity.from_node_config(dict(context.node_config)).name
    try:
        _, _, data, acc, released, why = _open(context, msg)
    except ValueError as e:  # a SiteDataError, or a policy file the site must fix
        get_logger().error("site %s: %s", name, getattr(e, "detail", str(e)))
        return records.reply(records.pack_hello(records.SiteInfo(name, 0, 0, records.STATUS_FAILED, str(e))), msg)
    status = records.STATUS_REFUSED if why else records.STATUS_OK
    return records.reply(records.pack_hello(_info(data, released, status, why, acc.lifetime.census_run())), msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    key, cfg, data, acc, released, why = _open(context, msg)
    server_round, num_rounds = records.unpack_instruction(msg.content)
    received = records.unpack_arrays(msg.content)
    prior = records.unpack_class_prior(msg.content, data.num_classes)
    model = _model(key)
    load_trainable_state(model, received)

    def answer(arrays, status: str = records.STATUS_OK, reason: str = "", sigma: float = 0.0,  # noqa: ANN001
               q: float = 0.0, steps: int = 0, seconds: float = 0.0, health_seconds: float = 0.0,
               n_claimed: int | None = None) -> Message:
        total, eps_train, eps_diag, lifetime = _epsilons(acc, cfg)
        info = _info(data, released, status, reason, acc.lifetime.census_run())
        return records.reply(records.pack_train_reply(records.TrainReply(
            info, arrays, info.n_train if n_claimed is None else n_claimed, total, cfg.dp.target_delta,
            cfg.dp.target_epsilon, sigma, q, steps, _coarse(seconds), cfg.dp.max_grad_norm, eps_train, eps_diag,
            _coarse(health_seconds), _coarse(started), _coarse(time.time()), lifetime,
            acc.policy.epsilon_cap)), msg)

    if why:
        return answer(None, records.STATUS_REFUSED, why)
    # What this site will actually run (an injected training fault changes it): σ, the schedule and the budget
    # check all follow it, so no fault can make a site overspend.
    injected = faults.at_site(faults.parse(cfg.faults), data.site.name) if acc.policy.allow_injected_faults else {}
    train_cfg, train_data = _faulty_training(injected, cfg, data) if injected else (cfg.train, data.train)
    sigma, schedule, problem = 0.0, None, ""
    if cfg.dp.enabled:
        # The schedule follows the released size (an injected overfit fault's, on its few examples: the smaller of
        # their configured count and the released size, public both).
        n_public = (min(float(injected["overfit"]["examples"]), released.n_train) if "overfit" in injected
                    else released.n_train)
        schedule = privacy.dpsgd_schedule(n_public=n_public, batch_size=train_cfg.batch_size,
                                          local_epochs=train_cfg.local_epochs)
        sigma = _noise_multiplier(context, cfg, schedule, acc, data.site.name,
                                  _plan_rounds(context, num_rounds or cfg.num_server_rounds))
        planned = privacy.LedgerEntry(server_round, privacy.DPSGD, "subsampled-gaussian", sigma,
                                      schedule.sample_rate, schedule.steps, cfg.dp.max_grad_norm)
        # Checked first, then charged on the site's disk before training: the charge re-checks against the ledger
        # as it is then (another run may be spending too), and training that fails stays charged (the safe side).
        problem = acc.why_not(planned)
    if injected and not problem:
        shortcut = _misbehave(injected, server_round, received)
        if shortcut is not None:  # a free rider: sends something without training, and spends nothing
            return answer(shortcut, sigma=sigma, q=schedule.sample_rate if schedule else 0.0)
    if cfg.dp.enabled:
        problem = problem or acc.spend(planned)
        if problem:
            # Refuse, and say why: the server records it and goes on with the other sites.
            return answer(None, records.STATUS_REFUSED, f"site {data.site.name}: {problem}; not training", sigma,
                          schedule.sample_rate)
    t0 = time.perf_counter()
    result = train_local(model, train_data, train_cfg=train_cfg, dp_cfg=cfg.dp, noise_multiplier=sigma,
                         prior=None if prior is None else torch.tensor(prior),
                         seed=cfg.train.seed + server_round, schedule=schedule)
    seconds = time.perf_counter() - t0
    _save_health(context, server_round, result.health)
    sent, n_claimed = trainable_state(model), None
    if "bad_update" in injected:
        sent, n_claimed = _break_reply(injected["bad_update"], server_round, sent, _info(data, released).n_train)
    return answer(sent, sigma=sigma, q=result.sample_rate, steps=result.steps, seconds=seconds,
                  health_seconds=result.health.seconds if result.health else 0.0, n_claimed=n_claimed)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    t0, started = time.perf_counter(), time.time()
    key, cfg, data, acc, released, why = _open(context, msg)
    server_round, num_rounds = records.unpack_instruction(msg.content)
    thresholds = records.unpack_thresholds(msg.content) or [diagnostics.DEFAULT_THRESHOLD] * data.num_classes
    model = _model(key)
    global_arrays = records.unpack_arrays(msg.content)
    load_trainable_state(model, global_arrays)
    local_models = records.unpack_local_models(msg.content)  # empty unless the run asks for cross-site evaluation

    def answer(status: str = records.STATUS_OK, reason: str = "", summary: Summary | None = None,
               sigma: float = 0.0, diag_seconds: float = 0.0) -> Message:
        total, eps_train, eps_diag, lifetime = _epsilons(acc, cfg)
        info = _info(data, released, status, reason, acc.lifetime.census_run())
        out = records.EvalReply(
            info, info.n_val, total, summary.blocks if summary else None, sigma,
            summary.sensitivity if summary else 0.0, summary.health_round if summary else 0, eps_train, eps_diag,
            _coarse(time.perf_counter() - t0), _coarse(diag_seconds), _coarse(started), _coarse(time.time()),
            summary.cross if summary else None, summary.cross_models if summary else (), lifetime,
            acc.policy.epsilon_cap)
        return records.reply(records.pack_eval_reply(out), msg)

    if why:
        return answer(records.STATUS_REFUSED, why)
    sigma, entry = 0.0, None
    if cfg.dp.enabled:
        sigma = _release_noise_multiplier(cfg, _plan_rounds(context, num_rounds or cfg.num_server_rounds)) or 0.0
        if sigma <= 0:
            # Configured, not a problem: the site answers ok and releases nothing.
            return answer(reason="no summary released (dp.diagnostics-share = 0)")
        entry = privacy.LedgerEntry(server_round, privacy.SUMMARY, "gaussian", sigma, 1.0, 1,
                                    diagnostics.sensitivity(len(local_models)))
        problem = acc.spend(entry)  # charged before it is computed (see train)
        if problem:
            return answer(records.STATUS_REFUSED, f"site {data.site.name}: {problem}; summary withheld", sigma=sigma)

    exact = local_summary(model, data.train, data.val, num_classes=data.num_classes, loss_clip=cfg.dp.loss_clip,
                          thresholds=thresholds, health=_health(context, server_round), health_round=server_round)
    if local_models:
        t_cross = time.perf_counter()
        counts = cross_site_counts(model, local_models, data.val)
        load_trainable_state(model, global_arrays)  # the cached model must hold the global weights again
        exact = with_cross_site(exact, tuple(local_models), counts, time.perf_counter() - t_cross)
    if not cfg.dp.enabled:
        # No privacy asked for, and the site's policy allows that: the exact summary goes out (the baseline a DP
        # run is compared with).
        return answer(summary=exact, diag_seconds=exact.seconds)
    t1 = time.perf_counter()
    noised = release(exact, noise_multiplier=sigma)
    return answer(summary=noised, sigma=sigma, diag_seconds=exact.seconds + time.perf_counter() - t1)
