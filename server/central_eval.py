"""Step 4 at the server: its own held-out data (public to it; no ε) -> the global model's test metrics, each site
model's predictions on public probe texts, and the class prior the sites' loss is balanced towards.

Plain functions, no Flower: the round loop (server/strategy.py) and What-if (server/whatif.py) call them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from common.config import AppConfig
from common.datasets import LABEL, TEXT, load_drugreview, load_file
from common.metrics import calibration, confusion_matrix, summary_metrics
from common.model import Encoded, encode, load_trainable_state, predict
from server.prior import fixed_prior

Arrays = OrderedDict[str, np.ndarray]
CentralEval = Callable[[Arrays], dict[str, float]]
Probe = Callable[[Arrays], list[float]]  # a local model -> its mean predicted distribution on public texts


def server_test_set(cfg: AppConfig, tokenizer) -> Encoded | None:  # noqa: ANN001
    """The server's own held-out set, tokenised once (public to the server; no ε spent): None when
    server.central-eval is off."""
    if not cfg.server.central_eval:
        return None
    d = cfg.data
    test = (load_drugreview("test", d.labels) if cfg.server.central_eval == "drugreview-test" else
            load_file(cfg.server.central_eval, text_column=d.text_column, label_column=d.label_column,
                      labels=d.labels, site="server (server.central-eval)"))
    return encode(test[TEXT].tolist(), test[LABEL].to_numpy(), tokenizer, cfg.data.max_length)


def make_central_eval(cfg: AppConfig, model, data: Encoded | None) -> CentralEval | None:  # noqa: ANN001
    """Evaluation of the global model on the server's held-out set."""
    if data is None:
        return None
    k = len(cfg.data.labels)

    def evaluate(arrays: Arrays) -> dict[str, float]:
        load_trainable_state(model, arrays)
        probs, losses = predict(model, data)
        labels = data.labels.numpy()
        return {**summary_metrics(confusion_matrix(labels, probs.argmax(axis=1), k), float(losses.sum())),
                **calibration(probs, labels)}

    return evaluate


def class_prior(cfg: AppConfig, test: Encoded | None) -> str | list[float] | None:
    """What the sites' loss is balanced towards (train.class-prior), from public information only."""
    if cfg.train.class_balance == "none" or cfg.train.class_prior == "uniform":
        return None
    if cfg.train.class_prior == "released":
        return "released"
    if cfg.train.class_prior == "server-data":
        if test is None:
            raise ValueError("train.class-prior = server-data needs the server's labelled data (server.central-eval)")
        return fixed_prior(np.bincount(test.labels.numpy(), minlength=len(cfg.data.labels)))
    return cfg.explicit_prior()


def make_probe(cfg: AppConfig, model, data: Encoded | None) -> Probe | None:  # noqa: ANN001
    """Each site's local model on public texts (the first server.probe-inputs reviews of the server's held-out
    set, text only): its mean predicted class distribution. Post-processing of released weights; no ε."""
    if data is None or cfg.server.probe_inputs <= 0:
        return None
    n = cfg.server.probe_inputs
    texts = Encoded(data.input_ids[:n], data.attention_mask[:n], data.labels[:n])  # labels unused

    def probe(arrays: Arrays) -> list[float]:
        load_trainable_state(model, arrays)
        probs, _ = predict(model, texts)
        return probs.mean(axis=0).tolist()

    return probe
