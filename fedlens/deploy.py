"""Deployment, steps 1-5 across machines: the Flower processes each party runs, started with fedlens' secure defaults.

    coordinator:  fedlens link --certs certs            flower-superlink on loopback (TLS, SuperNode auth, state in
                                                        a database, no runtime installs, --isolation process) +
                                                        flower-superexec + the Fleet gate on the public address
    each site:    fedlens site hospital-a --data a.csv  flower-supernode (the CA, the site's own key, its name, data
                  --superlink link:8000 --certs certs   path and state folder as node config)

These only build the Flower command lines (printed first, so an operator can run them by hand or in their own
service manager) and supervise the processes. Why `--isolation process` with a separately started SuperExec: with
Flower's default (`subprocess`) the ServerApp dies with a restarted SuperLink and the run ends failed; with a
SuperExec of its own the ServerApp survives a SuperLink restart (../shared/notes/reliability.md, measured on 1.41).
If the ServerApp dies as well, `flwr run` with the same `store.run-id` resumes the run (server/server_app.py).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.records import SITE_NAME

LOOPBACK = ("localhost", "127.0.0.1", "::1")
SECRET = "superexec.secret"  # shared by the SuperLink and its SuperExec: only they may run ServerApps
# Flower, Hugging Face: no telemetry, no hub, no runtime installs (the packages are installed with fedlens).
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


class DeployError(ValueError):
    """A deployment that would start insecure or broken; the message says what is missing and the fix."""


def _bin(name: str) -> str:
    # The Flower entry points next to this Python (the virtualenv), whatever the caller's PATH.
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _need(path: Path, what: str) -> str:
    if not path.is_file():
        raise DeployError(f"{what} not found at {path}; make the deployment's keys with `fedlens certs --out "
                          f"{path.parent if path.parent.name != 'sites' else path.parent.parent} --sites ...`, "
                          "or pass your own files")
    return str(path.resolve())


CONTROL_PORT = 9093  # the SuperLink's own port, on loopback: the operators' Control API and the Runtime API


def secret_path(certs: Path | None, database: Path) -> Path:
    """Where the coordinator's SuperExec secret lives: certs/superexec.secret, or beside the database with
    --insecure."""
    return (certs / SECRET if certs is not None else database.parent / SECRET).resolve()


def ensure_secret(path: Path) -> Path:
    """The SuperLink / SuperExec shared secret at `path`, made (32 random bytes, hex, mode 0600) if missing: the
    Runtime API never runs unauthenticated."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created readable by the owner only from its first byte (no window under the default umask).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def link_commands(*, certs: Path | None, host: str, port: int, database: Path, log_file: Path | None = None,
                  insecure: bool = False, control_port: int = CONTROL_PORT,
                  secret: Path | None = None) -> list[list[str]]:
    """[flower-superlink ..., flower-superexec ..., the Fleet gate ...] for the coordinating site.

    The SuperLink listens on 127.0.0.1:`control_port` only; the sites dial `host`:`port`, where the Fleet gate
    (fedlens/gate.py) passes Flower's Fleet API and nothing else. `secret`: the SuperExec secret file (default
    certs/superexec.secret, or beside the database with --insecure); `fedlens link` makes it when missing.

    Raises:
        DeployError: no certificates without --insecure, --insecure on an address other sites can reach, or the
            public and control ports the same.
    """
    if port == control_port:
        raise DeployError(f"--port {port} and --control-port {control_port} must differ: the sites' port passes "
                          "only the Fleet API, the control port (loopback) serves the operators and the ServerApp")
    secret = secret.resolve() if secret is not None else secret_path(certs, database)
    link = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(control_port), "--database",
            str(database), "--isolation", "process", "--disable-runtime-dependency-installation",
            "--superexec-auth-secret-file", str(secret)]
    execd = [_bin("flower-superexec"), "--runtime-api-address", f"127.0.0.1:{control_port}",
             "--superexec-auth-secret-file", str(secret)]
    gate = [sys.executable, "-m", "fedlens.gate", "--listen", f"{host}:{port}"]
    if log_file is not None:
        link += ["--log-file", str(log_file)]
    if insecure:
        if not _is_loopback(host):
            raise DeployError(f"--insecure with --host {host}: plaintext traffic and no SuperNode authentication on "
                              "an address other machines can reach is refused; use TLS (fedlens certs) or a "
                              "loopback host for local testing")
        return [link + ["--insecure"], execd + ["--insecure"],
                gate + ["--upstream", f"http://127.0.0.1:{control_port}"]]
    if certs is None:
        raise DeployError("no --certs folder: the SuperLink needs TLS (ca.crt, server.crt, server.key); make them "
                          "with `fedlens certs --out certs --sites N`, or pass --insecure for a loopback test")
    ca = _need(certs / "ca.crt", "CA certificate")
    cert, key = _need(certs / "server.crt", "server certificate"), _need(certs / "server.key", "server key")
    link += ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key, "--enable-supernode-auth"]
    execd += ["--root-certificates", ca]
    gate += ["--upstream", f"https://127.0.0.1:{control_port}", "--ssl-certfile", cert, "--ssl-keyfile", key,
             "--ca", ca]
    if (certs / "registry.toml").is_file():  # fedlens certs writes it: only its sites' signed requests are read
        gate += ["--registry", str((certs / "registry.toml").resolve())]
    return [link, execd, gate]


def site_command(*, name: str, superlink: str, data: Path | None, state_dir: Path, port: int,
                 ca: Path | None = None, key: Path | None = None, insecure: bool = False,
                 max_retries: int | None = None, policy: dict[str, float | bool] | None = None,
                 heartbeat: int = 30) -> list[str]:
    """flower-supernode ... (run as fedlens.supernode) for one site: TLS to the link, its auth key, and its name,
    data, state and privacy policy (client/policy.py keys: epsilon-cap, delta, min-noise-multiplier, allow-non-dp)
    as node config; `heartbeat`: the interval it declares to the link (fedlens/supernode.py).

    Raises:
        DeployError: a bad site name, a data file that does not exist, missing key material without --insecure, or
            a heartbeat outside Flower's 10..1800 s.
    """
    if not 10 <= heartbeat <= 1800:
        raise DeployError(f"--heartbeat {heartbeat}: expected 10 to 1800 seconds (the interval the SuperLink accepts)")
    if not SITE_NAME.match(name):
        raise DeployError(f"site name {name!r}: expected letters, digits, '.', '_' or '-' (at most 63)")
    config = [f'site-name="{name}"', f'state-dir="{state_dir.resolve()}"']
    if data is not None:
        if not data.is_file():
            raise DeployError(f"site {name}: data file {data} does not exist; expected a CSV, JSONL or Parquet file "
                              "with a text and a label column")
        if '"' in str(data.resolve()):
            raise DeployError(f"site {name}: the data path {data} may not contain a double quote")
        config.append(f'data-path="{data.resolve()}"')
    for k, v in (policy or {}).items():
        config.append(f"{k}={'true' if v is True else 'false' if v is False else repr(float(v))}")
    # --isolation process: the SuperNode runs no ClientApp itself; the site's own runner (runner_command) does, in
    # one long-lived process, after checking the app's digest. The two share a secret that signs task requests.
    # fedlens.supernode is flower-supernode polling with a backoff instead of Flower's fixed 3 s (its docstring).
    cmd = [sys.executable, "-m", "fedlens.supernode", "--superlink", superlink, "--port", str(port),
           "--node-config", " ".join(config), "--isolation", "process",
           "--superexec-auth-secret-file", str((state_dir / RUNNER_SECRET).resolve())]
    if heartbeat != 30:
        cmd += ["--heartbeat-interval", str(heartbeat)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if insecure:
        return cmd + ["--insecure"]
    if ca is None or key is None:
        raise DeployError(f"site {name}: TLS needs the deployment's CA certificate (--ca or --certs) and the site's "
                          "private key (--key or --certs); pass --insecure only for a loopback test")
    return cmd + ["--root-certificates", _need(ca, "CA certificate"),
                  "--auth-supernode-private-key", _need(key, f"site {name}'s private key")]


RUNNER_SECRET = "runner.secret"  # in the site's state folder: shared by its SuperNode and its runner


def runner_command(*, port: int, state_dir: Path, digests: list[str] | None = None, threads: int = 0) -> list[str]:
    """The site's ClientApp runner (fedlens/site_runner.py) beside its SuperNode on `port`: one long-lived process
    that runs only apps of the pinned `digests` (default: its own install's), on `threads` CPU threads (0: torch's
    default, every core).

    Raises:
        DeployError: a digest that is not 64 hex characters.
    """
    if threads < 0:
        raise DeployError(f"--threads {threads}: expected 0 (every core) or a positive number of CPU threads")
    bad = [d for d in digests or [] if len(d) != 64 or any(c not in "0123456789abcdef" for c in d)]
    if bad:
        raise DeployError(f"--app-digest {bad[0]!r}: expected the SHA-256 of an app bundle, 64 lowercase hex "
                          "characters (the error reply of a refused app names the one the coordinator sent)")
    cmd = [sys.executable, "-m", "fedlens.site_runner", "--runtime-api-address", f"127.0.0.1:{port}",
           "--secret-file", str((state_dir / RUNNER_SECRET).resolve())]
    for d in digests or []:
        cmd += ["--app-digest", d]
    if threads > 0:
        cmd += ["--threads", str(threads)]
    return cmd


def supervise(commands: list[list[str]], *, cwd: Path | None = None) -> int:
    """Start the processes, stop them all when one exits or on Ctrl-C / SIGTERM; returns the first exit code."""
    # FLWR_INTERNAL_GRPC_* would open Flower's old gRPC APIs (Control on 0.0.0.0:9093) beside the gate: never passed.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_GRPC_")},
           **{k: v for k, v in OFFLINE_ENV.items() if k not in os.environ}}
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for cmd in commands:
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=env))
            time.sleep(1.0)  # the SuperLink listens before its SuperExec dials it
        while not stopping:
            codes = [p.poll() for p in procs]
            if any(c is not None for c in codes):
                return next(c for c in codes if c is not None)
            time.sleep(0.5)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
