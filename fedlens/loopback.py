"""Deployment, on one machine: a real loopback deployment of fedlens, for the deployment tests and `fedlens bench`.

`fedlens link` (flower-superlink with TLS, SuperNode auth and a database on loopback, its flower-superexec and the
Fleet gate), `fedlens site` per site (flower-supernode and the site's runner), `flwr supernode register` and
`flwr run .`. Every process is real and started the way README's "Deploy to real sites" says; each runs in its own
process group so that a caller can kill -9 it (and its children) like a crashed machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common.config import PROJECT_ROOT

ROOT = PROJECT_ROOT
BIN = Path(sys.executable).parent
LABELS = ("negative", "neutral", "positive")
# The tiny model keeps a deployment test to minutes on 2 cores; everything else is the product's default path.
RUN_CONFIG = {"model.tiny": True, "data.max-length": 32, "data.source": "files",
              "data.labels": "negative,neutral,positive", "train.batch-size": 32,
              "train.local-epochs": 1, "server.central-eval": "", "server.save-model": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_site_csv(path: Path, seed: int, rows: int = 60) -> Path:
    """A site's own file: `rows` reviews drawn from the embedded training set (columns review, rating)."""
    from common.datasets import LABEL, TEXT, load_drugreview

    reviews = load_drugreview("train", LABELS)
    pick = reviews.iloc[np.random.default_rng(seed).choice(len(reviews), size=rows, replace=False)]
    pick.assign(review=pick[TEXT], rating=[LABELS[i] for i in pick[LABEL]])[["review", "rating"]].to_csv(
        path, index=False)
    return path


class Deployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()  # the sites' port: the Fleet gate
        self.control_port = free_port()  # the SuperLink itself, on loopback: flwr run / register, the ServerApp
        self.certs = root / "certs"
        self.flwr_home = root / "flwr"
        self.store = root / "runs" / "fedlens.db"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.env = {**os.environ, "FLWR_HOME": str(self.flwr_home), "PATH": f"{BIN}:{os.environ['PATH']}",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.flwr_home.mkdir(parents=True)
        # Flower 1.41 reads connections from $FLWR_HOME/config.toml, not from pyproject.
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.control_port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n\n'
            # The public address, as an outsider would try it for the Control API.
            f'[superlink.public]\naddress = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n')

    # --- processes -----------------------------------------------------------------------------------------------

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def fedlens(self, *args: str) -> list[str]:
        return [str(BIN / "fedlens"), *args]

    def certs_for(self, *sites: str) -> None:
        subprocess.run(self.fedlens("certs", "--out", str(self.certs), "--sites", ",".join(sites)), check=True,
                       capture_output=True, env=self.env)

    def start_link(self) -> None:
        # The log is appended to across restarts: wait for this start's line, not the previous one's (a restarted
        # SuperLink found "ready" by the old line was asked for a run before it listened, under load).
        ready = "fedlens gate: sites dial"  # the last of the three to start (SuperLink, SuperExec, gate)
        before = self.log("link").count(ready)
        self.start("link", self.fedlens("link", "--certs", str(self.certs), "--port", str(self.port),
                                        "--control-port", str(self.control_port), "--database",
                                        str(self.root / "superlink.db")))
        self.wait_for(lambda: self.log("link").count(ready) > before, 30, "the SuperLink to start")

    def register(self, *sites: str) -> None:
        """`flwr supernode register` for each site's key, all at once (each is a CLI process of ~1 s)."""
        procs = {site: subprocess.Popen([str(BIN / "flwr"), "supernode", "register",
                                         str(self.certs / "sites" / f"{site}.pub"), "test", "--name", site],
                                        cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True) for site in sites}
        try:
            for site, proc in procs.items():
                out = proc.communicate(timeout=120)[0]
                if "registered successfully" not in out:
                    raise RuntimeError(f"flwr supernode register {site} failed:\n{out}")
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def start_site(self, site: str, data: Path | None, *, extra: list[str] | None = None) -> subprocess.Popen:
        # One CPU thread a site, as the simulation gives each site simulation.client-cpus = 1 (Ray): every site of
        # the deployment shares this machine's cores, and torch's default (a thread per core in each site) had
        # them fight for the cores (a round 3.5-3.9 s against 3.0-3.3 s, docs/PERFORMANCE.md).
        # A 10 s heartbeat (Flower's least): a killed site is reported after ~20 s, not ~60 s (loopback never drops
        # a beat).
        args = self.fedlens("site", site, "--superlink", f"127.0.0.1:{self.port}", "--certs", str(self.certs),
                            "--port", str(free_port()), "--state-dir", str(self.root / "state" / site),
                            "--threads", "1", "--heartbeat", "10")
        if data is not None:
            args += ["--data", str(data)]
        return self.start(site, args + (extra or []))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process and everything it started (a machine going down)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.procs):
            if self.procs[name].poll() is None:
                self.kill(name, signal.SIGTERM)

    # --- Flower CLI and the run store ----------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120) -> str:
        res = subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        return res.stdout + res.stderr

    def run(self, run_id: str, rounds: int, **overrides: object) -> str:
        """`flwr run .` against the deployment (not waiting for it); returns Flower's output."""
        config = {**RUN_CONFIG, "num-server-rounds": rounds, "store.path": str(self.store), "store.run-id": run_id,
                  "scenario": run_id, **overrides}
        path = self.root / f"{run_id}.toml"
        path.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in config.items()))
        out = self.flwr("run", ".", "test", "--run-config", str(path))
        if "Successfully started run" not in out:
            raise RuntimeError(f"flwr run {run_id} failed:\n{out}")
        return out

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        if not self.store.is_file():
            return []
        conn = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # the schema is not written yet
        finally:
            conn.close()

    def status(self, run_id: str) -> str | None:
        rows = self.query("SELECT status FROM runs WHERE run_id = ?", (run_id,))
        return rows[0][0] if rows else None

    def rounds(self, run_id: str) -> list[int]:
        return [r[0] for r in self.query("SELECT round FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))]

    def wait_for(self, check, timeout: float, what: str) -> None:  # noqa: ANN001
        deadline = time.time() + timeout
        while time.time() < deadline:
            if check():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tails()}")

    def wait_done(self, run_id: str, timeout: float = 420) -> str:
        self.wait_for(lambda: self.status(run_id) in ("completed", "failed"), timeout, f"run {run_id} to finish")
        return self.status(run_id)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs and self.logs[name].exists() else ""

    def tails(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-3000:]}" for n in self.logs)
