"""Steps 1-5 on one machine: run a scenario on Flower's simulation engine (Ray backend), in this process, with the
run config resolved here."""

from __future__ import annotations

import os
import random
import threading
from dataclasses import replace
from pathlib import Path

from common.config import PROJECT_ROOT, RunConfig

SIMULATION_POLICY = """\
# The privacy policy of the simulated sites in this folder (client/policy.py; pyproject [tool.fedlens.site-policy]
# holds the defaults a real site starts from). A site's lifetime ledger (lifetime.json in its folder) spans every
# run, replay and resume on this store. Edit this file, or give a site its own sites/<site>/policy.toml.
epsilon-cap = 100.0             # lifetime ε per site over all runs of this store (a real site's default: 10)
allow-non-dp = true             # simulated sites take non-DP baselines (a real site's default: false)
allow-injected-faults = true    # simulated sites apply a scenario's faults (a real site's default: false)
"""


def prepare_site_state(root: Path) -> Path:
    """The folder of the simulated sites' own state (one sub-folder each) with their policy, made if missing."""
    root.mkdir(parents=True, exist_ok=True)
    policy = root / "policy.toml"
    if not policy.is_file():
        policy.write_text(SIMULATION_POLICY)
    return root


def run_simulation(config: RunConfig, *, num_sites: int, client_cpus: float, client_gpus: float,
                   ray_address: str = "") -> None:
    """Start the ServerApp and `num_sites` virtual SuperNodes running the ClientApp, and wait for the end.

    This is what `flwr run .` does on a local simulation SuperLink, minus the detached SuperLink process: the
    components are loaded from pyproject's [tool.flwr.app.components], and every node sees `config` (already the
    defaults fused with the scenario) as its run config.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from client.state import STATE_ENV

    # The simulated sites keep their lifetime ledgers and policy next to the store (a real site: its own disk).
    sites = os.environ.get(STATE_ENV) or str(Path(str(config["store.path"])).resolve().parent / "sites")
    os.environ[STATE_ENV] = str(prepare_site_state(Path(sites)))
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation  # the entry flwr-simulation itself uses
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run_id = random.getrandbits(63)
    run = Run.create_empty(run_id=run_id)
    run = replace(run, override_config=dict(config), federation_id=NOOP_FEDERATION_ID,
                  primary_task_id=random.getrandbits(63))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run.primary_task_id, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config))
    init_args: dict = {"include_dashboard": False, "num_cpus": os.cpu_count() or 2}
    if ray_address:
        # The cluster's workers read FEDLENS_SITE_STATE from their own environment (set it where `ray start` runs;
        # README "Simulate"): a job-level runtime_env would need Ray's runtime-env agent, which a minimal cluster
        # does not run.
        init_args = {"address": ray_address}
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
                      "init_args": init_args}
    # The project folder is the Flower app: pyproject.toml + the server/ client/ common/ packages.
    app_dir = PROJECT_ROOT
    _run_simulation(
        num_supernodes=num_sites,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        server_app_attr="server.server_app:app",
        client_app_attr="client.client_app:app",
        backend_name="ray",
        backend_config=backend_config,
        app_dir=str(Path(app_dir)),
        run=run,
        server_app_context=context,
        is_app=True,
        verbose_logging=False,
    )


def wait_rounds(store: Path, run_id: str, stop: threading.Event, on_round, poll: float = 1.0) -> None:  # noqa: ANN001
    """Follow a run in the store from another thread: calls on_round(rounds_completed, status) on each change."""
    from common.run_store import list_runs

    seen = (-1, "")
    while not stop.is_set():
        try:
            runs = {r["run_id"]: r for r in list_runs(store)} if store.is_file() else {}
        except Exception:  # noqa: BLE001 (the store may be mid-creation; try again)
            runs = {}
        r = runs.get(run_id)
        if r is not None and (r["rounds_completed"], r["status"]) != seen:
            seen = (r["rounds_completed"], r["status"])
            on_round(*seen)
        stop.wait(poll)
