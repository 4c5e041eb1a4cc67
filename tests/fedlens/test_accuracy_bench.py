"""The accuracy benchmark's inputs and table: its recipes are valid configs, bad options fail before any run."""

import pytest

from common.config import AppConfig
from fedlens import accuracy_bench as bench


@pytest.mark.parametrize("workload", list(bench.WORKLOADS))
@pytest.mark.parametrize("mode", list(bench.MODES))
def test_every_recipe_is_a_valid_config_for_every_workload(workload, mode):
    cfg = AppConfig.from_run_config(bench._config(workload, {**bench.MODES[mode], "num-server-rounds": 3}))
    assert cfg.model.mode == bench.MODES[mode]["model.mode"]
    assert cfg.server.save_model is False and cfg.server.keep_rounds == 0  # bench runs keep nothing
    if mode == "head-then-lora":
        assert cfg.on_features(1) and not cfg.on_features(2)  # one probe round, then the adapters


@pytest.mark.parametrize("kwargs, message", [
    ({"workloads": ["films"]}, "unknown workload(s) films"),
    ({"modes": ["lora", "qlora"]}, "unknown mode recipe(s) qlora"),
    ({"seeds": 0}, "--seeds must be at least 1"),
    ({"modes": ["lora"], "rounds": -1}, "--rounds must be 0"),
])
def test_bad_options_fail_before_any_run(kwargs, message, monkeypatch):
    monkeypatch.setattr(bench, "simulate", lambda *a, **k: pytest.fail("a run was started"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bench.run(**kwargs)


def test_mode_table_lists_each_recipe_with_its_spread():
    out = {"workloads": {"movies": {"epsilon": 8.0, "rounds": 3, "seeds": 2, "modes": {
        "head": {"macro_f1": 0.751, "macro_f1_std": 0.004, "accuracy": 0.76, "top_share": 0.55, "seconds": 120.0},
        "lora": {"macro_f1": 0.702, "macro_f1_std": 0.021, "accuracy": 0.71, "top_share": 0.61, "seconds": 1400.0}}}}}
    table = bench.format_table(out).splitlines()
    assert table[1].split()[:5] == ["movies", "head", "0.751", "±", "0.004"]
    assert table[2].split()[:5] == ["movies", "lora", "0.702", "±", "0.021"]
    assert "over 3 rounds" in table[-1] and "2 seed(s)" in table[-1]


def test_sweep_table_has_one_row_per_workload():
    dp = {e: {"macro_f1": 0.7, "macro_f1_std": 0.01, "top_share": 0.5, "site_accuracy_noise_std": 0.015}
          for e in bench.EPSILONS}
    out = {"workloads": {"movies": {"majority_macro_f1": 0.346, "centralised_macro_f1": 0.761,
                                    "centralised_macro_f1_std": 0.002, "federated_nondp_macro_f1": 0.759,
                                    "federated_nondp_macro_f1_std": 0.003, "dp": dp}}}
    row = bench.format_table(out).splitlines()[1].split()
    assert row[:3] == ["movies", "0.346", "0.761"] and row[-1] == "0.0150"
