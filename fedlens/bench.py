"""`fedlens bench`: the performance figures of docs/PERFORMANCE.md, each a ratio measured side by side in one run.

Benchmarks (run all, or a subset with --only):
  dp_overhead       DP-SGD step time / non-DP step time, same model, batch and length (LoRA and full)
  head_round        a site's DP training round in head mode / the same round with LoRA (drug reviews, each mode's
                    scenario settings), and the once-per-run cost of head mode's features
  round_overhead    share of a simulated round's wall time when no site was computing, at 3, 10, 30 sites; start-up
  diagnostics_share time producing error summaries and findings / round time (from the 10-site run)
  bytes_per_round   bytes a site sends per round, LoRA vs full fine-tuning
  max_sites         the largest simulated federation that completes 2 rounds here, with peak memory
  dashboard_render  slowest page render on a synthetic run store of 100 sites × 100 rounds
  deploy_round      a loopback deployment's round / the same run's simulated round
  export            seconds a live export (store.export) adds to a round of the 100 × 100 synthetic store, per target
The JSON keys are a stable contract (docs/PERFORMANCE.md). Never used as timed assertions in tests.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import PROJECT_ROOT, AppConfig, resolve_run_config

BENCHES = ("dp_overhead", "head_round", "round_overhead", "diagnostics_share", "bytes_per_round", "max_sites", "dashboard_render",
           "deploy_round", "export")
# Keys are only ever added, at the end (docs/PERFORMANCE.md "The JSON contract").
KEYS = ("dp_overhead_lora", "dp_overhead_full", "round_overhead_3", "round_overhead_10", "round_overhead_30",
        "startup_s", "diagnostics_share", "bytes_ratio_lora", "max_sites", "max_sites_peak_gb", "dashboard_render_s",
        "head_round_ratio", "deploy_round_ratio", "export_round_s")
ROUND_SITES = (3, 10, 30)
MAX_SITES_LADDER = (100, 300, 1000, 2000)
MAX_SITES_MEMORY_GB = 8.0


# --- dp_overhead ----------------------------------------------------------------------------------------------------

def dp_overhead(mode: str, *, batch: int = 32, steps: int = 6, extra: dict | None = None) -> dict[str, Any]:
    """Median seconds per optimizer step with and without Opacus, steps alternating so noise hits both alike."""
    from client.data import SiteIdentity, load_site_data
    from client.privacy import dpsgd_schedule
    from client.train import train_local
    from common.model import Encoded, build_model, device, load_tokenizer

    cfg = AppConfig.from_run_config(resolve_run_config({"train.batch-size": batch, "train.max-physical-batch": batch,
                                                        "model.mode": mode}, extra or {}))
    site = load_site_data(cfg, SiteIdentity("site-0", 0, 1, ""), load_tokenizer(cfg.model))
    one_batch = Encoded(site.train.input_ids[:batch], site.train.attention_mask[:batch], site.train.labels[:batch])
    models = {"dp": build_model(cfg.model, cfg.data.labels, seed=0), "plain": build_model(cfg.model, cfg.data.labels,
                                                                                          seed=0)}
    schedule = dpsgd_schedule(n_public=len(one_batch), batch_size=batch, local_epochs=1)  # q = 1, one step
    times: dict[str, list[float]] = {"dp": [], "plain": []}
    for i in range(steps + 1):  # the first of each is warm-up
        for name, dp_on in (("dp", True), ("plain", False)):
            # One logical batch = the whole set (q = 1): each call is exactly one optimizer step at batch B.
            r = train_local(models[name], one_batch, train_cfg=replace(cfg.train, local_epochs=1),
                            dp_cfg=replace(cfg.dp, enabled=dp_on), noise_multiplier=1.0, prior=None, seed=i,
                            schedule=schedule)
            if i:
                times[name].append(sum(r.step_seconds))
    dp_s, plain_s = statistics.median(times["dp"]), statistics.median(times["plain"])
    return {"ratio": dp_s / plain_s, "dp_step_s": dp_s, "non_dp_step_s": plain_s,
            "config": {"mode": mode, "batch": batch, "max_length": cfg.data.max_length, "steps": steps,
                       "grad_sample_mode": cfg.dp.grad_sample_mode, "device": str(device()),
                       "model": "tiny" if cfg.model.tiny else (cfg.model.path or "all-MiniLM-L6-v2")}}


# --- head_round ------------------------------------------------------------------------------------------------------

def head_round() -> dict[str, Any]:
    """One DP training round plus the validation pass a summary needs, at the largest drug-review site, in head mode
    (simulations/clinical.toml) and with LoRA (simulations/clinical-lora.toml), in this process; the features head
    mode computes once per run are timed apart."""
    from client.data import SiteIdentity, load_site_data
    from client.privacy import dpsgd_schedule
    from client.train import train_local
    from common.config import load_overrides
    from common.model import build_model, features, load_tokenizer, predict

    out: dict[str, Any] = {}
    for mode, scenario in (("head", "clinical.toml"), ("lora", "clinical-lora.toml")):
        cfg = AppConfig.from_run_config(resolve_run_config(load_overrides(PROJECT_ROOT / "simulations" / scenario)))
        site = load_site_data(cfg, SiteIdentity("site-0", 0, cfg.simulation.num_sites, ""), load_tokenizer(cfg.model))
        model = build_model(cfg.model, cfg.data.labels, seed=0)
        train, val = site.train, site.val
        if mode == "head":
            t0 = time.perf_counter()
            train, val = features(model, train), features(model, val)
            out["features_s"] = time.perf_counter() - t0
        schedule = dpsgd_schedule(n_public=len(train), batch_size=cfg.train.batch_size,
                                  local_epochs=cfg.train.local_epochs)
        t0 = time.perf_counter()
        train_local(model, train, train_cfg=cfg.train, dp_cfg=cfg.dp, noise_multiplier=5.0, prior=None, seed=0,
                    schedule=schedule)
        predict(model, val)
        out[f"{mode}_round_s"] = time.perf_counter() - t0
        out[f"{mode}_steps"] = schedule.steps
    out["site_examples"] = len(site.train)
    out["ratio"] = out["head_round_s"] / out["lora_round_s"]
    out["ratio_first_round"] = (out["head_round_s"] + out["features_s"]) / out["lora_round_s"]
    return out


# --- simulations: round_overhead, diagnostics_share, max_sites -------------------------------------------------------

def _simulate(overrides: dict[str, Any], store: Path, *, sample_memory: bool = False) -> dict[str, Any]:
    """Run `fedlens simulate` in a fresh process (its own Ray), return (launch time, peak memory GB, run id)."""
    import psutil

    scenario = store.parent / "scenario.toml"
    scenario.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in overrides.items()) + "\n")
    # A fresh simulated world per run: its sites' lifetime ledgers beside its store, never a caller's.
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "1",
           "FEDLENS_SITE_STATE": str(store.parent / f"{store.stem}-sites")}
    launch = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "fedlens.cli", "simulate", "--scenario", str(scenario), "--store",
                             str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                root = psutil.Process(proc.pid)
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()) / 2**30)
            except psutil.Error:
                pass
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    _, err = proc.communicate()
    stop.set()
    from common.run_store import load_run

    run = load_run(store)
    return {"launch": launch, "end": time.time(), "peak_gb": peak, "run": run, "returncode": proc.returncode,
            "stderr_tail": err[-2000:]}


def _workers(n_sites: int, client_cpus: float) -> int:
    return max(1, min(n_sites, int((os.cpu_count() or 1) // client_cpus)))


def _round_breakdown(run: dict, workers: int) -> list[dict[str, float]]:
    """Per round: wall (the server's train + evaluate phases), busy = the time at least one site was handling a
    message (the union of the sites' [started, ended] intervals: a site computing alone counts as compute, so
    scheduling 3 sites on 2 workers is not blamed on the framework), overhead = 1 − busy / wall, and the
    diagnostics seconds (sites' work / workers, plus the server's)."""
    out = []
    for rnd in run["rounds"]:
        rows = [r for r in run["site_rounds"] if r["round"] == rnd["round"] and r["status"] == "ok"]
        spans = sorted((r["started_at"], r["ended_at"]) for r in rows
                       if r.get("started_at") is not None and r.get("ended_at") is not None)
        busy, end = 0.0, float("-inf")
        for a, b in spans:
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        wall = (rnd["train_wall"] or 0.0) + (rnd["evaluate_wall"] or 0.0)
        site_diag = sum(r["diagnostics_seconds"] or 0.0 for r in rows) / workers
        out.append({"round": rnd["round"], "wall": wall, "busy": busy, "overhead": 1 - busy / wall if wall else 0.0,
                    "diagnostics": site_diag + (rnd["diagnostics_seconds"] or 0.0)})
    return out


# The tiny model with the LoRA recipe these figures were first measured with (head mode's rounds are so short on
# the tiny model that the framework's share of them would say little about a real run).
SIM_BASE = {"model.tiny": True, "data.partitioner": "iid", "server.central-eval": "", "server.save-model": False,
            "server.keep-rounds": 0, "simulation.client-cpus": 1.0, "model.mode": "lora", "train.optimizer": "adamw",
            "train.head-lr": 0.1, "train.local-epochs": 2, "train.batch-size": 512}


def round_overhead(rounds: int = 4) -> dict[str, Any]:
    out: dict[str, Any] = {"config": {**SIM_BASE, "num-server-rounds": rounds, "cpus": os.cpu_count()}}
    for n in ROUND_SITES:
        with tempfile.TemporaryDirectory() as tmp:
            sim = _simulate({**SIM_BASE, "num-server-rounds": rounds, "simulation.num-sites": n,
                             "scenario": f"bench-{n}"}, Path(tmp) / "s.db")
        run = sim["run"]
        if run["status"] != "completed":
            raise RuntimeError(f"bench simulation with {n} sites ended {run['status']}: {sim['stderr_tail']}")
        rows = _round_breakdown(run, _workers(n, SIM_BASE["simulation.client-cpus"]))
        steady = rows[1:] or rows  # round 1 builds models and loads data in every actor: that is start-up
        out[f"round_overhead_{n}"] = statistics.median(r["overhead"] for r in steady)
        first = run["rounds"][0]
        out[f"startup_s_{n}"] = first["completed_at"] - first["seconds"] - sim["launch"]
        out[f"diagnostics_share_{n}"] = statistics.median(r["diagnostics"] / r["wall"] for r in steady if r["wall"])
        out[f"rounds_{n}"] = rows
    out["startup_s"] = out["startup_s_3"]
    out["diagnostics_share"] = out["diagnostics_share_10"]
    return out


def max_sites(ladder: tuple[int, ...] = MAX_SITES_LADDER, rows_per_site: int = 12) -> dict[str, Any]:
    """Largest N of the ladder whose 2-round simulation completes within MAX_SITES_MEMORY_GB (tiny model; each
    site a small CSV drawn from the embedded reviews, so that a thousand sites each hold data)."""
    from common.datasets import LABEL, TEXT, load_drugreview

    cfg = AppConfig.from_run_config({})
    reviews = load_drugreview("train", cfg.data.labels)
    best, peak_at_best, tried = 0, 0.0, []
    for n in ladder:
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(n)
            for pid in range(n):
                pick = reviews.iloc[rng.choice(len(reviews), size=rows_per_site, replace=False)]
                pick.assign(review=pick[TEXT], rating=[cfg.data.labels[i] for i in pick[LABEL]])[
                    ["review", "rating"]].to_csv(Path(tmp) / f"site-{pid}.csv", index=False)
            t0 = time.time()
            sim = _simulate({**SIM_BASE, "num-server-rounds": 2, "simulation.num-sites": n, "scenario": f"max-{n}",
                             "data.source": "files", "data.labels": "negative,neutral,positive", "data.files": str(Path(tmp) / "site-{partition}.csv"),
                             "server.round-timeout": 3600.0}, Path(tmp) / "s.db", sample_memory=True)
            ok = sim["run"]["status"] == "completed" and len(sim["run"]["rounds"]) == 2 and all(
                r["sites_ok"] == n for r in sim["run"]["rounds"]) and sim["peak_gb"] <= MAX_SITES_MEMORY_GB
            tried.append({"sites": n, "completed": ok, "peak_gb": round(sim["peak_gb"], 2),
                          "seconds": round(time.time() - t0, 1), "status": sim["run"]["status"]})
        if not ok:
            break
        best, peak_at_best = n, sim["peak_gb"]
    return {"max_sites": best, "max_sites_peak_gb": peak_at_best, "tried": tried,
            "config": {**SIM_BASE, "rows_per_site": rows_per_site, "rounds": 2, "memory_cap_gb": MAX_SITES_MEMORY_GB}}


# --- bytes_per_round, dashboard_render --------------------------------------------------------------------------

def bytes_per_round() -> dict[str, Any]:
    """Serialised size of a train reply (what a site sends per round besides its small summary), LoRA vs full."""
    from flwr.common.serde import recorddict_to_proto

    from common import records
    from common.model import build_model, trainable_state

    sizes = {}
    for mode in ("lora", "full"):
        cfg = AppConfig.from_run_config({"model.mode": mode})
        arrays = trainable_state(build_model(cfg.model, cfg.data.labels, seed=0))
        reply = records.TrainReply(records.SiteInfo("site-0", 100, 25), arrays, 100, 1.0, 1e-5, 8.0, 1.0, 1.0, 2,
                                   1.0)
        sizes[mode] = recorddict_to_proto(records.pack_train_reply(reply)).ByteSize()
        sizes[f"{mode}_values"] = int(sum(a.size for a in arrays.values()))
    return {"bytes_ratio_lora": sizes["lora"] / sizes["full"], "bytes_lora": sizes["lora"], "bytes_full": sizes["full"],
            "values_lora": sizes["lora_values"], "values_full": sizes["full_values"]}


def dashboard_render(sites: int = 100, rounds: int = 100) -> dict[str, Any]:
    from dashboard.bench import make_store, render_seconds

    with tempfile.TemporaryDirectory() as tmp:
        pages = render_seconds(make_store(Path(tmp) / "bench.db", sites=sites, rounds=rounds), repeats=3)
    return {"dashboard_render_s": max(pages.values()), "pages_s": pages, "config": {"sites": sites, "rounds": rounds}}


def deploy_round(rounds: int = 4, sites: int = 3, rows: int = 60) -> dict[str, Any]:
    """The same run as a loopback deployment (real processes: TLS, SuperNode auth, the Fleet gate, each site's
    long-lived runner; fedlens/loopback.py) and as a simulation, side by side: the median round after the first
    (round 1 is start-up in both: the app installed and loaded at each site, or Ray's actors), and round 1 apart.
    Tiny model, `sites` sites of `rows` reviews from their own CSV files, DP on."""
    from fedlens.loopback import RUN_CONFIG, Deployment, write_site_csv

    names = [f"site-{i}" for i in range(sites)]
    out: dict[str, Any] = {"config": {**RUN_CONFIG, "rounds": rounds, "sites": sites, "rows": rows}}
    with tempfile.TemporaryDirectory(prefix="fl-dep") as tmp:
        root = Path(tmp)
        files = [write_site_csv(root / f"{n}.csv", seed=i, rows=rows) for i, n in enumerate(names)]
        d = Deployment(root / "dep")
        try:
            d.certs_for(*names)
            d.start_link()
            d.register(*names)
            for n, f in zip(names, files, strict=True):
                d.start_site(n, f)
            d.run("bench-deploy", rounds=rounds, **{"server.min-sites": sites})
            if d.wait_done("bench-deploy", timeout=900) != "completed":
                raise RuntimeError(f"the bench deployment did not complete:\n{d.tails()}")
            deployed = [r[0] for r in d.query("SELECT seconds FROM rounds WHERE run_id = 'bench-deploy' "
                                              "ORDER BY round")]
        finally:
            d.stop()
        sim = _simulate({**RUN_CONFIG, "num-server-rounds": rounds, "simulation.num-sites": sites,
                         "data.files": str(root / "site-{partition}.csv"), "scenario": "bench-sim"},
                        root / "sim.db")
        if sim["run"]["status"] != "completed":
            raise RuntimeError(f"the bench simulation ended {sim['run']['status']}: {sim['stderr_tail']}")
        simulated = [r["seconds"] for r in sim["run"]["rounds"]]
    out.update(deploy_rounds_s=deployed, sim_rounds_s=simulated,
               deploy_round_s=statistics.median(deployed[1:]), sim_round_s=statistics.median(simulated[1:]),
               deploy_first_round_s=deployed[0], sim_first_round_s=simulated[0])
    out["ratio"] = out["deploy_round_s"] / out["sim_round_s"]
    return out


def export(sites: int = 100, rounds: int = 100) -> dict[str, Any]:
    """What a live export adds to a round: a whole run exported once, per round, plus one sync that finds nothing new
    (what every round pays to read the run and ask the target what it holds)."""
    from common.export import LiveExport, export_run
    from dashboard.bench import make_store

    out: dict[str, Any] = {"config": {"sites": sites, "rounds": rounds}}
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "bench.db", sites=sites, rounds=rounds)
        for target in ("mlflow", "tensorboard"):
            t0 = time.perf_counter()
            export_run(store, None, target, Path(tmp) / target)
            whole = time.perf_counter() - t0
            live = LiveExport(store, "synthetic", (target,), str(Path(tmp) / "live"))
            live.sync()
            t0 = time.perf_counter()
            live.sync()
            idle = time.perf_counter() - t0
            live.close()
            out[target] = {"whole_run_s": whole, "idle_sync_s": idle, "round_s": whole / rounds + idle}
    out["export_round_s"] = max(out[t]["round_s"] for t in ("mlflow", "tensorboard"))
    return out


SINGLE_RUN = {"bytes_per_round": bytes_per_round, "max_sites": max_sites, "dashboard_render": dashboard_render,
              "export": export}


# --- the harness -------------------------------------------------------------------------------------------------

def device_info() -> dict[str, Any]:
    info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(only: list[str] | None = None, *, progress=print) -> dict[str, Any]:  # noqa: ANN001
    """Run the named benchmarks (all by default) and return the JSON object of the contract."""
    names = only or list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    out: dict[str, Any] = {k: None for k in KEYS}
    out["device"], out["config"], out["details"] = device_info(), {}, {}
    if "dp_overhead" in names:
        for mode, steps in (("lora", 12), ("full", 3)):  # LoRA steps are ~1.5 s and noisy; a full DP step ~9 s
            progress(f"dp_overhead ({mode})…")
            r = dp_overhead(mode, steps=steps)
            out[f"dp_overhead_{mode}"] = r["ratio"]
            out["details"][f"dp_overhead_{mode}"] = r
    if "head_round" in names:
        progress("head_round…")
        r = head_round()
        out["head_round_ratio"] = r["ratio"]
        out["details"]["head_round"] = r
    if "round_overhead" in names or "diagnostics_share" in names:
        progress(f"round_overhead at {', '.join(map(str, ROUND_SITES))} sites…")
        r = round_overhead()
        for n in ROUND_SITES:
            out[f"round_overhead_{n}"] = r[f"round_overhead_{n}"]
        out["startup_s"], out["diagnostics_share"] = r["startup_s"], r["diagnostics_share"]
        out["details"]["round_overhead"] = r
    for name, keys in (("bytes_per_round", ("bytes_ratio_lora",)), ("max_sites", ("max_sites", "max_sites_peak_gb")),
                       ("dashboard_render", ("dashboard_render_s",)), ("export", ("export_round_s",))):
        if name in names:
            progress(f"{name}…")
            r = SINGLE_RUN[name]()
            out.update({k: r[k] for k in keys})
            out["details"][name] = r
    if "deploy_round" in names:
        progress("deploy_round (a loopback deployment and a simulation of the same run)…")
        r = deploy_round()
        out["deploy_round_ratio"] = r["ratio"]
        out["details"]["deploy_round"] = r
    out["config"] = {"only": names, "project": str(PROJECT_ROOT)}
    return out


TARGETS = {"dp_overhead_lora": ("≤", 1.10), "head_round_ratio": ("≤", 0.10), "round_overhead_3": ("≤", 0.10), "round_overhead_10": ("≤", 0.10),
           "round_overhead_30": ("≤", 0.10), "diagnostics_share": ("≤", 0.02), "bytes_ratio_lora": ("≤", 0.01),
           "max_sites": ("≥", 1000), "max_sites_peak_gb": ("≤", 8.0), "dashboard_render_s": ("≤", 2.0),
           "deploy_round_ratio": ("≤", 1.5)}


def format_table(out: dict[str, Any]) -> str:
    lines = [f"device: {json.dumps(out['device'])}", f"{'figure':<22}{'value':>12}  target"]
    for key in KEYS:
        v = out[key]
        shown = "—" if v is None else f"{v:.4g}"
        target = TARGETS.get(key)
        mark = ""
        if target and v is not None:
            ok = v <= target[1] if target[0] == "≤" else v >= target[1]
            mark = f"{target[0]} {target[1]:g}  {'met' if ok else 'NOT met'}"
        lines.append(f"{key:<22}{shown:>12}  {mark}")
    return "\n".join(lines)
