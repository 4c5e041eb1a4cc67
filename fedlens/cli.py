"""Every step, from the shell: the `fedlens` command (simulate, deploy, report, diagnose, bench, dashboard).

Run as:  fedlens simulate --scenario simulations/smoke.toml
         fedlens report --json
         fedlens whatif --round 3 --exclude site-2
         fedlens diagnose                      # this version's diagnosis over the newest stored run
         fedlens replay --round 2 --exclude site-2
         fedlens bench --only dp_overhead,bytes_per_round --json
         fedlens bench diagnosis --seed 1 --keep runs/bench --json
         fedlens bench accuracy --workload movies --seeds 3 --json
         fedlens audit privacy --json           # one-run empirical ε lower bound of the site's DP-SGD
         fedlens dashboard --port 8501
         fedlens export --to mlflow             # every stored run into MLflow (runs/mlflow); or --to tensorboard
         fedlens certs --out certs --sites hospital-a,hospital-b --host link.example.org
         fedlens link --certs certs --host 0.0.0.0 --port 8000
         fedlens site hospital-a --data a.csv --superlink link.example.org:8000 --certs certs
Progress and logs go to stderr; only data (the report) goes to stdout. Exit codes: 0 ok, 1 failed, 2 usage error.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Federated DP fine-tuning with Flower + Opacus, and cross-site debugging.")
DEFAULT_STORE = "runs/fedlens.db"


# Options several commands share.
StoreOption = Annotated[Path, typer.Option(help="run store file")]
RunOption = Annotated[str | None, typer.Option(help="run id (default: the newest run)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object")]


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
    from common.config import AppConfig, load_overrides, parse_overrides, resolve_run_config

    try:
        overrides = load_overrides(scenario) if scenario else {}
        extra = parse_overrides(set_ or [])
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

    _simulate_and_report(config, cfg, ray_address)


def _simulate_and_report(config: dict, cfg, ray_address: str) -> None:  # noqa: ANN001
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
    store: StoreOption = Path(DEFAULT_STORE),
    run: RunOption = None,
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
def diagnose(
    store: StoreOption = Path(DEFAULT_STORE),
    run: RunOption = None,
    json_: JsonOption = False,
) -> None:
    """Run this version's diagnosis again over a stored run's rounds and compare with the findings it recorded
    (writes nothing; no site is contacted)."""
    import json

    from fedlens.diagnose import rediagnose_store

    try:
        stored, found = rediagnose_store(store, run)
    except (LookupError, FileNotFoundError) as e:
        if json_:
            typer.echo(json.dumps({"success": False, "error": str(e)}))
        _fail(str(e))
    now = {(f.site, f.kind) for _, f in found}
    before = {(f["site"], f["kind"]) for f in stored["findings"]}
    out = {"run_id": stored["run_id"],
           "findings": [{"site": f.site, "kind": f.kind, "round": r, "severity": f.severity,
                         "confidence": f.confidence, "evidence": f.message} for r, f in found],
           "new": sorted([list(k) for k in now - before], key=str),
           "gone": sorted([list(k) for k in before - now], key=str)}
    if json_:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"run {out['run_id']}: {len(found)} finding(s) from this version's diagnosis "
               f"({len(stored['findings'])} recorded during the run)")
    for f in out["findings"]:
        typer.echo(f"  round {f['round']}: [{f['severity']}, {f['kind']}, confidence {f['confidence']:.2f}] "
                   f"{f['evidence']}")
    for what, keys in (("new since the run", out["new"]), ("recorded, not found now", out["gone"])):
        if keys:
            typer.echo(f"{what}: " + ", ".join(f"{site or 'run'}:{kind}" for site, kind in keys))


@app.command()
def whatif(
    round_: Annotated[int, typer.Option("--round", help="the round to re-aggregate")],
    exclude: Annotated[str, typer.Option(help="comma-separated site names to leave out")],
    store: StoreOption = Path(DEFAULT_STORE),
    run: RunOption = None,
    json_: JsonOption = False,
) -> None:
    """Re-aggregate a round without some sites and compare both global models on the server's test set."""
    import json

    from server.whatif import describe, reaggregate

    try:
        out = reaggregate(store, run, round_, [s.strip() for s in exclude.split(",") if s.strip()])
    except (LookupError, ValueError, FileNotFoundError) as e:
        if json_:
            typer.echo(json.dumps({"success": False, "error": str(e)}))
        _fail(str(e))
    if json_:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"run {out['run_id']}. {describe(out)}")
    if out["actual"] is None:
        typer.echo(out.get("note", ""))
        return
    for k in ("accuracy", "macro_f1", "loss"):
        typer.echo(f"  test {k:<9} actual {out['actual'][k]:.4f}   without {out['without'][k]:.4f}   "
                   f"change {out['change'].get(k, float('nan')):+.4f}")


@app.command()
def replay(
    round_: Annotated[int, typer.Option("--round", help="start from this round's checkpoint of the run")],
    exclude: Annotated[str, typer.Option(help="comma-separated sites not asked to train in the replay")] = "",
    weight: Annotated[list[str] | None, typer.Option(help="down-weight a site: site=0.5 (repeatable)")] = None,
    store: StoreOption = Path(DEFAULT_STORE),
    run: Annotated[str | None, typer.Option(help="the run to replay (default: the newest run)")] = None,
    ray_address: Annotated[str, typer.Option(help="connect to an existing Ray cluster")] = "",
) -> None:
    """Fix & replay (simulation): a new run from a round's checkpoint with sites excluded or down-weighted,
    linked to the original so the Runs page compares them. Deployments: flwr run with store.replay-from."""
    import uuid

    from common.config import AppConfig
    from common.run_store import load_run

    try:
        original = load_run(store, run)
        config = dict(original["config"])
        config.update({"store.path": str(store), "store.replay-from": original["run_id"],
                       "store.replay-round": round_, "server.exclude": exclude,
                       "server.weights": ",".join(weight or []),
                       "store.run-id": f"{original['run_id']}-replay-r{round_}-{uuid.uuid4().hex[:4]}"})
        cfg = AppConfig.from_run_config(config)
    except (LookupError, FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    if exclude and not set(cfg.server.exclude) <= {s["site"] for s in original["sites"]}:
        _fail(f"--exclude {exclude}: unknown site(s); the run has {', '.join(s['site'] for s in original['sites'])}",
              2)
    _simulate_and_report(config, cfg, ray_address)


@app.command()
def bench(
    what: Annotated[str, typer.Argument(help="'performance' (docs/PERFORMANCE.md), 'diagnosis' (drawn fault runs "
                                             "scored against their ground truth), 'limits' (the statistical "
                                             "findings' detection limits, on synthetic releases) or 'accuracy' (DP "
                                             "vs non-DP, per workload)")] = "performance",
    only: Annotated[str, typer.Option(help="performance: a comma-separated subset of dp_overhead, head_round, "
                                           "round_overhead, "
                                           "diagnostics_share, bytes_per_round, max_sites, dashboard_render")] = "",
    suite: Annotated[Path | None, typer.Option(help="diagnosis: a folder of your own scenario files instead of the "
                                                    "drawn grid (e.g. simulations/faults)")] = None,
    seed: Annotated[int, typer.Option(help="diagnosis: the draw of fault parameters (a seed the rules were never "
                                           "tuned on is a fresh pass)")] = 0,
    full: Annotated[bool, typer.Option("--full", help="diagnosis: the whole grid (three times the default, ~90 "
                                                      "min); limits: more trials")] = False,
    keep: Annotated[Path | None, typer.Option(help="diagnosis: keep each scenario's run store in this folder")] = None,
    rescore: Annotated[Path | None, typer.Option(help="diagnosis: score the run stores an earlier --keep left in "
                                                      "this folder with this version's diagnosis (no new runs)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="diagnosis: a config key for every scenario, e.g. "
                                                                 "--set model.tiny=false (the real MiniLM)")] = None,
    workload: Annotated[str, typer.Option(help="accuracy: a comma-separated subset of drugreview, movies, "
                                               "debates")] = "",
    seeds: Annotated[int, typer.Option(help="accuracy: seeds per arm (mean ± spread)")] = 3,
    modes: Annotated[str, typer.Option(help="accuracy: compare training recipes at ε = 8 instead of the DP sweep, "
                                            "a comma-separated subset of head, lora, ffa-lora, head-then-lora, "
                                            "full")] = "",
    rounds: Annotated[int, typer.Option(help="accuracy --modes: federated rounds per run (0 = the scenario's)")] = 0,
    json_: JsonOption = False,
) -> None:
    """Measure the performance figures, score the diagnosis on a suite of fault scenarios, or measure what DP
    costs in accuracy."""
    import json

    if what == "accuracy":
        from fedlens import accuracy_bench as harness

        try:
            out = harness.run([w.strip() for w in workload.split(",") if w.strip()] or None, seeds=seeds,
                              modes=[m.strip() for m in modes.split(",") if m.strip()] or None, rounds=rounds,
                              progress=lambda m: typer.echo(m, err=True))
        except ValueError as e:
            _fail(str(e), code=2)
        typer.echo(json.dumps(out, indent=2, default=float) if json_ else harness.format_table(out))
        return

    if what == "diagnosis":
        from fedlens import diagnosis_bench as harness

        try:
            echo = lambda m: typer.echo(m, err=True)  # noqa: E731
            out = (harness.rescore(rescore, progress=echo) if rescore else
                   harness.run(seed=seed, full=full, suite=suite, keep=keep, overrides=tuple(set_ or ()),
                               progress=echo))
        except ValueError as e:
            _fail(str(e), code=2)
        typer.echo(json.dumps(out, indent=2, default=float) if json_ else harness.format_table(out))
        return
    if what == "limits":
        from fedlens import detection_limits as harness

        out = harness.limits(trials=100 if full else 40, progress=lambda m: typer.echo(m, err=True))
        typer.echo(json.dumps(out, indent=2, default=float) if json_ else harness.format_limits(out))
        return
    if what != "performance":
        _fail(f"unknown benchmark {what!r}; choose 'performance', 'diagnosis', 'limits' or 'accuracy'", code=2)
    from fedlens import bench as harness

    try:
        out = harness.run([s.strip() for s in only.split(",") if s.strip()] or None,
                          progress=lambda m: typer.echo(m, err=True))
    except ValueError as e:
        _fail(str(e), code=2)
    typer.echo(json.dumps(out, indent=2, default=float) if json_ else harness.format_table(out))


audit_app = typer.Typer(no_args_is_help=True, help="Empirical checks of the privacy claims.")
app.add_typer(audit_app, name="audit")


@audit_app.command("privacy")
def audit_privacy(
    scenario: Annotated[Path | None, typer.Option(help="a TOML of run-config overrides (default "
                                                       "simulations/smoke.toml)")] = None,
    mechanism: Annotated[str, typer.Option(help="fedlens (the product) | scaled-noise | seeded-noise (broken on "
                                                "purpose: the audit must catch them)")] = "fedlens",
    canaries: Annotated[int, typer.Option(help="canaries m; one run certifies at most about log m")] = 2000,
    epsilon: Annotated[float, typer.Option(help="the claimed ε σ is calibrated for; one run with m canaries can "
                                                "certify at most about log m, so a claim above what it can reach "
                                                "reads 'inconclusive'")] = 1.0,
    confidence: Annotated[float, typer.Option(help="confidence of the lower bound")] = 0.95,
    json_: JsonOption = False,
) -> None:
    """One-run audit of the site's DP-SGD (Steinke et al. 2023): an ε lower bound to compare with the claim.
    Exit code 1 when the bound exceeds the claimed ε (violated); 0 when consistent or inconclusive."""
    import json

    from fedlens import audit

    try:
        out = audit.audit_privacy(scenario, mechanism=mechanism, canaries=canaries, target_epsilon=epsilon,
                                  confidence=confidence, progress=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e), 2)
    typer.echo(json.dumps(out, indent=2) if json_ else audit.format_text(out))
    if out["verdict"] == "violated":
        raise typer.Exit(1)


@app.command()
def export(
    to: Annotated[str, typer.Option(help="mlflow or tensorboard")],
    store: StoreOption = Path(DEFAULT_STORE),
    run: Annotated[list[str] | None, typer.Option(help="run id (repeat for several; default: every run)")] = None,
    out: Annotated[str | None, typer.Option(help="folder (MLflow: or a tracking URI); default: beside the store")]
    = None,
    json_: JsonOption = False,
) -> None:
    """Copy stored runs (config, global and per-site metrics and ε by round, findings, events) into MLflow or
    TensorBoard; rounds the target already holds are not written again, so it can be run as often as wanted."""
    import json

    from common.config import EXPORT_TARGETS
    from common.export import ExportError, default_location, export_run
    from common.run_store import list_runs

    if to not in EXPORT_TARGETS:
        _fail(f"--to must be one of {', '.join(EXPORT_TARGETS)}, got {to!r}", 2)
    if not store.exists():
        _fail(f"run store {store} does not exist")
    location = out or default_location(store, to)
    done = []
    try:
        for run_id in run or [r["run_id"] for r in reversed(list_runs(store))]:
            done.append(export_run(store, run_id, to, location))
    except (LookupError, ExportError) as e:
        _fail(str(e))
    if json_:
        typer.echo(json.dumps({"target": to, "location": str(location), "runs": done}, indent=2))
        return
    for d in done:
        typer.echo(f"{d['run_id']}: {d['rounds_written']} new round(s), {d['last_round']} in all")
    view = (f"mlflow ui --backend-store-uri sqlite:///{Path(location).resolve() / 'mlflow.db'}"
            if to == "mlflow" and "://" not in str(location) else
            f"tensorboard --logdir {Path(location).resolve()}" if to == "tensorboard" else str(location))
    typer.echo(f"{len(done)} run(s) in {to} at {location}; to view: {view}", err=True)


@app.command()
def dashboard(
    store: StoreOption = Path(DEFAULT_STORE),
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
    from fedlens.deploy import supervise

    # Streamlit is this command's child: a SIGTERM or Ctrl-C here stops it too, and this command exits with it.
    raise typer.Exit(supervise([cmd]))


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="folder for the key material")] = Path("certs"),
    sites: Annotated[str, typer.Option(help="a count (site-0..site-N-1) or comma-separated site names")] = "3",
    host: Annotated[list[str] | None, typer.Option(help="a name or IP the sites dial (repeatable); loopback is "
                                                        "always included")] = None,
    days: Annotated[int, typer.Option(help="validity of the certificates")] = 365,
    overwrite: Annotated[bool, typer.Option(help="replace existing key material")] = False,
) -> None:
    """Make a CA, the SuperLink's TLS certificate and one SuperNode auth key pair per site (for testing and
    small deployments; operators with a PKI use their own)."""
    from fedlens.certs import make_certs, site_names

    try:
        paths = make_certs(out, site_names(sites), hosts=host, days=days, overwrite=overwrite)
    except (ValueError, FileExistsError) as e:
        _fail(str(e), 2)
    typer.echo(f"CA          {paths.ca_cert}  (give to every site; {paths.ca_key} stays offline)")
    typer.echo(f"SuperLink   {paths.server_cert}, {paths.server_key}")
    for site, (private, public) in paths.site_keys.items():
        typer.echo(f"{site:<11} {private} (stays at the site), {public} (register at the link)")
    typer.echo(f"registry    {Path(out) / 'registry.toml'}  (the coordinator's site name -> key record: run with "
               f"--run-config \"server.site-registry='{(Path(out) / 'registry.toml').resolve()}'\")")


@app.command()
def link(
    certs_: Annotated[Path | None, typer.Option("--certs", help="folder with ca.crt, server.crt, server.key "
                                                                 "(fedlens certs)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for other machines)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the sites' port: the Fleet gate, which passes Flower's Fleet API "
                                           "only")] = 8000,
    control_port: Annotated[int, typer.Option(help="the SuperLink's own port, on 127.0.0.1 only: the operators' "
                                                   "Control API (flwr run, flwr supernode register) and the "
                                                   "ServerApp's Runtime API")] = 9093,
    database: Annotated[Path, typer.Option(help="the SuperLink's state (runs, messages, nodes) survives restarts "
                                                "in this file")] = Path("runs/superlink.db"),
    log_file: Annotated[Path | None, typer.Option(help="also write the SuperLink's log here")] = None,
    insecure: Annotated[bool, typer.Option(help="no TLS, no SuperNode authentication: loopback tests only")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the commands, start nothing")] = False,
) -> None:
    """Start the coordinator's Flower SuperLink (TLS, SuperNode auth, database) on loopback, its SuperExec, and the
    Fleet gate on --host:--port, the only address the sites need."""
    from fedlens.deploy import DeployError, ensure_secret, link_commands, secret_path, supervise

    try:
        commands = link_commands(certs=certs_, host=host, port=port, database=database, log_file=log_file,
                                 insecure=insecure, control_port=control_port)
    except DeployError as e:
        _fail(str(e), 2)
    typer.echo(f"sites dial {host}:{port} (Fleet API only); operators use 127.0.0.1:{control_port} on this machine "
               "(flwr run, flwr supernode register)", err=True)
    if insecure:
        typer.echo("WARNING: --insecure: traffic is not encrypted and any SuperNode may join; loopback tests only",
                   err=True)
    for cmd in commands:
        typer.echo(" ".join(cmd), err=True)
    if dry_run:
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    ensure_secret(secret_path(certs_, database))
    raise typer.Exit(supervise(commands))


@app.command("app-digest")
def app_digest_(
    project: Annotated[Path, typer.Argument(help="the project folder `flwr run` packs (default: this one)")] = Path("."),
) -> None:
    """Print the SHA-256 of the app bundle `flwr run <project>` sends: what a site pins with `fedlens site
    --app-digest` once it has reviewed that code."""
    from fedlens.site_runner import app_digest

    if not (project / "pyproject.toml").is_file():
        _fail(f"{project} has no pyproject.toml: expected the fedlens project folder", 2)
    typer.echo(app_digest(project))


@app.command()
def site(
    name: Annotated[str, typer.Argument(help="the site's name: how the run store and dashboard show it")],
    data: Annotated[Path | None, typer.Option(help="the site's labelled data (CSV, JSONL or Parquet); runs with "
                                                   "data.source = \"files\" read it")] = None,
    superlink: Annotated[str, typer.Option(help="host:port of the coordinator's SuperLink")] = "127.0.0.1:8000",
    certs_: Annotated[Path | None, typer.Option("--certs", help="folder from fedlens certs: uses ca.crt and "
                                                                 "sites/<name>")] = None,
    ca: Annotated[Path | None, typer.Option(help="the deployment's CA certificate (instead of --certs)")] = None,
    key: Annotated[Path | None, typer.Option(help="this site's private key (instead of --certs)")] = None,
    port: Annotated[int, typer.Option(help="local port of this SuperNode's own API (one per SuperNode on a "
                                           "machine)")] = 9094,
    state_dir: Annotated[Path | None, typer.Option(help="where the site keeps its lifetime privacy ledger and its "
                                                        "policy.toml (default ~/.fedlens/sites/<name>)")] = None,
    epsilon_cap: Annotated[float | None, typer.Option(help="this site's lifetime ε cap over all runs on its data "
                                                           "(default: policy.toml, else 10)")] = None,
    delta: Annotated[float | None, typer.Option(help="this site's δ; no run may ask for more (default 1e-5, "
                                                     "less above 10,000 examples)")] = None,
    min_noise_multiplier: Annotated[float | None, typer.Option(help="refuse any DP step or release with less "
                                                                    "noise (default 0.5)")] = None,
    allow_non_dp: Annotated[bool | None, typer.Option("--allow-non-dp/--no-non-dp", help="take part in runs "
                                                      "without DP (default: no)")] = None,
    allow_injected_faults: Annotated[bool | None, typer.Option(
        "--allow-injected-faults/--no-injected-faults", help="apply a run's injected faults to this site's data "
        "and training: fault drills on test deployments only (default: no)")] = None,
    insecure: Annotated[bool, typer.Option(help="no TLS, no authentication: loopback tests only")] = False,
    max_retries: Annotated[int | None, typer.Option(help="give up after this many failed connection attempts "
                                                         "(default: retry forever)")] = None,
    app_digest: Annotated[list[str] | None, typer.Option(help="SHA-256 of an app bundle this site runs (repeatable); "
                                                              "default: the bundle of this fedlens install's own "
                                                              "project, so the coordinator cannot ship other "
                                                              "code")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads the site trains and evaluates on (default 0: every "
                                              "core; give each its share when a machine hosts several sites)")] = 0,
    heartbeat: Annotated[int, typer.Option(help="seconds between the heartbeats the site declares to the link "
                                                "(10..1800, Flower's 30): a crashed site is noticed after 2 of them")]
    = 30,
    dry_run: Annotated[bool, typer.Option(help="print the command, start nothing")] = False,
) -> None:
    """Start one site's Flower SuperNode (TLS to the SuperLink, authenticated by the site's key) and its runner: one
    long-lived process that runs the ClientApp for every message, and only an app whose digest the site pinned."""
    from fedlens.deploy import RUNNER_SECRET, DeployError, ensure_secret, runner_command, site_command, supervise

    if certs_ is not None:
        ca, key = ca or certs_ / "ca.crt", key or certs_ / "sites" / name
    try:
        chosen = {k: v for k, v in (("epsilon-cap", epsilon_cap), ("delta", delta),
                                    ("min-noise-multiplier", min_noise_multiplier),
                                    ("allow-non-dp", allow_non_dp), ("allow-injected-faults", allow_injected_faults))
                  if v is not None}
        policy = _site_policy(state_dir or Path.home() / ".fedlens" / "sites" / name, chosen)
        state = state_dir or Path.home() / ".fedlens" / "sites" / name
        cmd = site_command(name=name, superlink=superlink, data=data, port=port, ca=ca, key=key, insecure=insecure,
                           state_dir=state, max_retries=max_retries, policy=policy, heartbeat=heartbeat)
        runner = runner_command(port=port, state_dir=state, digests=app_digest, threads=threads)
    except DeployError as e:
        _fail(str(e), 2)
    if insecure:
        typer.echo("WARNING: --insecure: this site's traffic is not encrypted and not authenticated", err=True)
    for c in (cmd, runner):
        typer.echo(" ".join(c), err=True)
    if dry_run:
        return
    ensure_secret(state / RUNNER_SECRET)
    raise typer.Exit(supervise([cmd, runner]))


def _site_policy(state_dir: Path, chosen: dict) -> dict:
    """The site's whole policy, resolved here from this machine's own fedlens install (its pyproject defaults and
    state_dir/policy.toml) and the options given, written in full into the node config: the code a run ships
    (Flower's FAB) brings a pyproject of its own, whose defaults must not decide this site's policy."""
    from dataclasses import fields

    from client.policy import SitePolicy, load_policy

    try:
        policy = load_policy(state_dir, chosen)
    except ValueError as e:
        _fail(str(e), 2)
    return {f.name.replace("_", "-"): getattr(policy, f.name) for f in fields(SitePolicy) if f.name != "source"}


def main() -> None:
    app()


if __name__ == "__main__":
    main()
