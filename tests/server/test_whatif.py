"""What-if re-aggregation: the round's FedAvg without some sites, from the kept updates, on the server's test set."""

import json
from collections import OrderedDict

import numpy as np
import pytest
from typer.testing import CliRunner

from common.checkpoints import Checkpoints
from common.config import AppConfig
from common.model import build_model, trainable_state
from common.run_store import RunWriter
from server.strategy import update_norm, weighted_average
from server.whatif import reaggregate
from tests.conftest import TINY


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("whatif") / "s.db"
    cfg = AppConfig.from_run_config(TINY)
    w = RunWriter(store, "r")
    w.start(scenario="t", rounds_planned=1, model="m", config=cfg.raw)
    base = trainable_state(build_model(cfg.model, cfg.data.labels, seed=0))
    rng = np.random.default_rng(0)
    updates = {s: (OrderedDict((k, v + rng.normal(0, 0.5, v.shape).astype(np.float32)) for k, v in base.items()), n)
               for s, n in (("a", 100), ("b", 50), ("c", 10))}
    ckpt = Checkpoints(store, "r", keep=5)
    ckpt.save(0, base, {})
    ckpt.save(1, weighted_average(list(updates.values())), updates)
    return store, updates


def test_leaving_a_site_out_re_averages_the_others_and_evaluates_both(kept_run):
    store, updates = kept_run
    out = reaggregate(store, "r", 1, ["a"])
    expected = weighted_average([updates["b"], updates["c"]])
    actual = weighted_average(list(updates.values()))
    assert out["sites_used"] == ["b", "c"] and out["examples_used"] == 60
    assert out["distance"] == pytest.approx(update_norm(expected, actual), rel=1e-5)
    for model in ("actual", "without"):
        assert 0 <= out[model]["accuracy"] <= 1 and out[model]["loss"] > 0
    assert out["change"]["accuracy"] == pytest.approx(out["without"]["accuracy"] - out["actual"]["accuracy"])


def test_bad_requests_say_what_is_possible(kept_run):
    store, _ = kept_run
    with pytest.raises(ValueError, match="site\\(s\\) zz contributed no update to round 1; its contributors were: a, b, c"):
        reaggregate(store, "r", 1, ["zz"])
    with pytest.raises(ValueError, match="leaves no update to average"):
        reaggregate(store, "r", 1, ["a", "b", "c"])
    with pytest.raises(LookupError, match=r"round 7 has no checkpoint .*kept: \[0, 1\]"):
        reaggregate(store, "r", 7, ["a"])


def test_the_cli_prints_the_same_result_as_json(kept_run):
    from fedlens.cli import app

    store, _ = kept_run
    res = CliRunner().invoke(app, ["whatif", "--store", str(store), "--run", "r", "--round", "1", "--exclude", "c",
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sites_used"] == ["a", "b"]
    res = CliRunner().invoke(app, ["whatif", "--store", str(store), "--run", "r", "--round", "1", "--exclude", "x"])
    assert res.exit_code == 1 and "contributed no update" in res.output


def test_only_the_last_rounds_are_kept(tmp_path):
    ckpt = Checkpoints(tmp_path / "s.db", "r", keep=2)
    w = OrderedDict(x=np.zeros(2, np.float32))
    for r in range(5):
        ckpt.save(r, w, {"a": (w, 1), "b": (w, 1)}, {"thresholds": [0.5, 0.25]})
        ckpt.prune(r)
    assert ckpt.rounds() == [0, 3, 4]  # round 0 (the initial model) stays
    assert ckpt.state(4) == {"thresholds": [0.5, 0.25]}
    # Round 5 written but not yet committed: pruning waits, so the last committed round (4) is still there.
    ckpt.save(5, w, {"a": (w, 1)})
    assert ckpt.rounds() == [0, 3, 4, 5]
    ckpt.save(5, w, {"b": (w, 1)})  # redone after a resume: only the new attempt's updates remain
    assert list(ckpt.load(5)[1]) == ["b"]
    assert Checkpoints(tmp_path / "s.db", "r2", keep=0).rounds() == []
