"""The server's held-out set: the embedded test reviews, or the operator's own labelled file."""

import numpy as np
import pytest

from common.config import AppConfig
from tests.conftest import TINY


def test_the_server_can_hold_its_own_labelled_file(tmp_path, tokenizer):
    from common.datasets import SiteDataError
    from common.model import build_model, trainable_state
    from server.central_eval import make_central_eval, server_test_set

    held = tmp_path / "held-out.csv"
    held.write_text("review,rating\nworked well,9\nterrible side effects,1\nit was fine i guess,6\n")
    cfg = AppConfig.from_run_config({**TINY, "server.central-eval": str(held)})
    data = server_test_set(cfg, tokenizer)
    assert data.labels.tolist() == [2, 0, 1]  # positive, negative, neutral from the 1-10 ratings
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    metrics = make_central_eval(cfg, model, data)(trainable_state(model))
    assert set(metrics) >= {"accuracy", "macro_f1", "loss", "ece", "confidence"}
    assert np.isfinite(metrics["loss"]) and 1 / 3 <= metrics["confidence"] <= 1

    missing = AppConfig.from_run_config({**TINY, "server.central-eval": str(tmp_path / "nope.csv")})
    with pytest.raises(SiteDataError, match=r"server \(server.central-eval\): data file .*nope.csv does not exist"):
        server_test_set(missing, tokenizer)
    with pytest.raises(ValueError, match="server.central-eval.*drugreview-test.*labelled file"):
        AppConfig.from_run_config({**TINY, "server.central-eval": "my-test-set"})
