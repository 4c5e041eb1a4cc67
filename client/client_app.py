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
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import privacy
from client.data import Encoded, SiteData, SiteIdentity, load_site_data
from client.state import persist
from client.summary import cross_site_counts, local_summary, release, with_cross_site
from client.train import TrainHealth, prior_from_counts, train_local
from common import diagnostics, faults, records
from common.config import AppConfig, TrainConfig
from common.datasets import SiteDataError
from common.log import get_logger
from common.model import build_model, load_tokenizer, load_trainable_state, trainable_state

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
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{time.time_ns()}-{msg.metadata.message_type}.pb").write_bytes(
            message_to_proto(reply).SerializeToString())
    return reply


app = ClientApp(mods=[audit, persist])


@lru_cache(maxsize=2)
def _config(run_config_json: str) -> AppConfig:
    return AppConfig.from_run_config(json.loads(run_config_json))


@lru_cache(maxsize=8)
def _site_data(run_config_json: str, site: SiteIdentity) -> SiteData:
    # A simulation actor hosts many sites in turn; loading and tokenising once per site spares every round.
    cfg = _config(run_config_json)
    return load_site_data(cfg, site, _tokenizer(run_config_json))


@lru_cache(maxsize=2)
def _tokenizer(run_config_json: str):  # noqa: ANN202
    return load_tokenizer(_config(run_config_json).model)


@lru_cache(maxsize=2)
def _model(run_config_json: str):  # noqa: ANN202
    # Safe to reuse across messages and sites: every trainable weight is overwritten by the received ones.
    cfg = _config(run_config_json)
    return build_model(cfg.model, cfg.data.labels, seed=cfg.train.seed)


def _setup(context: Context) -> tuple[str, AppConfig, SiteIdentity, SiteData]:
    key = json.dumps(dict(context.run_config), sort_keys=True)
    site = SiteIdentity.from_node_config(dict(context.node_config))
    return key, _config(key), site, _site_data(key, site)


def _info(data: SiteData, status: str = records.STATUS_OK, reason: str = "") -> records.SiteInfo:
    return records.SiteInfo(data.site.name, len(data.train), len(data.val), status, reason)


def _ledger(context: Context) -> list[privacy.LedgerEntry]:
    if records.LEDGER not in context.state.config_records:
        return []
    return privacy.from_state({k: list(v) for k, v in context.state.config_records[records.LEDGER].items()})


def _save_ledger(context: Context, entries: list[privacy.LedgerEntry]) -> None:
    context.state[records.LEDGER] = ConfigRecord(privacy.to_state(entries))


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


def _noise_multiplier(context: Context, cfg: AppConfig, train_cfg: TrainConfig, n_train: int, name: str,
                      num_rounds: int) -> float:
    """σ of DP-SGD: configured, or calibrated once (then kept in state) for all planned rounds of this site."""
    if cfg.dp.noise_multiplier > 0:
        return cfg.dp.noise_multiplier
    if "dp" in context.state.config_records:
        return float(context.state.config_records["dp"]["noise-multiplier"])
    plan = privacy.dpsgd_schedule(n_public=n_train, batch_size=train_cfg.batch_size,
                                  local_epochs=train_cfg.local_epochs)
    q, steps = plan.sample_rate, plan.steps
    release_sigma = _release_noise_multiplier(cfg, num_rounds)
    sigma = privacy.calibrate_noise_multiplier(target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.target_delta,
                                               sample_rate=q, steps_per_round=steps, rounds=num_rounds,
                                               release_noise_multiplier=release_sigma)
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


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Who this site is and how much data it holds; loading the data here surfaces a bad file before round 1,
    under the site's name (an error reply would only carry a random node id)."""
    try:
        _, _, _, data = _setup(context)
    except SiteDataError as e:
        name = SiteIdentity.from_node_config(dict(context.node_config)).name
        return records.reply(records.pack_hello(records.SiteInfo(name, 0, 0, records.STATUS_FAILED, str(e))), msg)
    return records.reply(records.pack_hello(_info(data)), msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    key, cfg, _, data = _setup(context)
    server_round, num_rounds = records.unpack_instruction(msg.content)
    received = records.unpack_arrays(msg.content)
    model = _model(key)
    load_trainable_state(model, received)
    ledger = _ledger(context)
    delta = cfg.dp.target_delta

    # What this site will actually run (an injected training fault changes it): σ, the schedule and the budget
    # check all follow it, so no fault can make a site overspend.
    injected = faults.at_site(faults.parse(cfg.faults), data.site.name)
    train_cfg, train_data = _faulty_training(injected, cfg, data) if injected else (cfg.train, data.train)
    sigma, q, schedule = 0.0, 0.0, None
    if cfg.dp.enabled:
        sigma = _noise_multiplier(context, cfg, train_cfg, len(train_data), data.site.name,
                                  _plan_rounds(context, num_rounds or cfg.num_server_rounds))
        schedule = privacy.dpsgd_schedule(n_public=len(train_data), batch_size=train_cfg.batch_size,
                                          local_epochs=train_cfg.local_epochs)
        q, steps = schedule.sample_rate, schedule.steps
        planned = privacy.LedgerEntry(server_round, privacy.DPSGD, "subsampled-gaussian", sigma, q, steps,
                                      cfg.dp.max_grad_norm)
        problem = privacy.budget_check(ledger, planned, budget=cfg.dp.target_epsilon, delta=delta)
        if problem:
            # Refuse, and say why: the server records it and goes on with the other sites.
            reason = f"site {data.site.name}: {problem}; not training"
            total, eps_train, eps_diag = privacy.epsilon_split(ledger, delta)
            return records.reply(records.pack_train_reply(records.TrainReply(
                _info(data, records.STATUS_REFUSED, reason), None, len(data.train), total, delta,
                cfg.dp.target_epsilon, sigma, q, 0, 0.0, cfg.dp.max_grad_norm, eps_train, eps_diag)), msg)

    if injected:
        shortcut = _misbehave(injected, server_round, received)
        if shortcut is not None:  # a free rider: sends something without training
            return records.reply(records.pack_train_reply(records.TrainReply(
                _info(data), shortcut, len(data.train),
                privacy.epsilon(ledger, delta) if cfg.dp.enabled else NOT_PRIVATE, delta, cfg.dp.target_epsilon,
                sigma, q, 0, 0.0, cfg.dp.max_grad_norm, started_at=started, ended_at=time.time())), msg)
    t0 = time.perf_counter()
    result = train_local(model, train_data, train_cfg=train_cfg, dp_cfg=cfg.dp, noise_multiplier=sigma,
                         prior=prior_from_counts(data.label_counts()), seed=cfg.train.seed + server_round,
                         schedule=schedule)
    seconds = time.perf_counter() - t0
    total, eps_train, eps_diag = NOT_PRIVATE, NOT_PRIVATE, NOT_PRIVATE
    _save_health(context, server_round, result.health)
    if cfg.dp.enabled:
        ledger.append(privacy.LedgerEntry(server_round, privacy.DPSGD, "subsampled-gaussian", sigma,
                                          result.sample_rate, result.steps, cfg.dp.max_grad_norm))
        _save_ledger(context, ledger)
        total, eps_train, eps_diag = privacy.epsilon_split(ledger, delta)
    sent, num_examples = trainable_state(model), len(data.train)
    if "bad_update" in injected:
        sent, num_examples = _break_reply(injected["bad_update"], server_round, sent, num_examples)
    reply = records.TrainReply(_info(data), sent, num_examples, total, delta,
                               cfg.dp.target_epsilon, sigma, result.sample_rate, result.steps, seconds,
                               cfg.dp.max_grad_norm, eps_train, eps_diag,
                               result.health.seconds if result.health else 0.0, started, time.time())
    return records.reply(records.pack_train_reply(reply), msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    t0, started = time.perf_counter(), time.time()
    key, cfg, _, data = _setup(context)
    server_round, num_rounds = records.unpack_instruction(msg.content)
    thresholds = records.unpack_thresholds(msg.content) or [diagnostics.DEFAULT_THRESHOLD] * data.num_classes
    model = _model(key)
    global_arrays = records.unpack_arrays(msg.content)
    load_trainable_state(model, global_arrays)
    local_models = records.unpack_local_models(msg.content)  # empty unless the run asks for cross-site evaluation
    ledger = _ledger(context)
    delta = cfg.dp.target_delta

    def withheld(status: str, reason: str, sigma: float) -> Message:
        total, eps_train, eps_diag = privacy.epsilon_split(ledger, delta)
        out = records.EvalReply(_info(data, status, reason), len(data.val), total, None, sigma, 0.0, 0, eps_train,
                                eps_diag)
        return records.reply(records.pack_eval_reply(out), msg)

    sigma = 0.0
    if cfg.dp.enabled:
        sigma = _release_noise_multiplier(cfg, _plan_rounds(context, num_rounds or cfg.num_server_rounds)) or 0.0
        if sigma <= 0:
            # Configured, not a problem: the site answers ok and releases nothing.
            return withheld(records.STATUS_OK, "no summary released (dp.diagnostics-share = 0)", 0.0)
        entry = privacy.LedgerEntry(server_round, privacy.SUMMARY, "gaussian", sigma, 1.0, 1,
                                    diagnostics.sensitivity(len(local_models)))
        problem = privacy.budget_check(ledger, entry, budget=cfg.dp.target_epsilon, delta=delta)
        if problem:
            return withheld(records.STATUS_REFUSED, f"site {data.site.name}: {problem}; summary withheld", sigma)

    exact = local_summary(model, data.train, data.val, num_classes=data.num_classes, loss_clip=cfg.dp.loss_clip,
                          thresholds=thresholds, health=_health(context, server_round), health_round=server_round)
    if local_models:
        t_cross = time.perf_counter()
        counts = cross_site_counts(model, local_models, data.val)
        load_trainable_state(model, global_arrays)  # the cached model must hold the global weights again
        exact = with_cross_site(exact, tuple(local_models), counts, time.perf_counter() - t_cross)
    if not cfg.dp.enabled:
        # No privacy asked for: the exact summary goes out (the baseline a DP run is compared with).
        out = records.EvalReply(_info(data), len(data.val), NOT_PRIVATE, exact.blocks, 0.0, 0.0, exact.health_round,
                                NOT_PRIVATE, NOT_PRIVATE, time.perf_counter() - t0, exact.seconds, started, time.time(),
                                exact.cross, exact.cross_models)
        return records.reply(records.pack_eval_reply(out), msg)

    t1 = time.perf_counter()
    noised = release(exact, noise_multiplier=sigma)
    ledger.append(entry)
    _save_ledger(context, ledger)
    total, eps_train, eps_diag = privacy.epsilon_split(ledger, delta)
    diag_seconds = exact.seconds + time.perf_counter() - t1
    out = records.EvalReply(_info(data), len(data.val), total, noised.blocks, sigma, noised.sensitivity,
                            noised.health_round, eps_train, eps_diag, time.perf_counter() - t0, diag_seconds,
                            started, time.time(), noised.cross, noised.cross_models)
    return records.reply(records.pack_eval_reply(out), msg)
