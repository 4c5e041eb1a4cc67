"""common/run_views.py: a stored run (what `load_run` returns) as one view per site, and its config as the tree."""

import json
import subprocess
import sys

import pytest

from common.config import PROJECT_ROOT, AppConfig, default_run_config
from common.run_views import diagnostics_share, run_config, site_views


def _row(site, round_, phase, status="ok", **values):
    # One site_rounds row as load_run returns it (every other column None).
    return {"site": site, "round": round_, "phase": phase, "status": status, "reason": values.pop("reason", ""),
            "epsilon": None, **values}


def _run(site_rounds=(), sites=(), events=(), config=None):
    return {"run_id": "r", "config": config or {}, "site_rounds": list(site_rounds), "events": list(events),
            "sites": [{"site": s, "n_train": n, "n_val": v, "joined_at": 0.0} for s, n, v in sites]}


def _event(kind, site, message):
    return {"round": None, "site": site, "kind": kind, "message": message, "at": 0.0}


def test_a_site_is_its_latest_round_its_most_epsilon_and_its_newest_values():
    # Prepare: two rounds; round 2 trains (σ 1.2, no cosine) but its evaluation carries no ECE
    run = _run(sites=[("a", 100, 20)], site_rounds=[
        _row("a", 1, "evaluate", accuracy=0.5, macro_f1=0.3, loss=1.0, train_loss=1.1, epsilon=3.3, ece=0.2,
             epsilon_training=2.0, epsilon_diagnostics=1.0, epsilon_lifetime=4.0, epsilon_cap=10.0),
        _row("a", 1, "train", epsilon=3.1, noise_multiplier=1.1, update_norm=2.0, update_cosine=0.1),
        _row("a", 2, "evaluate", accuracy=0.6, macro_f1=0.4, loss=0.9, train_loss=0.8, epsilon=6.5,
             epsilon_training=5.0, epsilon_diagnostics=2.0, epsilon_lifetime=7.5, epsilon_cap=12.0),
        _row("a", 2, "train", epsilon=6.0, noise_multiplier=1.2, update_norm=3.0),
    ])

    # Execute
    [v] = site_views(run)

    # Assert
    assert (v.site, v.registered, v.n_train, v.n_val, v.answered) == ("a", True, 100, 20, True)
    assert (v.status, v.reason, v.last_reason, v.rounds_trained) == ("ok", "", "", 2)
    assert (v.epsilon, v.epsilon_training, v.epsilon_diagnostics) == (6.5, 5.0, 2.0)
    assert (v.epsilon_lifetime, v.epsilon_cap, v.noise_multiplier) == (7.5, 12.0, 1.2)
    assert v.metrics == {"accuracy": 0.6, "macro_f1": 0.4, "loss": 0.9, "train_loss": 0.8}
    assert v.ece == 0.2  # round 1's: round 2 did not release one
    assert (v.update_norm, v.update_cosine) == (3.0, 0.1)
    assert v.label_issues is None and v.clip_fraction is None and v.signal_to_noise is None


def test_the_last_row_that_is_not_ok_decides_the_status_and_the_reason():
    # Prepare: a site that failed in round 1 and whose round 2 is refused (train) after a failed evaluation
    run = _run(sites=[("a", 10, 5)], site_rounds=[
        _row("a", 1, "train", "failed", reason="timeout"),
        _row("a", 2, "evaluate", "failed", reason="eval broke"),
        _row("a", 2, "train", "refused", reason="budget would be exceeded by 0.3", noise_multiplier=None),
    ])

    # Execute
    [v] = site_views(run)

    # Assert
    assert (v.status, v.reason) == ("refused", "budget would be exceeded by 0.3")
    assert v.last_reason == "budget would be exceeded by 0.3"
    assert v.rounds_trained == 0 and v.metrics is None and v.epsilon is None

    # An ok latest round keeps the older reason as the last one, and the status ok.
    [ok] = site_views(_run(sites=[("a", 10, 5)], site_rounds=[_row("a", 1, "train", "failed", reason="timeout"),
                                                              _row("a", 2, "train")]))
    assert (ok.status, ok.reason, ok.last_reason) == ("ok", "", "timeout")


def test_sites_that_joined_come_first_then_rows_without_a_join_then_failures_only():
    # Prepare: "waiting" joined and never answered; "rowonly" answered without joining; "ghost" only failed to start
    run = _run(sites=[("a", 10, 5), ("waiting", None, None)],
               site_rounds=[_row("a", 1, "train"), _row("rowonly", 1, "evaluate", "failed", reason="bad")],
               events=[_event("site-joined", "a", "a joined"),
                       _event("site-failed", "ghost", "ghost failed to start: boom"),
                       _event("site-failed", "rowonly", "rowonly failed to start: x"),
                       _event("site-failed", "ghost", "ghost failed again"),
                       _event("run-failed", None, "RuntimeError: boom")])

    # Execute
    views = site_views(run)

    # Assert
    assert [v.site for v in views] == ["a", "waiting", "rowonly", "ghost"]
    by = {v.site: v for v in views}
    assert (by["waiting"].status, by["waiting"].answered, by["waiting"].registered) == ("waiting", False, True)
    assert (by["rowonly"].status, by["rowonly"].registered, by["rowonly"].n_train) == ("failed", False, None)
    assert (by["ghost"].failure, by["ghost"].failure_at) == ("ghost failed to start: boom", 1)
    assert (by["rowonly"].failure_at, by["a"].failure, by["a"].failure_at) == (2, "", None)
    assert by["ghost"].status == "waiting" and not by["ghost"].answered


def test_an_empty_run_has_no_views():
    assert site_views(_run()) == []


def test_a_stored_config_reads_as_the_tree_with_todays_defaults_for_what_it_lacks():
    # Prepare: a resolved config as the server stores it (store.* keys included), one older with keys missing
    stored = {**default_run_config(), "dp.target-epsilon": 4.0, "store.run-id": "r", "store.path": "/x/fedlens.db"}
    partial = {"dp.enabled": True, "dp.target-epsilon": 8}

    # Execute
    full, older = run_config(_run(config=stored)), run_config(_run(config=partial))

    # Assert
    assert isinstance(full, AppConfig)
    assert (full.dp.target_epsilon, full.store.run_id, full.store.path) == (4.0, "r", "/x/fedlens.db")
    assert older.dp.target_epsilon == 8.0 and isinstance(older.dp.target_epsilon, float)
    assert older.dp.target_delta == 1e-5 and older.dp.diagnostics_share == 0.25  # pyproject's defaults
    assert older.data.labels == ("negative", "neutral", "positive")
    assert run_config(_run()).dp.enabled is True


def test_a_stored_config_is_read_even_where_it_would_not_validate_here():
    # Prepare: a model folder that is not on this machine, and a key this version does not know
    stored = {"model.path": "/nowhere/model", "dp.enabled": False, "old.removed-key": 1}
    with pytest.raises(ValueError):
        AppConfig.from_run_config({k: v for k, v in stored.items() if k != "old.removed-key"})

    # Execute
    cfg = run_config(_run(config=stored))

    # Assert
    assert cfg.model.path == "/nowhere/model" and cfg.dp.enabled is False
    assert "old.removed-key" not in cfg.raw


def test_run_views_imports_the_standard_library_only():
    # `fedlens report` reads it: no pandas, Streamlit or numpy behind it.
    code = "import json, sys, common.run_views; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    top = {m.split(".")[0] for m in json.loads(proc.stdout)}
    assert top.isdisjoint({"pandas", "streamlit", "numpy", "torch", "flwr"}), sorted(top)


def test_the_diagnostics_share_is_the_runs_own_never_a_default():
    assert diagnostics_share(_run(config={"dp.enabled": True, "dp.diagnostics-share": 0.1})) == 0.1
    assert diagnostics_share(_run(config={"dp.enabled": True})) is None  # a store from before the share existed
    assert diagnostics_share(_run(config={"dp.enabled": False, "dp.diagnostics-share": 0.1})) is None
