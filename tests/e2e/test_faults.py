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
                           "--set", "server.save-model=false", "--set", "server.cross-site-eval=true"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = load_run(store)
    assert run["status"] == "completed" and [r["sites_ok"] for r in run["rounds"]] == [3, 2]
    failed = [r for r in run["site_rounds"] if r["status"] == "failed"]
    assert {(r["round"], r["site"], r["phase"]) for r in failed} == {(2, "site-2", "train")}
    assert "injected crash at round 2" in failed[0]["reason"]
    assert ("site-2", "site_failed", 2) in {(f["site"], f["kind"], f["round"]) for f in run["findings"]}
    # The ground truth is in the store, but not in what load_run (report, dashboard, diagnosis) returns.
    assert load_faults(store, run["run_id"]) == [{"site": "site-2", "kind": "crash", "round": 2}]
    assert "faults" not in run

    # Cross-site evaluation ran through the real engine: every evaluating site scored the local models that were
    # aggregated (3 in round 1; the crashed site's is missing in round 2), inside its one noised release (Δ = 2).
    from common.run_store import load_summaries

    for rnd, models in ((1, ["site-0", "site-1", "site-2"]), (2, ["site-0", "site-1"])):
        summaries = load_summaries(store, run["run_id"], rnd)
        assert set(summaries) == {"site-0", "site-1", "site-2"}
        assert all(s["cross_site"]["models"] == models and len(s["cross_site"]["accuracy"]) == len(models)
                   for s in summaries.values())
    assert {e["sensitivity"] for e in run["ledger"] if e["kind"] == "summary"} == {2.0}
