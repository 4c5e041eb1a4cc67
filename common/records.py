"""Between the sites (steps 1-3) and the server (step 4): the message format, every record key and pack / unpack
of each message; and the name of every record a site keeps in its `context.state` (which never leaves it).

This is the only module in common/ that imports Flower. FedAvg-style averaging never sees the summary or the site
info: they travel in their own ConfigRecords, and the server reads them through `unpack_*`.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.diagnostics import BLOCKS, EMBEDDING, MAX_EMBEDDING_DIMS

MAX_CLASSES = 1000  # a summary over more classes than this is malformed (its blocks grow with K²)

# Record names inside a message's RecordDict.
ARRAYS = "arrays"  # the trainable weights (LoRA adapters + head, or all weights)
CONFIG = "config"  # server -> site instructions
METRICS = "metrics"  # numbers only: num-examples, epsilon, ...
SITE = "site"  # who answered and whether it did the work
SUMMARY = "summary"  # the noised error summary of an evaluation
LOCAL_MODEL = "local-model:"  # + site name: that site's local model, sent for cross-site evaluation (opt-in)

# Keys.
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-server-rounds"
RUN_ID = "run-id"  # the fedlens run (stable across a resume; Flower's run id is not): keys a site's saved state
THRESHOLDS = "cl-thresholds"  # per-class confident-learning thresholds (public: from earlier noised summaries)
CLASS_PRIOR = "class-prior"  # the loss's class prior (public: released label counts, the server's data or config)
STATUS_OK, STATUS_REFUSED, STATUS_FAILED = "ok", "refused", "failed"
STATUSES = (STATUS_OK, STATUS_REFUSED, STATUS_FAILED)

# Bounds on what a reply may declare (anything beyond is malformed, never a crash): no site holds more rows or takes
# more steps than this, and a name or a reason is short text.
MAX_COUNT = 10**9
MAX_NAME = 63
# A site's name: what the store, checkpoints (one file a site) and dashboard key it by. Letters, digits, '.', '_' and
# '-' only, so that no two names map to one file and no look-alike passes for another; `node-<id>` is kept for the
# nodes that have not named themselves.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
PLACEHOLDER = re.compile(r"^node-[0-9]+$")
MAX_REASON = 400
NPY_HEADER = 4096  # bytes np.save may add before an array's values (its header is at most a few hundred)

# ConfigRecords in a site's context.state (client/site.py, client/state.py): they stay at the site.
PLAN = "plan"  # {"rounds"}: the rounds the run's budget is planned for, fixed at the site's first message
DP = "dp"  # {"noise-multiplier"}: DP-SGD σ, calibrated once for all planned rounds
HEALTH = "health"  # what the round's training measured, for the evaluation's summary (client/train.TrainHealth)
SAVED = (PLAN, DP, HEALTH)  # the site's run state: saved to its disk after every message, restored on a resume
RUN_MARK = "fedlens-run"  # {"run-id"}: which fedlens run the restored records belong to

# What leaves a site, field by field. Every value a site sends is one of these (tests/client/test_client_app.py
# walks every record and key of every hello, train and evaluate reply against OUTBOUND; a new field fails it):
ECHO = "public config echo"  # what the run config, the site's public name or its own public policy says
WEIGHTS = "DP-SGD weights"  # the trainable weights after noised steps (exact only when the run has no DP)
NOISED = "noised, charged release"  # a Gaussian release in the site's ledger (census or summary)
PUBLIC = "public metadata"  # a function of released values and public config only (add/remove: no exact size)
STATUS = "operational status"  # ok / refused / failed and why: refusals follow public ε; no data values, no paths
TIMING = "coarse timing"  # compute seconds rounded to 0.1 s; a side channel the server also sees, outside DP
OUTBOUND: dict[str, dict[str, str] | str] = {
    SITE: {"name": ECHO, "n-train": PUBLIC, "n-val": PUBLIC, "status": STATUS, "reason": STATUS,
           "census-labels": NOISED, "census-n-val": NOISED, "census-noise": PUBLIC, "census-run": ECHO},
    METRICS: {NUM_EXAMPLES: PUBLIC, "epsilon": PUBLIC, "delta": ECHO, "epsilon-budget": ECHO,
              "noise-multiplier": PUBLIC, "sample-rate": PUBLIC, "steps": PUBLIC, "seconds": TIMING,
              "sensitivity": ECHO, "epsilon-training": PUBLIC, "epsilon-diagnostics": PUBLIC,
              "diagnostics-seconds": TIMING, "started-at": TIMING, "ended-at": TIMING, "epsilon-lifetime": PUBLIC,
              "epsilon-cap": ECHO},
    ARRAYS: WEIGHTS,  # every key: a trainable weight
    SUMMARY: {**{b.name.replace("_", "-"): NOISED for b in BLOCKS}, "cross-correct": NOISED, "num-classes": ECHO,
              "embedding-dims": ECHO, "mechanism": ECHO, "noise-multiplier": PUBLIC, "sensitivity": PUBLIC, "health-round": PUBLIC,
              "cross-models": ECHO},
}


@dataclass(frozen=True)
class SiteInfo:
    """Who answered, its released sizes, and whether it did the work. Sizes are the site's census (noised under DP,
    client/census.py), which every reply repeats so that a site joining late is known from its first reply."""

    name: str
    n_train: int  # released train size (census, rounded)
    n_val: int  # released validation size
    status: str = STATUS_OK
    reason: str = ""
    census_labels: tuple[float, ...] = ()  # released train examples per label (noised cells; empty: none yet)
    census_n_val: float = 0.0
    census_noise: float = 0.0  # std of each census value (σ·Δ, Δ = 1); 0 = exact (a run without DP)
    census_run: str = ""  # the fedlens run that paid for the census (its ledger holds the entry)


@dataclass(frozen=True)
class TrainReply:
    site: SiteInfo
    arrays: OrderedDict[str, np.ndarray] | None  # None when the site refused
    num_examples: int
    epsilon: float
    delta: float
    epsilon_budget: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    seconds: float
    sensitivity: float = 1.0  # the clip C the DP-SGD noise was scaled to
    epsilon_training: float = 0.0  # ε of the site's DP-SGD segments alone (cumulative)
    epsilon_diagnostics: float = 0.0  # ε of its released summaries alone (cumulative)
    diagnostics_seconds: float = 0.0  # of `seconds`, spent measuring DP health
    started_at: float = 0.0  # wall clock (s since epoch) when the site began / finished handling the message
    ended_at: float = 0.0
    epsilon_lifetime: float = 0.0  # every release ever made from this site's data, all runs, at the site's δ
    epsilon_cap: float = 0.0  # the site's own lifetime cap (its policy)


@dataclass(frozen=True)
class EvalReply:
    site: SiteInfo
    num_examples: int  # validation examples
    epsilon: float  # cumulative, after this release
    blocks: dict[str, np.ndarray] | None  # the noised summary (common/diagnostics.BLOCKS); None when withheld
    noise_multiplier: float  # σ of the release; 0 = exact (dp.enabled false)
    sensitivity: float
    health_round: int = 0  # round of the training the gradient blocks describe; 0 = none
    epsilon_training: float = 0.0
    epsilon_diagnostics: float = 0.0
    seconds: float = 0.0  # the site's compute for this evaluation (model, summary, release)
    diagnostics_seconds: float = 0.0  # of `seconds`, spent on the summary beyond plain evaluation
    started_at: float = 0.0
    ended_at: float = 0.0
    cross: np.ndarray | None = None  # noised: how many validation examples each local model got right
    cross_models: tuple[str, ...] = ()  # whose local models, in the order of `cross`
    epsilon_lifetime: float = 0.0
    epsilon_cap: float = 0.0


def _site_record(site: SiteInfo) -> ConfigRecord:
    return ConfigRecord({"name": site.name, "n-train": site.n_train, "n-val": site.n_val, "status": site.status,
                         "reason": public_reason(site.reason), "census-labels": [float(x) for x in site.census_labels],
                         "census-n-val": float(site.census_n_val), "census-noise": float(site.census_noise),
                         "census-run": site.census_run})


class Malformed(ValueError):
    """A reply that breaks the message format: the site, the record and key, and what was expected. The server
    records the site as failed for the phase with this text; the round goes on with the others."""


_MISSING = object()


def _value(rec: Mapping[str, Any], key: str, where: str, default: Any) -> Any:
    v = rec.get(key, default)
    if v is _MISSING:
        raise Malformed(f"{where} has no '{key}'")
    return v


def _int(rec: Mapping[str, Any], key: str, where: str, lo: int = 0, hi: int = MAX_COUNT,
         default: Any = _MISSING) -> int:
    """rec[key] as an int in lo..hi (a float holding a whole number passes: JSON-ish senders write 10.0)."""
    v = _value(rec, key, where, default)
    if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v != int(v)
            or not lo <= v <= hi):
        raise Malformed(f"{where}: '{key}' = {_show(v)}, expected a whole number in {lo}..{hi}")
    return int(v)


def _num(rec: Mapping[str, Any], key: str, where: str, lo: float, hi: float = math.inf,
         default: Any = _MISSING) -> float:
    """rec[key] as a float in [lo, hi] (NaN never; +inf only where hi is inf: an ε that is unbounded)."""
    v = _value(rec, key, where, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or not lo <= v <= hi:
        raise Malformed(f"{where}: '{key}' = {_show(v)}, expected a number in [{lo:g}, {hi:g}]")
    return float(v)


def _floats(rec: Mapping[str, Any], key: str, where: str, size: int | None = None,
            default: Any = _MISSING) -> np.ndarray:
    """rec[key] as finite floats of magnitude at most MAX_COUNT (of `size` values when given): every released value
    is a count or a bounded sum over a site's examples, plus noise, so anything larger is not a release (a summary
    cell of 1e200 overflowed the findings engine)."""
    v = _value(rec, key, where, default)
    if not isinstance(v, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        raise Malformed(f"{where}: '{key}' is {type(v).__name__}, expected a list of numbers")
    out = np.asarray(v, dtype=np.float64)
    if size is not None and out.size != size:
        raise Malformed(f"{where}: '{key}' has {out.size} values, expected {size}")
    if not np.all(np.isfinite(out)) or (out.size and np.abs(out).max() > MAX_COUNT):
        raise Malformed(f"{where}: '{key}' holds NaN, Inf or values beyond ±{MAX_COUNT:.0e}")
    return out


def _text(rec: Mapping[str, Any], key: str, where: str, limit: int, default: Any = _MISSING) -> str:
    v = _value(rec, key, where, default)
    if not isinstance(v, str) or len(v) > limit:
        raise Malformed(f"{where}: '{key}' = {_show(v)}, expected text of at most {limit} characters")
    return v


def _show(v: Any) -> str:
    return repr(v)[:40]


def unpack_site(content: RecordDict, num_classes: int | None = None) -> SiteInfo:
    """Who answered. `num_classes`: the run's K, which a census must match (None: not checked).

    Raises:
        Malformed: no site record, or a field of the wrong type or out of range (a name that is not SITE_NAME or
            is a node-<id> placeholder, a status outside STATUSES, a census of another length).
    """
    if SITE not in content.config_records:
        raise Malformed(f"reply has no '{SITE}' ConfigRecord (records: {list(content.keys())[:5]})")
    r = content.config_records[SITE]
    name = _text(r, "name", f"'{SITE}' record", MAX_NAME)
    if not SITE_NAME.match(name) or PLACEHOLDER.match(name):
        raise Malformed(f"'{SITE}' record: 'name' = {_show(name)}, expected letters, digits, '.', '_' or '-' (at "
                        f"most {MAX_NAME}; not node-<number>)")
    where = f"site {name}: '{SITE}' record"
    status = _text(r, "status", where, 16)
    if status not in STATUSES:
        raise Malformed(f"{where}: 'status' = {_show(status)}, expected one of {', '.join(STATUSES)}")
    labels = _floats(r, "census-labels", where, default=[])
    if labels.size and num_classes is not None and labels.size != num_classes:
        raise Malformed(f"{where}: 'census-labels' has {labels.size} values, expected {num_classes} (one a class)")
    return SiteInfo(name, _int(r, "n-train", where), _int(r, "n-val", where), status,
                    _text(r, "reason", where, MAX_REASON), tuple(float(x) for x in labels),
                    _num(r, "census-n-val", where, -MAX_COUNT, MAX_COUNT, default=0.0),
                    _num(r, "census-noise", where, 0.0, MAX_COUNT, default=0.0),
                    _text(r, "census-run", where, MAX_NAME, default=""))


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s/'\"]+/)+([^\s/'\"]+)")


def public_reason(text: str, limit: int = 400) -> str:
    """A reason fit to leave a site: absolute paths cut to their file name (the site's log keeps the full text),
    and bounded in length. Data values must not be in it in the first place (common/datasets.SiteDataError
    keeps them in its local detail)."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1), text)[:limit]


# --- server -> site ----------------------------------------------------------------------------------------------

def pack_instruction(arrays: OrderedDict[str, np.ndarray] | None, server_round: int, num_rounds: int,
                     thresholds: list[float] | None = None, run_id: str = "",
                     local_models: dict[str, OrderedDict[str, np.ndarray]] | None = None,
                     class_prior: list[float] | None = None) -> RecordDict:
    """`local_models`: site -> its local model this round, for the sites to score on their validation data (an
    evaluate instruction of a run with server.cross-site-eval). `class_prior`: the loss's prior (a train
    instruction)."""
    cfg = {SERVER_ROUND: server_round, NUM_ROUNDS: num_rounds, RUN_ID: run_id}
    if thresholds is not None:
        cfg[THRESHOLDS] = [float(t) for t in thresholds]
    if class_prior is not None:
        cfg[CLASS_PRIOR] = [float(t) for t in class_prior]
    content = RecordDict({CONFIG: ConfigRecord(cfg)})
    if arrays is not None:
        content[ARRAYS] = _arrays(arrays)
    for site in sorted(local_models or {}):
        content[LOCAL_MODEL + site] = _arrays(local_models[site])
    return content


def unpack_local_models(content: RecordDict) -> OrderedDict[str, OrderedDict[str, np.ndarray]]:
    """The local models an instruction carries for cross-site evaluation, by site name (empty when none)."""
    return OrderedDict((key[len(LOCAL_MODEL):], OrderedDict((k, v.numpy()) for k, v in rec.items()))
                       for key, rec in sorted(content.array_records.items()) if key.startswith(LOCAL_MODEL))


def _arrays(arrays: OrderedDict[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def unpack_arrays(content: RecordDict, like: Mapping[str, np.ndarray] | None = None,
                  where: str = "message") -> OrderedDict[str, np.ndarray]:
    """The weights a message carries. With `like` (the global model a reply answers), each Array must be float32
    and declare at most the values of the largest weight, checked before its bytes are decoded, so a reply that
    declares a huge or string-typed array is malformed, not a memory blow-up or a crash in the average. Keys and
    shapes against `like` are the update checks' (server/aggregate.check_update), reported as a rejected update.

    Raises:
        Malformed: no weights, or an Array of another dtype, a declared size beyond the bound, or bytes that do not
            decode to what it declares.
    """
    if ARRAYS not in content.array_records:
        raise Malformed(f"{where} has no '{ARRAYS}' ArrayRecord")
    rec = content.array_records[ARRAYS]
    if like is None:
        return OrderedDict((k, v.numpy()) for k, v in rec.items())
    if len(rec) > len(like):
        raise Malformed(f"{where}: {len(rec)} weights, expected {len(like)}")
    largest = max((int(np.prod(v.shape)) for v in like.values()), default=0)
    out = OrderedDict()
    for k, v in rec.items():
        declared = tuple(v.shape) if isinstance(v.shape, list | tuple) else None
        if (v.dtype != "float32" or declared is None or not all(isinstance(d, int) and d >= 0 for d in declared)
                or math.prod(declared) > largest or len(v.data) > 4 * math.prod(declared) + NPY_HEADER):
            raise Malformed(f"{where}: weight {_show(k)} declares dtype {_show(v.dtype)}, shape {_show(v.shape)} "
                            f"({len(v.data)} bytes); expected float32 of at most {largest} values")
        try:
            a = v.numpy()
        except Exception as e:  # noqa: BLE001 -- any decoding failure is the reply's, never the run's
            raise Malformed(f"{where}: weight {_show(k)} does not decode ({type(e).__name__})") from None
        if a.dtype != np.float32 or a.shape != declared:
            raise Malformed(f"{where}: weight {_show(k)} decodes to {a.dtype} {a.shape}, not the declared "
                            f"float32 {declared}")
        out[k] = a
    return out


def unpack_instruction(content: RecordDict) -> tuple[int, int]:
    cfg = content.config_records[CONFIG]
    return int(cfg[SERVER_ROUND]), int(cfg.get(NUM_ROUNDS, 0))


def unpack_run_id(content: RecordDict) -> str:
    """The fedlens run id of an instruction ("" when the message carries none)."""
    cfg = content.config_records.get(CONFIG)
    return str(cfg.get(RUN_ID, "")) if cfg is not None else ""


def unpack_class_prior(content: RecordDict, num_classes: int) -> list[float] | None:
    """The class prior an instruction carries (None when it carries none).

    Raises:
        ValueError: not num_classes positive finite numbers summing to 1.
    """
    cfg = content.config_records[CONFIG]
    if CLASS_PRIOR not in cfg:
        return None
    prior = [float(t) for t in cfg[CLASS_PRIOR]]
    if len(prior) != num_classes or not all(np.isfinite(prior)) or min(prior) <= 0 or abs(sum(prior) - 1) > 1e-3:
        raise ValueError(f"instruction's {CLASS_PRIOR} {prior} is not a distribution over {num_classes} classes")
    return prior


def unpack_thresholds(content: RecordDict) -> list[float] | None:
    cfg = content.config_records[CONFIG]
    return [float(t) for t in cfg[THRESHOLDS]] if THRESHOLDS in cfg else None


# --- site -> server ----------------------------------------------------------------------------------------------

def pack_hello(site: SiteInfo) -> RecordDict:
    return RecordDict({SITE: _site_record(site)})


def pack_train_reply(r: TrainReply) -> RecordDict:
    content = RecordDict({
        SITE: _site_record(r.site),
        METRICS: MetricRecord({NUM_EXAMPLES: r.num_examples, "epsilon": r.epsilon, "delta": r.delta,
                               "epsilon-budget": r.epsilon_budget, "noise-multiplier": r.noise_multiplier,
                               "sample-rate": r.sample_rate, "steps": r.steps, "seconds": r.seconds,
                               "sensitivity": r.sensitivity, "epsilon-training": r.epsilon_training,
                               "epsilon-diagnostics": r.epsilon_diagnostics,
                               "diagnostics-seconds": r.diagnostics_seconds, "started-at": r.started_at,
                               "ended-at": r.ended_at, "epsilon-lifetime": r.epsilon_lifetime,
                               "epsilon-cap": r.epsilon_cap}),
    })
    if r.arrays is not None:
        content[ARRAYS] = _arrays(r.arrays)
    return content


def unpack_train_reply(content: RecordDict, like: Mapping[str, np.ndarray] | None = None,
                       num_classes: int | None = None) -> TrainReply:
    """A site's train reply, every field checked (types, ranges, the status enum, weights bounded as
    `unpack_arrays` says against `like`, the global model it answers).

    Raises:
        Malformed: naming the site, record and key.
    """
    site = unpack_site(content, num_classes)
    where = f"site {site.name}: '{METRICS}' record"
    if METRICS not in content.metric_records:
        raise Malformed(f"site {site.name}: train reply has no '{METRICS}' MetricRecord")
    m = content.metric_records[METRICS]
    arrays = (unpack_arrays(content, like, f"site {site.name}: train reply") if ARRAYS in content.array_records
              else None)
    if site.status == STATUS_OK and arrays is None:
        raise Malformed(f"site {site.name}: train reply has status ok but no '{ARRAYS}' ArrayRecord")
    return TrainReply(site, arrays, _int(m, NUM_EXAMPLES, where), _num(m, "epsilon", where, -1.0),
                      _num(m, "delta", where, 0.0, 1.0), _num(m, "epsilon-budget", where, -1.0),
                      _num(m, "noise-multiplier", where, 0.0, MAX_COUNT), _num(m, "sample-rate", where, 0.0, 1.0),
                      _int(m, "steps", where), _num(m, "seconds", where, 0.0, MAX_COUNT),
                      _num(m, "sensitivity", where, 0.0, MAX_COUNT, default=1.0),
                      _num(m, "epsilon-training", where, -1.0, default=0.0),
                      _num(m, "epsilon-diagnostics", where, -1.0, default=0.0),
                      _num(m, "diagnostics-seconds", where, 0.0, MAX_COUNT, default=0.0),
                      _num(m, "started-at", where, 0.0, 1e11, default=0.0),
                      _num(m, "ended-at", where, 0.0, 1e11, default=0.0),
                      _num(m, "epsilon-lifetime", where, -1.0, default=0.0),
                      _num(m, "epsilon-cap", where, 0.0, default=0.0))


def pack_eval_reply(r: EvalReply) -> RecordDict:
    content = RecordDict({
        SITE: _site_record(r.site),
        METRICS: MetricRecord({NUM_EXAMPLES: r.num_examples, "epsilon": r.epsilon,
                               "epsilon-training": r.epsilon_training,
                               "epsilon-diagnostics": r.epsilon_diagnostics, "seconds": r.seconds,
                               "diagnostics-seconds": r.diagnostics_seconds, "started-at": r.started_at,
                               "ended-at": r.ended_at, "epsilon-lifetime": r.epsilon_lifetime,
                               "epsilon-cap": r.epsilon_cap}),
    })
    if r.blocks is not None:
        # One flat list of floats per block (ConfigRecord lists hold one scalar type); shapes follow from K.
        k = int(r.blocks["confusion"].shape[0])
        content[SUMMARY] = ConfigRecord({
            **{_key(name): [float(x) for x in np.asarray(v).ravel()] for name, v in r.blocks.items()},
            "num-classes": k, "embedding-dims": int(np.shape(r.blocks.get(EMBEDDING, np.zeros((k, 0))))[-1]),
            "mechanism": "gaussian", "noise-multiplier": r.noise_multiplier,
            "sensitivity": r.sensitivity, "health-round": r.health_round,
        })
        if r.cross is not None:
            content[SUMMARY]["cross-correct"] = [float(x) for x in r.cross]
            content[SUMMARY]["cross-models"] = list(r.cross_models)
    return content


def _key(block: str) -> str:
    return block.replace("_", "-")


def unpack_eval_reply(content: RecordDict, num_classes: int | None = None) -> EvalReply:
    """A site's evaluate reply, every field checked; its summary must be over the run's `num_classes` (None: any
    K, for readers of one reply alone), each block of its size and finite.

    Raises:
        Malformed: naming the site, the record and the key or block.
    """
    site = unpack_site(content, num_classes)
    where = f"site {site.name}: '{METRICS}' record"
    if METRICS not in content.metric_records:
        raise Malformed(f"site {site.name}: evaluate reply has no '{METRICS}' MetricRecord")
    m = content.metric_records[METRICS]
    blocks, sigma, sens, health_round, cross, cross_models = None, 0.0, 0.0, 0, None, ()
    if SUMMARY in content.config_records:
        s = content.config_records[SUMMARY]
        at = f"site {site.name}: summary"
        k = _int(s, "num-classes", at, 2, MAX_CLASSES)
        if num_classes is not None and k != num_classes:
            raise Malformed(f"{at} is over {k} classes, expected {num_classes} (data.labels)")
        dims = _int(s, "embedding-dims", at, 0, MAX_EMBEDDING_DIMS, default=0)
        blocks = {}
        for b in BLOCKS:
            if _key(b.name) not in s and b.name == EMBEDDING:
                blocks[b.name] = np.zeros((k, 0))  # a site of a version before the block: width 0, not malformed
                continue
            shape = b.shape(k, dims)
            blocks[b.name] = _floats(s, _key(b.name), at, int(np.prod(shape))).reshape(shape)
        sigma = _num(s, "noise-multiplier", at, 0.0, MAX_COUNT)
        sens = _num(s, "sensitivity", at, 0.0, MAX_COUNT)
        health_round = _int(s, "health-round", at)
        if "cross-correct" in s:
            cross = _floats(s, "cross-correct", at)
            names = _value(s, "cross-models", at, [])
            if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
                raise Malformed(f"{at}: 'cross-models' is not a list of site names")
            cross_models = tuple(names)
            if len(cross_models) != cross.size or len(set(cross_models)) != cross.size:
                raise Malformed(f"{at} has {cross.size} cross-site counts for {len(cross_models)} models "
                                f"({len(set(cross_models))} distinct); expected one per model")
    return EvalReply(site, _int(m, NUM_EXAMPLES, where), _num(m, "epsilon", where, -1.0), blocks, sigma, sens,
                     health_round, _num(m, "epsilon-training", where, -1.0, default=0.0),
                     _num(m, "epsilon-diagnostics", where, -1.0, default=0.0),
                     _num(m, "seconds", where, 0.0, MAX_COUNT, default=0.0),
                     _num(m, "diagnostics-seconds", where, 0.0, MAX_COUNT, default=0.0),
                     _num(m, "started-at", where, 0.0, 1e11, default=0.0),
                     _num(m, "ended-at", where, 0.0, 1e11, default=0.0), cross, cross_models,
                     _num(m, "epsilon-lifetime", where, -1.0, default=0.0),
                     _num(m, "epsilon-cap", where, 0.0, default=0.0))


def reply(content: RecordDict, to: Message) -> Message:
    return Message(content=content, reply_to=to)


# --- a site's context.state --------------------------------------------------------------------------------------

def read_state(state: RecordDict, name: str) -> dict | None:
    """The values of state record `name` (PLAN, DP, HEALTH), None when the site has not kept it."""
    rec = state.config_records.get(name)
    return None if rec is None else dict(rec.items())


def write_state(state: RecordDict, name: str, values: dict) -> None:
    state[name] = ConfigRecord(values)
