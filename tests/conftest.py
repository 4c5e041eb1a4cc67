"""Shared fixtures: a tiny config, a tiny model and one site's data, all offline; and a check that no process the
suite started outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

# Every process the suite starts inherits this mark (subprocesses, their children, servers that detach from their
# parent): at the end, any process still carrying it was left behind.
SESSION_MARK = "FEDLENS_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# The tiny model with LoRA, the mode most of the suite's privacy and fault tests were written for (tokens through
# the whole model); head-mode tests set model.mode = "head" themselves.
TINY = {"model.tiny": True, "data.max-length": 32, "simulation.num-sites": 3, "num-server-rounds": 2,
        "model.mode": "lora", "train.optimizer": "adamw", "train.head-lr": 0.1,
        "train.batch-size": 32, "train.local-epochs": 1}  # several Poisson batches per epoch


@contextlib.contextmanager
def running_dashboard(store: str | Path):  # noqa: ANN201
    """`fedlens dashboard` on `store`, started as a user starts it: (its process, its URL) once it answers; stopped
    (SIGTERM) on the way out if it still runs."""
    from fedlens.loopback import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedlens.cli", "dashboard", "--store", str(store), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the dashboard did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)


def _left_behind(mark: str) -> dict[int, str]:
    """pid -> command line of every other process of this user whose environment carries `mark`."""
    found = {}
    needle = f"{SESSION_MARK}={mark}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """Fails the session if a process it started is still running 30 s after the last test (a dashboard, a
    SuperNode, a Ray worker); kills what it finds, so the next run starts clean."""
    yield
    if not Path("/proc/self/environ").exists():  # not Linux: nothing to read
        return
    mark = os.environ[SESSION_MARK]
    deadline = time.time() + 30
    while (left := _left_behind(mark)) and time.time() < deadline:
        time.sleep(1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, "processes started by the test suite outlived it:\n" + "\n".join(
        f"  {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items()))


@pytest.fixture(autouse=True)
def site_state(tmp_path_factory, monkeypatch):
    """Every test's sites keep their lifetime ledgers in a fresh folder, with the simulated sites' policy (as
    `fedlens simulate` prepares it): no test inherits another's spent ε."""
    from client.state import STATE_ENV
    from fedlens.simulate import prepare_site_state

    root = prepare_site_state(tmp_path_factory.mktemp("sites"))
    monkeypatch.setenv(STATE_ENV, str(root))
    return root


@pytest.fixture(scope="session")
def tiny_cfg():
    from common.config import AppConfig

    return AppConfig.from_run_config(TINY)


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    from common.model import load_tokenizer

    return load_tokenizer(tiny_cfg.model)


@pytest.fixture(scope="session")
def site_data(tiny_cfg, tokenizer):
    from client.data import SiteIdentity, load_site_data

    return load_site_data(tiny_cfg, SiteIdentity("site-0", 0, 3, ""), tokenizer)
