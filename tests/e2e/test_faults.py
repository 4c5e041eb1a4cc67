"""A fault scenario through the real simulation engine: the run survives the injected crash, records it by site, and
keeps the ground truth apart from what the diagnosis reads."""

import os
import subprocess
import sys

import pytest

from common.run_store import load_faults, load_run

pytestmark = pytest.mark.slow


def test_the_crash_scenario_is_survived_recorded_and_its_ground_truth_kept(tmp_path):
    store = tmp_path / "s.db"
    proc = subprocess.run([sys.executable, "-m", "fedlens.cli", "simulate", "--scenario",
                           "simulations/faults/crash.toml", "--store", str(store), "--rounds", "2", "--sites", "3",
                           "--set", "server.save-model=false"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = load_run(store)
    assert run["status"] == "completed" and [r["sites_ok"] for r in run["rounds"]] == [3, 2]
    failed = [r for r in run["site_rounds"] if r["status"] == "failed"]
    assert {(r["round"], r["site"], r["phase"]) for r in failed} == {(2, "site-2", "train")}
    assert "injected crash at round 2" in failed[0]["reason"]
    assert ("site-2", "site-failed", 2) in {(f["site"], f["kind"], f["round"]) for f in run["findings"]}
    # The ground truth is in the store, but not in what load_run (report, dashboard, diagnosis) returns.
    assert load_faults(store, run["run_id"]) == [{"site": "site-2", "kind": "crash", "round": 2}]
    assert "faults" not in run
