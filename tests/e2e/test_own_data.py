"""End to end: a new user's first try. Sites on their own files, with their own label column and label set,
everything else default: the run completes through the real simulation engine, the server evaluates nothing of its
own (and says which key would give it a test set), and the sites' own data is what the global model is scored on."""

import os
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_own_files_own_labels_everything_else_default(tmp_path):
    from common.run_store import load_run

    reviews = pd.DataFrame({
        "body": [f"the delivery was {w} and the support {v}" for w in ("late", "fast", "lost", "early")
                 for v in ("rude", "kind", "slow", "great", "absent", "helpful")] * 4,
        "verdict": ["complaint", "praise", "complaint", "praise", "complaint", "praise"] * 16,
    })
    for part in range(2):
        reviews.iloc[part::2].to_csv(tmp_path / f"shop-{part}.csv", index=False)
    scenario = tmp_path / "mine.toml"
    # Only what a user must say about their data (where, which columns, which labels) and a tiny model to stay
    # within a test's minutes; no server.central-eval, no class prior, no label mapping.
    scenario.write_text(f"""
data.source = "files"
data.files = "{tmp_path}/shop-{{partition}}.csv"
data.text-column = "body"
data.label-column = "verdict"
data.labels = "complaint,praise"
simulation.num-sites = 2
num-server-rounds = 2
model.tiny = true
""")
    store = tmp_path / "runs" / "fedlens.db"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "fedlens.cli", "simulate", "--scenario", str(scenario), "--store",
                           str(store)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "server.central-eval = auto: data.source = files has no held-out set at the server" in proc.stderr
    run = load_run(store)
    assert run["status"] == "completed" and len(run["rounds"]) == 2
    assert run["rounds"][-1]["test_macro_f1"] is None  # nothing of the server's own to score on
    assert run["rounds"][-1]["macro_f1"] is not None  # the sites' released summaries score the global model
    assert {s["site"] for s in run["sites"]} == {"site-0", "site-1"}
