"""Flower glue at a site: Message + context.state -> site data (1) -> DP fine-tune (2) -> noised summary (3) -> Message."""

from __future__ import annotations

import os
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client import faults
from client.data import SiteIdentity
from client.site import SiteRun, save_health, trained_health
from client.state import persist
from client.summary import exact_summary, release
from client.train import train_local
from common import diagnostics, records
from common.config import PROJECT_ROOT
from common.log import get_logger
from common.model import load_trainable_state, trainable_state

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
                             reason=records.public_reason(f"{type(e).__name__}: {_public_message(e)}")),
                       reply_to=msg)


def _public_message(e: Exception) -> str:
    """What may leave the site of an exception: fedlens's own messages (written never to quote data; a
    SiteDataError's `public` text), but not a library's, which may carry data-dependent numbers (torch's shape
    errors name the batch, at q = 1 the site's exact size): those stay in the site's log."""
    public = getattr(e, "public", None)
    if public:
        return str(public)
    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    origin = Path(frames[-1].filename).resolve() if frames else PROJECT_ROOT
    ours = origin.is_relative_to(PROJECT_ROOT) and not {".venv", "site-packages"} & set(origin.parts)
    # A C-level torch error is raised in the calling (our) frame: recognise it by what such messages talk about.
    if ours and not _TENSOR_TALK.search(str(e)):
        return str(e)
    package = origin.parts[origin.parts.index("site-packages") + 1] if "site-packages" in origin.parts else "torch"
    return f"raised inside {package} (its message stays in the site's log: it may carry data-dependent sizes)"


_TENSOR_TALK = re.compile(r"shape|size|dimension|mat[12]|tensor|\d+x\d+", re.IGNORECASE)


app = ClientApp(mods=[audit, guard, persist])


def _open(msg: Message, context: Context) -> SiteRun:
    return SiteRun.open(dict(context.run_config), dict(context.node_config), records.unpack_run_id(msg.content))


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Who this site is and its released sizes (the census, released here once per dataset); loading the data
    here surfaces a bad file before round 1, under the site's name (an error reply would only carry a random node
    id)."""
    name = SiteIdentity.from_node_config(dict(context.node_config)).name
    try:
        site = _open(msg, context)
    except ValueError as e:  # a SiteDataError, or a policy file the site must fix
        get_logger().error("site %s: %s", name, getattr(e, "detail", str(e)))
        return records.reply(records.pack_hello(records.SiteInfo(name, 0, 0, records.STATUS_FAILED, str(e))), msg)
    status = records.STATUS_REFUSED if site.refused else records.STATUS_OK
    return records.reply(records.pack_hello(site.info(status, site.refused)), msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local DP fine-tuning from the received weights, charged to the site's ledger first."""
    started = time.time()
    site = _open(msg, context)
    server_round, num_rounds = records.unpack_instruction(msg.content)
    received = records.unpack_arrays(msg.content)
    prior = records.unpack_class_prior(msg.content, site.data.num_classes)
    model = site.model()
    load_trainable_state(model, received)

    def answer(arrays, status: str = records.STATUS_OK, reason: str = "", **numbers: Any) -> Message:  # noqa: ANN001
        return records.reply(records.pack_train_reply(site.train_reply(arrays, status, reason, started=started,
                                                                       **numbers)), msg)

    if site.refused:
        return answer(None, records.STATUS_REFUSED, site.refused)
    plan = site.plan_training(context.state, server_round, num_rounds)  # σ, schedule, the charge, checked
    shortcut = faults.misbehave(site.injected, server_round, received) if site.injected and not plan.problem else None
    if shortcut is not None:  # a free rider: sends something without training, spends nothing, and claims no σ
        return answer(shortcut)
    problem = plan.problem or site.charge(plan.entry)
    if problem:  # refuse, and say why: the server records it and goes on with the other sites
        return answer(None, records.STATUS_REFUSED, f"site {site.name}: {problem}; not training",
                      sigma=plan.noise_multiplier, q=plan.sample_rate)
    t0 = time.perf_counter()
    result = train_local(model, plan.train_data, train_cfg=plan.train_cfg, dp_cfg=site.cfg.dp,
                         noise_multiplier=plan.noise_multiplier, prior=None if prior is None else torch.tensor(prior),
                         seed=site.cfg.train.seed + server_round, schedule=plan.schedule)
    seconds = time.perf_counter() - t0
    if site.injected:
        faults.straggle(site.injected, time.time() - started)
    save_health(context.state, server_round, result.health)
    sent, n_claimed = trainable_state(model), None
    if "bad_update" in site.injected:
        sent, n_claimed = faults.break_reply(site.injected["bad_update"], server_round, sent, site.info().n_train)
    reply = answer(sent, sigma=plan.noise_multiplier, q=result.sample_rate, steps=result.steps, seconds=seconds,
                   health_seconds=result.health.seconds if result.health else 0.0, n_claimed=n_claimed)
    if "bad_update" in site.injected:
        faults.break_message(site.injected["bad_update"], server_round, reply.content)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on this site's data: its error summary, noised (charged first) or exact without DP."""
    t0, started = time.perf_counter(), time.time()
    site = _open(msg, context)
    server_round, num_rounds = records.unpack_instruction(msg.content)
    thresholds = records.unpack_thresholds(msg.content) or [diagnostics.DEFAULT_THRESHOLD] * site.data.num_classes
    model = site.model()
    global_arrays = records.unpack_arrays(msg.content)
    load_trainable_state(model, global_arrays)
    local_models = records.unpack_local_models(msg.content)  # empty unless the run asks for cross-site evaluation

    def answer(status: str = records.STATUS_OK, reason: str = "", **numbers: Any) -> Message:
        return records.reply(records.pack_eval_reply(site.eval_reply(status, reason, t0=t0, started=started,
                                                                     **numbers)), msg)

    if site.refused:
        return answer(records.STATUS_REFUSED, site.refused)
    sigma = site.summary_noise_multiplier(context.state, num_rounds)
    if site.cfg.dp.enabled:
        if sigma <= 0:  # configured, not a problem: the site answers ok and releases nothing
            return answer(reason="no summary released (dp.diagnostics-share = 0)")
        problem = site.charge(site.summary_entry(server_round, sigma, len(local_models)))  # before it is computed
        if problem:
            return answer(records.STATUS_REFUSED, f"site {site.name}: {problem}; summary withheld", sigma=sigma)
    train, val = site.splits(server_round)
    exact = exact_summary(model, train, val, num_classes=site.data.num_classes,
                          loss_clip=site.cfg.dp.loss_clip, thresholds=thresholds,
                          health=trained_health(context.state, server_round), health_round=server_round,
                          global_arrays=global_arrays, local_models=local_models)
    if not site.cfg.dp.enabled:
        # No privacy asked for, and the site's policy allows that: the exact summary goes out (the baseline a DP
        # run is compared with).
        reply = answer(summary=exact, diag_seconds=exact.seconds)
    else:
        t1 = time.perf_counter()
        noised = release(exact, noise_multiplier=sigma)
        reply = answer(summary=noised, sigma=sigma, diag_seconds=exact.seconds + time.perf_counter() - t1)
    if "bad_update" in site.injected:
        faults.break_message(site.injected["bad_update"], server_round, reply.content, "evaluate")
    return reply
