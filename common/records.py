"""The message format between server and sites: every record key, and pack / unpack of each message.

This is the only module in common/ that imports Flower. FedAvg-style averaging never sees the summary or the site
info: they travel in their own ConfigRecords, and the server reads them through `unpack_*`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

# Record names inside a message's RecordDict.
ARRAYS = "arrays"  # the trainable weights (LoRA adapters + head, or all weights)
CONFIG = "config"  # server -> site instructions
METRICS = "metrics"  # numbers only: num-examples, epsilon, ...
SITE = "site"  # who answered and whether it did the work
SUMMARY = "summary"  # the noised error summary of an evaluation
LEDGER = "ledger"  # in context.state: the site's privacy ledger (never sent)

# Keys.
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-server-rounds"
STATUS_OK, STATUS_REFUSED = "ok", "refused"


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


@dataclass(frozen=True)
class EvalReply:
    site: SiteInfo
    num_examples: int  # validation examples
    epsilon: float  # cumulative, after this release
    confusion: np.ndarray | None  # noised [K, K]; None when the release was refused
    val_loss_sum: float
    train_loss_sum: float
    noise_multiplier: float
    sensitivity: float


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

def pack_instruction(arrays: OrderedDict[str, np.ndarray] | None, server_round: int, num_rounds: int) -> RecordDict:
    content = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: server_round, NUM_ROUNDS: num_rounds})})
    if arrays is not None:
        content[ARRAYS] = _arrays(arrays)
    return content


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


# --- site -> server ----------------------------------------------------------------------------------------------

def pack_hello(site: SiteInfo) -> RecordDict:
    return RecordDict({SITE: _site_record(site)})


def pack_train_reply(r: TrainReply) -> RecordDict:
    content = RecordDict({
        SITE: _site_record(r.site),
        METRICS: MetricRecord({NUM_EXAMPLES: r.num_examples, "epsilon": r.epsilon, "delta": r.delta,
                               "epsilon-budget": r.epsilon_budget, "noise-multiplier": r.noise_multiplier,
                               "sample-rate": r.sample_rate, "steps": r.steps, "seconds": r.seconds}),
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
                      int(m["steps"]), float(m["seconds"]))


def pack_eval_reply(r: EvalReply) -> RecordDict:
    content = RecordDict({
        SITE: _site_record(r.site),
        METRICS: MetricRecord({NUM_EXAMPLES: r.num_examples, "epsilon": r.epsilon}),
    })
    if r.confusion is not None:
        content[SUMMARY] = ConfigRecord({
            "confusion": [float(x) for x in r.confusion.ravel()],
            "num-classes": int(r.confusion.shape[0]),
            "val-loss-sum": r.val_loss_sum, "train-loss-sum": r.train_loss_sum,
            "noise-multiplier": r.noise_multiplier, "sensitivity": r.sensitivity,
        })
    return content


def unpack_eval_reply(content: RecordDict) -> EvalReply:
    site = unpack_site(content)
    m = content.metric_records[METRICS]
    confusion, val_loss, train_loss, sigma, sens = None, 0.0, 0.0, 0.0, 0.0
    if SUMMARY in content.config_records:
        s = content.config_records[SUMMARY]
        k = int(s["num-classes"])
        confusion = np.asarray(s["confusion"], dtype=np.float64).reshape(k, k)
        val_loss, train_loss = float(s["val-loss-sum"]), float(s["train-loss-sum"])
        sigma, sens = float(s["noise-multiplier"]), float(s["sensitivity"])
    return EvalReply(site, int(m[NUM_EXAMPLES]), float(m["epsilon"]), confusion, val_loss, train_loss, sigma, sens)


def reply(content: RecordDict, to: Message) -> Message:
    return Message(content=content, reply_to=to)
