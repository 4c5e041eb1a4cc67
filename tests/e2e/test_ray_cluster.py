"""Simulation on an existing Ray cluster: a local Ray head on loopback, and `fedlens simulate --ray-address` on it."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.run_store import load_run

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head():
    port = _free_port()
    # Ray puts unix sockets under its temp dir, whose path must stay short (pytest's tmp_path is too long).
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # The cluster's workers are the simulated sites: they keep their lifetime ledgers where this points.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FEDLENS_SITE_STATE": str(Path(temp) / "sites")}
    # --block keeps `ray start` in the foreground: stopping it stops this head only. (`ray stop` would stop every Ray
    # process on the machine, other simulations included.)
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir",
                             temp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        for _ in range(240):
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited with {head.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the Ray head did not open its port within 120 s")
        yield f"127.0.0.1:{port}", temp
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_simulation_runs_on_an_existing_ray_cluster(ray_head, tmp_path):
    store = tmp_path / "s.db"
    proc = subprocess.run([sys.executable, "-m", "fedlens.cli", "simulate", "--scenario", "simulations/smoke.toml",
                           "--store", str(store), "--ray-address", ray_head[0], "--set", "server.save-model=false"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                               "FEDLENS_SITE_STATE": str(Path(ray_head[1]) / "sites")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The sites' lifetime ledgers are where the cluster's environment said, one folder per site.
    assert sorted(p.parent.name for p in (Path(ray_head[1]) / "sites").glob("*/lifetime.json")) == [
        "site-0", "site-1", "site-2"]
    run = load_run(store)
    assert run["status"] == "completed" and len(run["rounds"]) == 2
    assert {r["site"] for r in run["site_rounds"]} == {"site-0", "site-1", "site-2"}
    # It really used the cluster we started, not a private one: the head's logs hold the sites' actors.
    logs = Path(ray_head[1]) / "session_latest" / "logs"
    assert any("ClientAppActor" in f.read_text(errors="ignore") for f in logs.glob("*worker*") if f.is_file())
