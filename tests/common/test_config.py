"""The config tree: defaults from pyproject, overrides, and validation that reports every problem at once."""

import pytest

from common.config import AppConfig, default_run_config, load_overrides, parse_faults, resolve_run_config


def test_defaults_build_a_valid_tree():
    cfg = AppConfig.from_run_config({})
    assert cfg.model.mode == "head" and cfg.server.central_eval == "auto"
    assert cfg.data.labels == ("negative", "neutral", "positive")  # "": the drug reviews' own
    assert cfg.dp.enabled and cfg.dp.target_epsilon == 8.0


def test_every_problem_is_reported_at_once_with_key_value_and_range():
    # Prepare
    bad = {"dp.max-grad-norm": 0.0, "model.mode": "adapter", "train.lr": -1.0, "data.val-fraction": 1.5,
           "server.update-norm-outlier": 0.5}
    # Execute
    with pytest.raises(ValueError) as err:
        AppConfig.from_run_config(bad)
    # Assert
    msg = str(err.value)
    assert "dp.max-grad-norm must be in (0.0, 1000000.0], got 0.0" in msg
    assert "model.mode must be one of \"head\", \"lora\", \"full\", \"head-then-lora\", got 'adapter'" in msg
    assert "train.lr must be in (0.0, 10.0], got -1.0" in msg
    assert "data.val-fraction must be in (0.0, 0.9], got 1.5" in msg
    # a factor under 1 would leave out the upper half of every round's updates
    assert "server.update-norm-outlier must be 0 (off) or at least 1" in msg


def test_wrong_type_and_unknown_key_are_named():
    with pytest.raises(ValueError, match="train.batch-size must be of type int, got 'big'"):
        AppConfig.from_run_config({"train.batch-size": "big"})
    with pytest.raises(ValueError, match="unknown config key\\(s\\) dp.epsilon"):
        resolve_run_config({"dp.epsilon": 3.0})


def test_scenario_files_override_defaults(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('num-server-rounds = 3\n[dp]\ntarget-epsilon = 4\n')
    flat = resolve_run_config(load_overrides(path))
    assert flat["num-server-rounds"] == 3
    assert flat["dp.target-epsilon"] == 4.0 and isinstance(flat["dp.target-epsilon"], float)
    assert set(flat) == set(default_run_config())


def test_shipped_scenarios_are_valid():
    for name in ("smoke", "demo"):
        AppConfig.from_run_config(resolve_run_config(load_overrides(f"simulations/{name}.toml")))


def test_scenarios_parse_and_bad_ones_name_the_entry(tmp_path):
    f = parse_faults('[{"site": "site-1", "kind": "label_noise", "rate": 0.4}, {"site": "site-2", "kind": "crash"}]')
    assert [(x.site, x.kind) for x in f] == [("site-1", "label_noise"), ("site-2", "crash")]
    assert f[0]["rate"] == 0.4 and f[1]["round"] == 2  # declared, or the kind's default
    with pytest.raises(ValueError, match="faults\\[0\\]: unknown kind 'melt'; known kinds: label_noise"):
        parse_faults('[{"site": "a", "kind": "melt"}]')
    with pytest.raises(ValueError, match="faults\\[0\\] \\(crash\\): unknown parameter\\(s\\) rate; crash takes round"):
        parse_faults('[{"site": "a", "kind": "crash", "rate": 1}]')
    # A scenario file's [[faults]] tables become the one JSON string every node sees.
    (tmp_path / "s.toml").write_text('[[faults]]\nsite = "site-0"\nkind = "label_flip"\nfrom = 2\nto = 0\n')
    cfg = AppConfig.from_run_config(load_overrides(tmp_path / "s.toml"))
    assert parse_faults(cfg.faults)[0].params == {"from": 2, "to": 0}
    with pytest.raises(ValueError, match="invalid fedlens config"):
        AppConfig.from_run_config({"faults": "not json"})


def test_a_stored_config_is_read_with_todays_defaults_and_without_its_checks():
    cfg = AppConfig.from_stored({"data.labels": "neg,neu,pos", "dp.loss-clip": 2.5})
    assert cfg.data.labels == ("neg", "neu", "pos") and cfg.dp.loss_clip == 2.5
    assert AppConfig.from_stored({}).dp.loss_clip == 3.0  # pyproject's default
    # An older store: a key this version dropped, a value its checks now refuse, a model folder not on this
    # machine: a reader still gets the run's own values.
    old = AppConfig.from_stored({"data.labels": "x,y,z", "train.class-weighting": "none", "dp.max-grad-norm": 0.0,
                                 "model.path": "/nowhere/model"})
    assert old.data.labels == ("x", "y", "z") and old.dp.max_grad_norm == 0.0 and old.model.path == "/nowhere/model"
    with pytest.raises(ValueError, match="dp.max-grad-norm"):
        AppConfig.from_run_config({"dp.max-grad-norm": 0.0})  # a run about to start is checked
