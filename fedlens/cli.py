"""The `fedlens` command: simulate a scenario, report a run, open the dashboard.

Run as:  fedlens simulate --scenario simulations/smoke.toml
         fedlens report --json
         fedlens whatif --round 3 --exclude site-2
         fedlens bench --only dp_overhead,bytes_per_round --json
         fedlens dashboard --port 8501
Progress and logs go to stderr; only data (the report) goes to stdout. Exit codes: 0 ok, 1 failed, 2 usage error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Federated DP fine-tuning with Flower + Opacus, and cross-site debugging.")
DEFAULT_STORE = "runs/fedlens.db"


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def simulate(
    scenario: Annotated[Path | None, typer.Option(help="a TOML of run-config overrides, e.g. simulations/demo.toml")] = None,
    rounds: Annotated[int | None, typer.Option(help="override num-server-rounds")] = None,
    sites: Annotated[int | None, typer.Option(help="override simulation.num-sites")] = None,
    store: Annotated[Path | None, typer.Option(help="run store file (default: store.path of the config)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any config key, e.g. --set dp.enabled=false")] = None,
    ray_address: Annotated[str, typer.Option(help="connect to an existing Ray cluster (e.g. auto or host:6379)")] = "",
) -> None:
    """Run a scenario on Flower's simulation engine and follow it round by round."""
    from common.config import AppConfig, load_overrides, resolve_run_config

    try:
        overrides = load_overrides(scenario) if scenario else {}
        extra: dict = {}
        for item in set_ or []:
            if "=" not in item:
                _fail(f"--set expects key=value, got {item!r}", 2)
            k, v = item.split("=", 1)
            extra[k.strip()] = _parse_value(v.strip())
        if rounds is not None:
            extra["num-server-rounds"] = rounds
        if sites is not None:
            extra["simulation.num-sites"] = sites
        if store is not None:
            extra["store.path"] = str(store)
        config = resolve_run_config(overrides, extra)
        from server.server_app import new_run_id

        config["store.run-id"] = config["store.run-id"] or new_run_id(str(config["scenario"]))
        cfg = AppConfig.from_run_config(config)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e), 2)

    store_path = Path(cfg.store.path)
    typer.echo(f"run {cfg.store.run_id}: {cfg.simulation.num_sites} sites, {cfg.num_server_rounds} rounds -> "
               f"{store_path}", err=True)
    _run_with_progress(config, cfg, store_path, ray_address or os.environ.get("RAY_ADDRESS", ""))

    from fedlens.report import build_report, format_text

    try:
        rep = build_report(store_path, cfg.store.run_id)
    except (LookupError, FileNotFoundError) as e:
        _fail(f"the run did not start: {e}")
    typer.echo(format_text(rep), err=True)
    typer.echo(f"\nresults: fedlens report --store {store_path} --run {cfg.store.run_id}\n"
               f"dashboard: fedlens dashboard --store {store_path}", err=True)
    if rep["status"] != "completed":
        raise typer.Exit(1)


def _parse_value(v: str) -> bool | int | float | str:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v.strip('"').strip("'")


def _run_with_progress(config: dict, cfg, store_path: Path, ray_address: str) -> None:  # noqa: ANN001
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fedlens.simulate import run_simulation, wait_rounds

    stop = threading.Event()
    with Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True)) as progress:
        task = progress.add_task("rounds", total=cfg.num_server_rounds)

        def on_round(done: int, status: str) -> None:
            progress.update(task, completed=done)

        watcher = threading.Thread(target=wait_rounds, args=(store_path, cfg.store.run_id, stop, on_round), daemon=True)
        watcher.start()
        try:
            run_simulation(config, num_sites=cfg.simulation.num_sites, client_cpus=cfg.simulation.client_cpus,
                           client_gpus=cfg.simulation.client_gpus,
                           ray_address=ray_address)
        except Exception as e:  # noqa: BLE001 (the run store says what happened; the report below shows it)
            typer.echo(f"simulation ended with an error: {e}", err=True)
        finally:
            stop.set()
            watcher.join(timeout=5)
            from common.run_store import list_runs

            done = next((r["rounds_completed"] for r in list_runs(store_path) if r["run_id"] == cfg.store.run_id), 0) \
                if store_path.is_file() else 0
            progress.update(task, completed=done)


@app.command()
def report(
    store: Annotated[Path, typer.Option(help="run store file")] = Path(DEFAULT_STORE),
    run: Annotated[str | None, typer.Option(help="run id (default: the newest run)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print the JSON contract of docs/report-schema.md")] = False,
) -> None:
    """Print a run: status, global and per-site metrics, ε per site, failures."""
    from fedlens.report import build_report, dumps, format_text

    try:
        rep = build_report(store, run)
    except (LookupError, FileNotFoundError) as e:
        if json_:
            typer.echo(dumps({"success": False, "error": str(e)}))
        _fail(str(e))
    typer.echo(dumps(rep) if json_ else format_text(rep))


@app.command()
def whatif(
    round_: Annotated[int, typer.Option("--round", help="the round to re-aggregate")],
    exclude: Annotated[str, typer.Option(help="comma-separated site names to leave out")],
    store: Annotated[Path, typer.Option(help="run store file")] = Path(DEFAULT_STORE),
    run: Annotated[str | None, typer.Option(help="run id (default: the newest run)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Re-aggregate a round without some sites and compare both global models on the server's test set."""
    import json

    from server.whatif import reaggregate

    try:
        out = reaggregate(store, run, round_, [s.strip() for s in exclude.split(",") if s.strip()])
    except (LookupError, ValueError, FileNotFoundError) as e:
        if json_:
            typer.echo(json.dumps({"success": False, "error": str(e)}))
        _fail(str(e))
    if json_:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"run {out['run_id']} round {out['round']}: without {', '.join(out['excluded'])} "
               f"({len(out['sites_used'])} site(s), {out['examples_used']} examples left); "
               f"weights moved by {out['distance']:.4f}")
    if out["actual"] is None:
        typer.echo(out.get("note", ""))
        return
    for k in ("accuracy", "macro_f1", "loss"):
        typer.echo(f"  test {k:<9} actual {out['actual'][k]:.4f}   without {out['without'][k]:.4f}   "
                   f"change {out['change'].get(k, float('nan')):+.4f}")


@app.command()
def bench(
    only: Annotated[str, typer.Option(help="comma-separated subset: dp_overhead, round_overhead, "
                                           "diagnostics_share, bytes_per_round, max_sites, dashboard_render")] = "",
    json_: Annotated[bool, typer.Option("--json", help="print one JSON object (docs/PERFORMANCE.md keys)")] = False,
) -> None:
    """Measure the performance figures (ratios measured side by side in this run) and print them."""
    import json

    from fedlens import bench as harness

    try:
        out = harness.run([s.strip() for s in only.split(",") if s.strip()] or None,
                          progress=lambda m: typer.echo(m, err=True))
    except ValueError as e:
        _fail(str(e), code=2)
    typer.echo(json.dumps(out, indent=2, default=float) if json_ else harness.format_table(out))


@app.command()
def dashboard(
    store: Annotated[Path, typer.Option(help="run store file")] = Path(DEFAULT_STORE),
    port: Annotated[int, typer.Option(help="port to serve on")] = 8501,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
) -> None:
    """Start the Streamlit dashboard on the run store (it refreshes by itself while a run is live)."""
    app_file = Path(__file__).resolve().parent.parent / "dashboard" / "streamlit_app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_file), "--server.port", str(port),
           "--server.address", host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "viewer",
           "--", "--store", str(store.resolve())]
    typer.echo(f"dashboard on http://{host}:{port}  (store {store.resolve()})", err=True)
    raise typer.Exit(subprocess.call(cmd))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
