"""End to end: smoke.toml through Flower's real simulation engine (Ray), then the report and the dashboard."""

import json
import os
import subprocess
import sys

import pytest

from common.config import PROJECT_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("smoke") / "fedlens.db"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "fedlens.cli", "simulate", "--scenario", "simulations/smoke.toml",
                           "--store", str(store)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return store


def test_smoke_run_report(smoke_store):
    proc = subprocess.run([sys.executable, "-m", "fedlens.cli", "report", "--store", str(smoke_store), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["status"] == "completed"
    assert rep["rounds_planned"] == rep["rounds_completed"] == 2
    assert [s["site"] for s in rep["sites"]] == ["site-0", "site-1", "site-2"]
    for s in rep["sites"]:
        assert s["status"] == "ok" and s["rounds_trained"] == 2
        assert 0 < s["epsilon"] <= s["epsilon_budget"] == 8.0
        assert s["delta"] == 1e-5 and s["examples"] > 0
        assert s["metrics"]["accuracy"] is not None
    for key in ("accuracy", "macro_f1", "loss"):
        assert rep["global"][key] is not None and rep["test"][key] is not None
    assert rep["findings"] == []
    # The final model loads with the plain transformers API.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(rep["model_path"], trust_remote_code=True)
    assert model.config.num_labels == 3


def test_dashboard_renders_the_real_run(smoke_store, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FEDLENS_STORE", str(smoke_store))
    at = AppTest.from_file(str(PROJECT_ROOT / "dashboard" / "streamlit_app.py"), default_timeout=60).run()
    assert not at.exception
    assert at.metric[0].value == "2 / 2"
    assert len(at.dataframe[0].value) == 3
