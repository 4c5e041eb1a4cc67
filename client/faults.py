"""Fault drills: a site applies the faults a scenario injects at it, to its rows (step 1), its training (step 2)
and its reply, in simulation and in test deployments.

What each kind means, and its parameters, is parsed in common/config.py (`Fault`, `KINDS`). A site applies them
only when its own policy allows it (allow-injected-faults: simulated sites, and a deployed site whose operator
started it with `fedlens site --allow-injected-faults`; never by default); client/data.py corrupts the rows,
client/client_app.py the rest. σ, the schedule and the budget check follow the training a fault really runs, so no
fault can make a site overspend.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pandas as pd

from common.config import Fault, TrainConfig
from common.datasets import GROUP, LABEL, TEXT
from common.model import Split


def corrupt_rows(rows: pd.DataFrame, faults: dict[str, Fault], *, num_classes: int, seed: int,
                 elsewhere: pd.DataFrame | None = None) -> pd.DataFrame:
    """The site's rows with its data faults applied (before the train/validation split: the site's data is bad).
    `elsewhere`: rows a domain shift draws from (the embedded set); those of the site's own conditions are skipped."""
    rng = np.random.default_rng(seed)
    rows = rows.copy()
    if "domain_shift" in faults and elsewhere is not None:
        pool = elsewhere[~elsewhere[GROUP].isin(set(rows[GROUP]))] if GROUP in rows else elsewhere
        hit = np.flatnonzero(rng.random(len(rows)) < float(faults["domain_shift"]["rate"]))
        if len(pool) and len(hit):
            picked = pool.iloc[rng.choice(len(pool), size=len(hit), replace=len(pool) < len(hit))]
            rows.iloc[hit, [rows.columns.get_loc(c) for c in (TEXT, LABEL)]] = picked[[TEXT, LABEL]].to_numpy()
            if GROUP in rows:
                rows.iloc[hit, rows.columns.get_loc(GROUP)] = picked[GROUP].to_numpy()
    if "label_skew" in faults:  # not a fault: a site whose label mix differs, its labels right
        f = faults["label_skew"]
        other = rows[LABEL].to_numpy() != int(f["class"])
        rows = rows[~(other & (rng.random(len(rows)) >= float(f["keep"])))].reset_index(drop=True)
    if "class_missing" in faults:
        rows = rows[rows[LABEL] != int(faults["class_missing"]["class"])].reset_index(drop=True)
    if "label_flip" in faults:
        f = faults["label_flip"]
        a, b, share = int(f["from"]), int(f["to"]), float(f["share"])
        labels = rows[LABEL].to_numpy()
        draw = rng.random(len(rows)) < share
        hit_a, hit_b = (labels == a) & draw, (labels == b) & draw
        rows.loc[hit_a, LABEL] = b
        if f["swap"]:
            rows.loc[hit_b, LABEL] = a
    if "label_noise" in faults:
        hit = rng.random(len(rows)) < float(faults["label_noise"]["rate"])
        classes = [int(c) for c in faults["label_noise"]["classes"]]
        if classes:  # class-conditional: only labels of these classes are randomised
            hit &= rows[LABEL].isin(classes).to_numpy()
        # A random *other* label: the given label is always wrong where noise hits.
        shift = rng.integers(1, num_classes, size=len(rows))
        rows.loc[hit, LABEL] = (rows.loc[hit, LABEL].to_numpy() + shift[hit]) % num_classes
    if "text_corruption" in faults:
        rate = float(faults["text_corruption"]["rate"])
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        rows[TEXT] = [_garble(t, rate, rng, letters) for t in rows[TEXT]]
    return rows


def _garble(text: str, rate: float, rng: np.random.Generator, letters: np.ndarray) -> str:
    chars = np.array(list(text))
    if not len(chars):
        return text
    hit = rng.random(len(chars)) < rate
    chars[hit] = rng.choice(letters, size=int(hit.sum()))
    return "".join(chars)


def faulty_training(injected: dict[str, Fault], train_cfg: TrainConfig, train: Split) -> tuple[TrainConfig, Split]:
    """Injected training faults on a round's settings: a learning rate blown up, or many epochs on a few examples
    (of the train split, tokens or features)."""
    train_data = train
    if "lr_blowup" in injected:
        factor = float(injected["lr_blowup"]["factor"])
        train_cfg = replace(train_cfg, lr=train_cfg.lr * factor, head_lr=train_cfg.head_lr * factor)
    if "overfit" in injected:
        n = int(injected["overfit"]["examples"])
        train_cfg = replace(train_cfg, local_epochs=int(injected["overfit"]["epochs"]))
        train_data = train.first(n)
    return train_cfg, train_data


def scheduled_size(injected: dict[str, Fault], n_released: float) -> float:
    """The train size DP-SGD's schedule follows: the released one, or an injected overfit fault's, on its few
    examples (the smaller of their configured count and the released size, public both)."""
    if "overfit" in injected:
        return min(float(injected["overfit"]["examples"]), n_released)
    return n_released


def straggle(injected: dict[str, Fault], trained_seconds: float) -> None:
    """An injected straggler: after training, waits its fixed seconds plus `factor` × its own training time."""
    if "straggler" in injected:
        f = injected["straggler"]
        time.sleep(float(f["seconds"]) + float(f["factor"]) * trained_seconds)


def misbehave(injected: dict[str, Fault], server_round: int, received) -> object:  # noqa: ANN001
    """Injected crash / free-rider behaviour; returns the weights a free rider sends, else None."""
    if "crash" in injected and server_round >= int(injected["crash"]["round"]):
        raise RuntimeError(f"site {injected['crash'].site}: injected crash at round {server_round}")
    if "free_rider" in injected:
        if injected["free_rider"]["mode"] == "random":
            rng = np.random.default_rng(server_round)
            return OrderedDict((k, rng.normal(0.0, float(v.std()) or 0.02, v.shape).astype(v.dtype))
                               for k, v in received.items())
        return received  # echo: the weights it received, unchanged
    return None


# bad_update modes that break the message itself, after it is packed: replies that ended the ServerApp before the
# server validated every field (issue 17). The train reply's: a weight of strings, an infinite example count, an
# unknown status, an Array with no bytes, an Array declaring 10⁹ values; the evaluate reply's: a summary over one
# class too many, a summary cell of 1e200. The other modes break the weights or the count the reply carries.
MESSAGE_MODES = {"train": ("string-array", "inf-examples", "bad-status", "empty-array", "huge-array", "fuzz"),
                 "evaluate": ("summary-classes", "summary-overflow")}
# "fuzz": two of these a round, drawn with the round as seed (a drill, not DP: nothing about the data is drawn), of
# the kinds tests/server/test_hostile_replies.py throws 10,000 of at the round loop. (record, key, value); key None
# drops the record.
FUZZ = (("metrics", "epsilon", float("nan")), ("metrics", "num-examples", -1), ("metrics", "sample-rate", 1e308),
        ("metrics", "steps", 2**63 - 1), ("metrics", "delta", float("-inf")), ("site", "name", ""),
        ("site", "n-train", -5), ("site", "status", 3), ("site", "reason", "\x00" * 100_000),
        ("site", "census-labels", [float("nan")]), ("metrics", None, None), ("site", None, None),
        ("arrays", "shape", None), ("arrays", "dtype", None))


def bad_update_mode(fault: Fault, server_round: int) -> str | None:
    """The bad_update mode of this round: None before its round; a list of modes is taken in turn, one a round."""
    start = int(fault["round"])
    if server_round < start:
        return None
    modes = fault["mode"]
    return modes if isinstance(modes, str) else modes[(server_round - start) % len(modes)]


def break_message(fault: Fault, server_round: int, content, phase: str = "train") -> None:  # noqa: ANN001
    """An injected bad_update of one of the phase's MESSAGE_MODES: the packed reply made malformed, in place."""
    from flwr.app import Array

    from common import records

    mode = bad_update_mode(fault, server_round)
    if mode not in MESSAGE_MODES[phase]:
        return
    if mode in ("string-array", "empty-array", "huge-array") and records.ARRAYS in content.array_records:
        weights = content.array_records[records.ARRAYS]
        weights[next(iter(weights))] = {
            "string-array": lambda: Array(np.array([["not", "a"], ["weight", "!"]])),
            "empty-array": lambda: Array("float32", (2, 2), "numpy.ndarray", b""),
            "huge-array": lambda: Array("float32", (10**9,), "numpy.ndarray", np.zeros(4, np.float32).tobytes()),
        }[mode]()
    elif mode == "fuzz":
        rng = np.random.default_rng(server_round)
        for i in sorted(rng.choice(len(FUZZ), size=2, replace=False), reverse=True):
            _fuzz(content, *FUZZ[i])
    elif mode == "inf-examples":
        content.metric_records[records.METRICS][records.NUM_EXAMPLES] = float("inf")
    elif mode == "bad-status":
        content.config_records[records.SITE]["status"] = "hacked"
    elif mode in ("summary-classes", "summary-overflow") and records.SUMMARY in content.config_records:
        summary = content.config_records[records.SUMMARY]
        if mode == "summary-classes":
            summary["num-classes"] = int(summary["num-classes"]) + 1
        else:
            summary["calibration"] = [1e200, *list(summary["calibration"])[1:]]


def _fuzz(content, record: str, key: str | None, value) -> None:  # noqa: ANN001
    from flwr.app import Array

    from common import records

    name = {"metrics": records.METRICS, "site": records.SITE, "arrays": records.ARRAYS}[record]
    if name not in content:
        return
    if record == "arrays":  # one weight of the wrong shape, or float64
        weights = content.array_records[name]
        first = next(iter(weights))
        shape = weights[first].shape
        weights[first] = Array(np.ones((*shape, 2), np.float32) if key == "shape" else np.ones(shape, np.float64))
    elif key is None:
        del content[name]
    else:
        content[name][key] = value


def break_reply(fault: Fault, server_round: int, arrays, num_examples: int):  # noqa: ANN001, ANN201
    """An injected bad_update: the trained weights (and example count) broken the way a buggy or hostile site
    would break them."""
    mode = bad_update_mode(fault, server_round)
    if mode is None or any(mode in modes for modes in MESSAGE_MODES.values()):
        return arrays, num_examples
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
