"""Between the sites (steps 1-3) and the server (step 4): the message format, every record key and pack / unpack
of each message; and the name of every record a site keeps in its `context.state` (which never leaves it).

This is the only module in common/ that imports Flower. FedAvg-style averaging never sees the summary or the site
info: they travel in their own ConfigRecords, and the server reads them through `unpack_*`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.diagnostics import BLOCKS, EMBEDDING, MAX_EMBEDDING_DIMS

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


def unpack_site(content: RecordDict) -> SiteInfo:
    """Raises KeyError naming the record when a reply has no site info."""
    if SITE not in content.config_records:
        raise KeyError(f"reply has no '{SITE}' ConfigRecord (records: {list(content.keys())})")
    r = content.config_records[SITE]
    return SiteInfo(str(r["name"]), int(r["n-train"]), int(r["n-val"]), str(r["status"]), str(r["reason"]),
                    tuple(float(x) for x in r.get("census-labels", [])), float(r.get("census-n-val", 0.0)),
                    float(r.get("census-noise", 0.0)), str(r.get("census-run", "")))


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


def unpack_arrays(content: RecordDict) -> OrderedDict[str, np.ndarray]:
    if ARRAYS not in content.array_records:
        raise KeyError(f"message has no '{ARRAYS}' ArrayRecord")
    rec = content.array_records[ARRAYS]
    return OrderedDict((k, v.numpy()) for k, v in rec.items())


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


def unpack_train_reply(content: RecordDict) -> TrainReply:
    site = unpack_site(content)
    m = content.metric_records[METRICS]
    arrays = unpack_arrays(content) if ARRAYS in content.array_records else None
    if site.status == STATUS_OK and arrays is None:
        raise KeyError(f"site {site.name}: train reply has status ok but no '{ARRAYS}' ArrayRecord")
    return TrainReply(site, arrays, int(m[NUM_EXAMPLES]), float(m["epsilon"]), float(m["delta"]),
                      float(m["epsilon-budget"]), float(m["noise-multiplier"]), float(m["sample-rate"]),
                      int(m["steps"]), float(m["seconds"]), float(m.get("sensitivity", 1.0)),
                      float(m.get("epsilon-training", 0.0)), float(m.get("epsilon-diagnostics", 0.0)),
                      float(m.get("diagnostics-seconds", 0.0)), float(m.get("started-at", 0.0)),
                      float(m.get("ended-at", 0.0)), float(m.get("epsilon-lifetime", 0.0)),
                      float(m.get("epsilon-cap", 0.0)))


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


def unpack_eval_reply(content: RecordDict) -> EvalReply:
    """Raises KeyError / ValueError naming the block when a summary is missing a block or has the wrong size."""
    site = unpack_site(content)
    m = content.metric_records[METRICS]
    blocks, sigma, sens, health_round, cross, cross_models = None, 0.0, 0.0, 0, None, ()
    if SUMMARY in content.config_records:
        s = content.config_records[SUMMARY]
        k, dims = int(s["num-classes"]), int(s.get("embedding-dims", 0))
        if not 0 <= dims <= MAX_EMBEDDING_DIMS:
            raise ValueError(f"site {site.name}: summary declares embedding-dims = {dims}, expected 0..{MAX_EMBEDDING_DIMS}")
        blocks = {}
        for b in BLOCKS:
            if _key(b.name) not in s and b.name == EMBEDDING:
                blocks[b.name] = np.zeros((k, 0))  # a site of a version before the block: width 0, not malformed
                continue
            if _key(b.name) not in s:
                raise KeyError(f"site {site.name}: summary has no block '{_key(b.name)}'")
            values = np.asarray(s[_key(b.name)], dtype=np.float64)
            if values.size != int(np.prod(b.shape(k, dims))):
                raise ValueError(f"site {site.name}: summary block '{_key(b.name)}' has {values.size} values, "
                                 f"expected {int(np.prod(b.shape(k, dims)))} for {k} classes and {dims} dims")
            blocks[b.name] = values.reshape(b.shape(k, dims))
        sigma, sens, health_round = float(s["noise-multiplier"]), float(s["sensitivity"]), int(s["health-round"])
        if "cross-correct" in s:
            cross = np.asarray(s["cross-correct"], dtype=np.float64)
            cross_models = tuple(str(x) for x in s.get("cross-models", []))
            if len(cross_models) != cross.size:
                raise ValueError(f"site {site.name}: summary has {cross.size} cross-site counts for "
                                 f"{len(cross_models)} models; expected one per model")
    return EvalReply(site, int(m[NUM_EXAMPLES]), float(m["epsilon"]), blocks, sigma, sens, health_round,
                     float(m.get("epsilon-training", 0.0)), float(m.get("epsilon-diagnostics", 0.0)),
                     float(m.get("seconds", 0.0)), float(m.get("diagnostics-seconds", 0.0)),
                     float(m.get("started-at", 0.0)), float(m.get("ended-at", 0.0)), cross, cross_models,
                     float(m.get("epsilon-lifetime", 0.0)), float(m.get("epsilon-cap", 0.0)))


def reply(content: RecordDict, to: Message) -> Message:
    return Message(content=content, reply_to=to)


# --- a site's context.state --------------------------------------------------------------------------------------

def read_state(state: RecordDict, name: str) -> dict | None:
    """The values of state record `name` (PLAN, DP, HEALTH), None when the site has not kept it."""
    rec = state.config_records.get(name)
    return None if rec is None else dict(rec.items())


def write_state(state: RecordDict, name: str, values: dict) -> None:
    state[name] = ConfigRecord(values)
