"""The message format between server and sites: every record key, and pack / unpack of each message.

This is the only module in common/ that imports Flower. FedAvg-style averaging never sees the summary or the site
info: they travel in their own ConfigRecords, and the server reads them through `unpack_*`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.diagnostics import BLOCKS

# Record names inside a message's RecordDict.
ARRAYS = "arrays"  # the trainable weights (LoRA adapters + head, or all weights)
CONFIG = "config"  # server -> site instructions
METRICS = "metrics"  # numbers only: num-examples, epsilon, ...
SITE = "site"  # who answered and whether it did the work
SUMMARY = "summary"  # the noised error summary of an evaluation
LEDGER = "ledger"  # in context.state: the site's privacy ledger (never sent)
LOCAL_MODEL = "local-model:"  # + site name: that site's local model, sent for cross-site evaluation (opt-in)

# Keys.
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-server-rounds"
RUN_ID = "run-id"  # the fedlens run (stable across a resume; Flower's run id is not): keys a site's saved state
THRESHOLDS = "cl-thresholds"  # per-class confident-learning thresholds (public: from earlier noised summaries)
STATUS_OK, STATUS_REFUSED, STATUS_FAILED = "ok", "refused", "failed"


@dataclass(frozen=True)
class SiteInfo:
    name: str
    n_train: int
    n_val: int
    status: str = STATUS_OK
    reason: str = ""


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

    @property
    def confusion(self) -> np.ndarray | None:
        return None if self.blocks is None else self.blocks["confusion"]


def _site_record(site: SiteInfo) -> ConfigRecord:
    return ConfigRecord({"name": site.name, "n-train": site.n_train, "n-val": site.n_val, "status": site.status,
                         "reason": site.reason})


def unpack_site(content: RecordDict) -> SiteInfo:
    """Raises KeyError naming the record when a reply has no site info."""
    if SITE not in content.config_records:
        raise KeyError(f"reply has no '{SITE}' ConfigRecord (records: {list(content.keys())})")
    r = content.config_records[SITE]
    return SiteInfo(str(r["name"]), int(r["n-train"]), int(r["n-val"]), str(r["status"]), str(r["reason"]))


# --- server -> site ----------------------------------------------------------------------------------------------

def pack_instruction(arrays: OrderedDict[str, np.ndarray] | None, server_round: int, num_rounds: int,
                     thresholds: list[float] | None = None, run_id: str = "",
                     local_models: dict[str, OrderedDict[str, np.ndarray]] | None = None) -> RecordDict:
    """`local_models`: site -> its local model this round, for the sites to score on their validation data (an
    evaluate instruction of a run with server.cross-site-eval)."""
    cfg = {SERVER_ROUND: server_round, NUM_ROUNDS: num_rounds, RUN_ID: run_id}
    if thresholds is not None:
        cfg[THRESHOLDS] = [float(t) for t in thresholds]
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
                               "ended-at": r.ended_at}),
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
                      float(m.get("ended-at", 0.0)))


def pack_eval_reply(r: EvalReply) -> RecordDict:
    content = RecordDict({
        SITE: _site_record(r.site),
        METRICS: MetricRecord({NUM_EXAMPLES: r.num_examples, "epsilon": r.epsilon,
                               "epsilon-training": r.epsilon_training,
                               "epsilon-diagnostics": r.epsilon_diagnostics, "seconds": r.seconds,
                               "diagnostics-seconds": r.diagnostics_seconds, "started-at": r.started_at,
                               "ended-at": r.ended_at}),
    })
    if r.blocks is not None:
        # One flat list of floats per block (ConfigRecord lists hold one scalar type); shapes follow from K.
        k = int(r.blocks["confusion"].shape[0])
        content[SUMMARY] = ConfigRecord({
            **{_key(name): [float(x) for x in np.asarray(v).ravel()] for name, v in r.blocks.items()},
            "num-classes": k, "mechanism": "gaussian", "noise-multiplier": r.noise_multiplier,
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
        k = int(s["num-classes"])
        blocks = {}
        for b in BLOCKS:
            if _key(b.name) not in s:
                raise KeyError(f"site {site.name}: summary has no block '{_key(b.name)}'")
            values = np.asarray(s[_key(b.name)], dtype=np.float64)
            if values.size != int(np.prod(b.shape(k))):
                raise ValueError(f"site {site.name}: summary block '{_key(b.name)}' has {values.size} values, "
                                 f"expected {int(np.prod(b.shape(k)))} for {k} classes")
            blocks[b.name] = values.reshape(b.shape(k))
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
                     float(m.get("started-at", 0.0)), float(m.get("ended-at", 0.0)), cross, cross_models)


def reply(content: RecordDict, to: Message) -> Message:
    return Message(content=content, reply_to=to)
