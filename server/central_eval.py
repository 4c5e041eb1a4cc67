"""Step 4 at the server: its own held-out data (public to it; no ε) -> the global model's test metrics, each site
model's predictions on public probe texts, and the class prior the sites' loss is balanced towards.

Plain functions, no Flower: the round loop (server/strategy.py) and What-if (server/whatif.py) call them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import EMBEDDED_TEST_SETS, AppConfig
from common.datasets import (
    LABEL,
    TEXT,
    held_out,
    held_out_by,
    keyed_share,
    load_drugreview,
    load_embedded,
    load_file,
)
from common.features import model_split
from common.metrics import calibration, confusion_matrix, summary_metrics
from common.model import Encoded, Split, encode, load_trainable_state, predict
from server.prior import fixed_prior

Arrays = OrderedDict[str, np.ndarray]
CentralEval = Callable[[Arrays], dict[str, float]]
Probe = Callable[[Arrays], list[float]]  # a local model -> its mean predicted distribution on public texts


@dataclass(frozen=True)
class ServerData:
    """The server's own labelled data, in two parts: `val` to tune on (None when server.val-fraction = 0), `test`
    to report on only."""

    val: Split | None
    test: Split


def held_out_source(cfg: AppConfig) -> str:
    """What server.central-eval names once "auto" is resolved: the workload's embedded held-out set, a file, or ""
    (the sites' own files and no file at the server: nothing to evaluate on)."""
    if cfg.server.central_eval == "auto":
        return {v: k for k, v in EMBEDDED_TEST_SETS.items()}.get(cfg.data.source, "")
    return cfg.server.central_eval


def server_rows(cfg: AppConfig) -> tuple[pd.DataFrame, str] | None:
    """The server's labelled rows and the column its validation part is drawn by (whole movies for the movie
    workload, so that none is on both sides); None when server.central-eval is off."""
    source, d = held_out_source(cfg), cfg.data
    if not source:
        return None
    if source == "drugreview-test":
        return load_drugreview("test", d.labels), TEXT
    if source in ("movies-test", "debates-test"):
        workload = EMBEDDED_TEST_SETS[source]
        frame = load_embedded(workload, d.labels)
        return frame[held_out(frame, workload, d.seed)].reset_index(drop=True), held_out_by(workload)
    return load_file(source, text_column=d.text_column, label_column=d.label_column, labels=d.labels,
                     site="server (server.central-eval)"), TEXT


def server_data(cfg: AppConfig, tokenizer) -> ServerData | None:  # noqa: ANN001
    """The server's own held-out data, tokenised once (public to the server; no ε spent), split by a keyed hash
    into a validation part (server.val-fraction) and a test part; None when server.central-eval is off."""
    found = server_rows(cfg)
    if found is None:
        return None
    rows, by = found
    is_val = keyed_share(rows[by].astype(str).tolist(), cfg.data.seed, "server-val") < cfg.server.val_fraction

    def part(mask: np.ndarray) -> Encoded:
        return encode(rows[TEXT][mask].tolist(), rows[LABEL][mask].to_numpy(), tokenizer, cfg.data.max_length)

    if is_val.all():  # a tiny file: keep something to report on
        is_val[:] = False
    return ServerData(part(is_val) if is_val.any() else None, part(~is_val))


def server_split(cfg: AppConfig, model, tokenizer) -> ServerData | None:  # noqa: ANN001
    """The server's held-out data as the model consumes it: the tokens, or in head mode the frozen encoder's
    features (computed once, kept next to the run store: common/features.py)."""
    data = server_data(cfg, tokenizer)
    if data is None:
        return None
    folder = Path(cfg.store.path).parent

    def split(x: Encoded | None) -> Split | None:
        return model_split(cfg.model, cfg.train.seed, model, x, folder)

    return ServerData(split(data.val), split(data.test))


def make_central_eval(cfg: AppConfig, model, data: ServerData | None) -> CentralEval | None:  # noqa: ANN001
    """Evaluation of the global model on the server's held-out data: the test part's metrics, and the validation
    part's accuracy, macro-F1, loss and mean confidence as val_accuracy, ... (the benchmark checks the run-level
    findings drawn from the test part against them: other examples, the same model)."""
    if data is None:
        return None
    k = len(cfg.data.labels)

    def metrics(split: Split) -> dict[str, float]:
        probs, losses = predict(model, split)
        labels = split.labels.numpy()
        return {**summary_metrics(confusion_matrix(labels, probs.argmax(axis=1), k), float(losses.sum())),
                **calibration(probs, labels), "examples": float(len(labels))}

    def evaluate(arrays: Arrays) -> dict[str, float]:
        load_trainable_state(model, arrays)
        out = metrics(data.test)
        if data.val is not None:
            val = metrics(data.val)
            out.update({f"val_{k}": val[k] for k in ("accuracy", "macro_f1", "loss", "confidence", "examples")})
        return out

    return evaluate


def class_prior(cfg: AppConfig, data: ServerData | None) -> str | list[float] | None:
    """What the sites' loss is balanced towards (train.class-prior), from public information only."""
    if cfg.train.class_balance == "none" or cfg.train.class_prior == "uniform":
        return None
    if cfg.train.class_prior == "released":
        return "released"
    if cfg.train.class_prior == "server-data":
        if data is None:
            raise ValueError("train.class-prior = server-data needs the server's labelled data (server.central-eval)")
        # The validation part's labels: the test part is for reporting only (unless it is all the server holds).
        labels = (data.val if data.val is not None else data.test).labels.numpy()
        return fixed_prior(np.bincount(labels, minlength=len(cfg.data.labels)))
    return cfg.explicit_prior()


def make_probe(cfg: AppConfig, model, data: ServerData | None) -> Probe | None:  # noqa: ANN001
    """Each site's local model on public texts (the first server.probe-inputs reviews of the server's held-out
    test part, text only): its mean predicted class distribution. Post-processing of released weights; no ε."""
    if data is None or cfg.server.probe_inputs <= 0:
        return None
    texts = data.test.first(cfg.server.probe_inputs)  # labels unused

    def probe(arrays: Arrays) -> list[float]:
        load_trainable_state(model, arrays)
        probs, _ = predict(model, texts)
        return probs.mean(axis=0).tolist()

    return probe
