"""What-if re-aggregation: the round without some sites, by the run's own rule, from the kept updates, on the server's test set."""

import json
from collections import OrderedDict

import numpy as np
import pytest
from typer.testing import CliRunner

from common.checkpoints import Checkpoints
from common.config import AppConfig
from common.model import build_model, trainable_state
from common.run_store import RunWriter
from server.aggregate import fedavg, median, update_norm
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
    ckpt.save(1, fedavg(updates), updates)
    return store, updates


def test_leaving_a_site_out_re_averages_the_others_and_evaluates_both(kept_run):
    store, updates = kept_run
    out = reaggregate(store, "r", 1, ["a"])
    expected = fedavg({s: updates[s] for s in ("b", "c")})
    actual = fedavg(updates)
    assert out["sites_used"] == ["b", "c"] and out["examples_used"] == 60
    assert out["distance"] == pytest.approx(update_norm(expected, actual), rel=1e-5)
    for model in ("actual", "without"):
        assert 0 <= out[model]["accuracy"] <= 1 and out[model]["loss"] > 0
    assert out["change"]["accuracy"] == pytest.approx(out["without"]["accuracy"] - out["actual"]["accuracy"])


def test_a_median_run_is_re_aggregated_by_its_median(tmp_path):
    # Prepare: a run that aggregated by the coordinate-wise median over four sites, one of them far off.
    store = tmp_path / "s.db"
    cfg = AppConfig.from_run_config({**TINY, "server.aggregation": "median"})
    w = RunWriter(store, "m")
    w.start(scenario="t", rounds_planned=1, model="m", config=cfg.raw)
    base = trainable_state(build_model(cfg.model, cfg.data.labels, seed=0))
    shifts = {"a": 1.0, "b": 2.0, "c": 3.0, "x": 50.0}
    updates = {s: (OrderedDict((k, v + np.float32(d)) for k, v in base.items()), 10) for s, d in shifts.items()}
    ckpt = Checkpoints(store, "m", keep=5)
    ckpt.save(0, base, {})
    ckpt.save(1, median(updates)[0], updates)
    # Execute: leave b out; the median of a, c and x is c's update, FedAvg's mean would be pulled toward x.
    out = reaggregate(store, "m", 1, ["b"])
    # Assert
    expected = median({s: updates[s] for s in ("a", "c", "x")})[0]
    assert out["aggregation"] == "median"
    assert out["distance"] == pytest.approx(update_norm(expected, median(updates)[0]), rel=1e-5)
    assert out["distance"] != pytest.approx(update_norm(fedavg({s: updates[s] for s in ("a", "c", "x")}),
                                                        median(updates)[0]), rel=1e-2)


def test_a_krum_run_reports_the_sites_krum_kept(tmp_path):
    # Prepare: Multi-Krum with f = 1 over five sites, one far off.
    store = tmp_path / "s.db"
    cfg = AppConfig.from_run_config({**TINY, "server.aggregation": "krum", "server.byzantine": 1})
    w = RunWriter(store, "k")
    w.start(scenario="t", rounds_planned=1, model="m", config=cfg.raw)
    base = trainable_state(build_model(cfg.model, cfg.data.labels, seed=0))
    shifts = {"a": 1.0, "b": 1.1, "c": 1.2, "d": 1.3, "x": 50.0}
    updates = {s: (OrderedDict((k, v + np.float32(d)) for k, v in base.items()), 10) for s, d in shifts.items()}
    ckpt = Checkpoints(store, "k", keep=5)
    ckpt.save(0, base, {})
    ckpt.save(1, fedavg(updates), updates)
    # Execute: leave a out; Krum drops the worst of the four left (x) and averages b, c, d.
    out = reaggregate(store, "k", 1, ["a"])
    # Assert
    assert out["aggregation"] == "krum" and out["sites_used"] == ["b", "c", "d"] and out["examples_used"] == 30


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
