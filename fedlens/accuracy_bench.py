"""`fedlens bench accuracy`: what DP costs in accuracy, side by side in one run, for each embedded workload.

For each workload and seed: centralised non-DP (the same model and mode on the union of the sites' train splits),
federated non-DP, and federated DP at ε = 1, 3 and 8, all scored on the server's test part after the last round;
the majority class alone for reference. Federated arms are real `fedlens simulate` runs (fresh processes, Ray);
the centralised arm trains in this process with the product's own loop (client/train.train_local).

Rules, frozen before a pass is reported:
  - Tuning reads the server's validation part only (server.val-fraction); the test part is read once per run, to
    report. The DP arms run the product's defaults (their head-lr was chosen on the validation parts, by the tune
    script docs/PERFORMANCE.md describes). The non-DP arms get their own head-lr, the best of LR_GRID on the
    validation part at seed 0: unclipped gradients are larger than clipped ones, so the DP default would handicap
    them and flatter DP.
  - Seeds vary train.seed (initialisation) and, in DP arms, the noise (fresh OS randomness in every run); the
    partition and splits stay those of data.seed, so every arm sees the same data.
  - Features are computed once per site and kept in one cache for the whole pass ($FEDLENS_FEATURE_CACHE); every run
    gets fresh site ledgers.

`--modes` compares training modes instead: each recipe of MODES, federated under DP at ε = 8, the same workload,
rounds and seeds, side by side (LoRA's recipe is clinical-lora.toml's at one local epoch: on 2 CPU cores one LoRA
epoch over the movie sites takes ~7 minutes, so the default pass is short; `--rounds` sets it).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.config import PROJECT_ROOT, AppConfig, load_overrides, resolve_run_config

WORKLOADS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (scenario, overrides on top of it)
    "drugreview": ("simulations/clinical.toml", {}),
    "movies": ("simulations/demo.toml", {"faults": "", "scenario": "movies"}),  # the demo without its noisy site
    "debates": ("simulations/debates.toml", {}),  # 9 speakers: the multi-class task
}
EPSILONS = ("1", "3", "8")
_LORA = {"train.local-epochs": 1, "train.batch-size": 512, "train.optimizer": "adamw", "train.lr": 2e-3,
         "train.head-lr": 0.1}
MODES: dict[str, dict[str, Any]] = {  # recipe -> overrides on top of the workload's scenario
    "head": {"model.mode": "head"},
    "lora": {"model.mode": "lora", **_LORA},
    "ffa-lora": {"model.mode": "lora", "model.lora-freeze-a": True, **_LORA},
    # LP-FT: one probe round (the head is most of the way there after it), then the adapters for the rest
    "head-then-lora": {"model.mode": "head-then-lora", "model.probe-rounds": 1, "train.adapt-epochs": 1},
    "full": {"model.mode": "full", **_LORA, "train.lr": 5e-5},
}
MODES_EPSILON = 8.0  # every recipe's budget in the mode comparison
LR_GRID = (0.3, 1.0, 3.0)
QUIET = {"server.save-model": False, "server.keep-rounds": 0}


def _config(workload: str, extra: dict[str, Any]) -> dict[str, Any]:
    scenario, overrides = WORKLOADS[workload]
    return resolve_run_config(load_overrides(PROJECT_ROOT / scenario), overrides, QUIET, extra)


def simulate(config: dict[str, Any], folder: Path, name: str) -> dict[str, Any]:
    """One federated run in a fresh `fedlens simulate` process; its last round's test and validation metrics and
    each site's released accuracy noise."""
    from common.run_store import load_run

    store = folder / f"{name}.db"
    scenario = folder / f"{name}.toml"
    scenario.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()) + "\n")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "1",
           "FEDLENS_SITE_STATE": str(folder / f"{name}-sites"),  # fresh ledgers: each run is its own world
           "FEDLENS_FEATURE_CACHE": str(folder / "site-features")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "fedlens.cli", "simulate", "--scenario", str(scenario), "--store",
                           str(store)], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    if proc.returncode != 0 or not store.is_file():
        raise RuntimeError(f"bench run {name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    run = load_run(store)
    last = run["rounds"][-1]
    return {"macro_f1": last["test_macro_f1"], "accuracy": last["test_accuracy"],
            "top_share": last["test_max_prediction_share"], "val_macro_f1": last["server_val_macro_f1"],
            "accuracy_noise_std": _accuracy_noise(run), "seconds": time.time() - t0}


def _accuracy_noise(run: dict[str, Any]) -> dict[str, float]:
    """Each site's released validation accuracy's noise std: the trace of K noised confusion cells over its size
    (from the release σ the site reported; analytic, not sampled)."""
    from common.diagnostics import noise_std

    k = len(AppConfig.from_stored(run["config"]).data.labels)
    n_val = {s["site"]: s["n_val"] for s in run["sites"]}
    out = {}
    for row in run["site_rounds"]:
        if row["phase"] == "evaluate" and row["noise_multiplier"] and n_val.get(row["site"]):
            out[row["site"]] = math.sqrt(k) * noise_std(row["noise_multiplier"])["confusion"] / n_val[row["site"]]
    return out


def centralised(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The same model and mode, without DP, on the union of the sites' train splits (exact counts: no site, no
    release), for as many full-batch steps as a federated run takes in all; scored like the federated arms."""
    import torch

    from client.data import SiteIdentity, load_site_data
    from client.privacy import dpsgd_schedule
    from client.train import prior_from_counts, train_local
    from common.features import cached_features, encoder_identity
    from common.model import Encoded, Features, build_model, load_tokenizer, trainable_state
    from server.central_eval import make_central_eval, server_split

    cfg = AppConfig.from_run_config({**config, "dp.enabled": False, "store.path": str(folder / "central.db")})
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, cfg.data.labels, seed=cfg.train.seed)
    n = cfg.simulation.num_sites
    identity = encoder_identity(cfg.model, cfg.train.seed)
    parts = []
    for i in range(n):
        site = SiteIdentity(f"site-{i}", i, n, "")
        train = load_site_data(cfg, site, tokenizer).train
        parts.append(cached_features(model, train, identity=identity, folder=folder / "site-features" / site.name)
                     if cfg.model.mode == "head" else train)
    if cfg.model.mode == "head":
        union = Features(torch.cat([p.x for p in parts]), torch.cat([p.labels for p in parts]))
    else:
        union = Encoded(*(torch.cat([getattr(p, f) for p in parts]) for f in ("input_ids", "attention_mask", "labels")))
    t0 = time.time()
    steps = cfg.num_server_rounds * cfg.train.local_epochs
    train_cfg = replace(cfg.train, local_epochs=steps, batch_size=len(union))  # full batch, like the sites
    train_local(model, union, train_cfg=train_cfg, dp_cfg=cfg.dp, noise_multiplier=0.0,
                prior=prior_from_counts(torch.bincount(union.labels, minlength=len(cfg.data.labels))),
                seed=cfg.train.seed, schedule=dpsgd_schedule(n_public=len(union), batch_size=len(union),
                                                             local_epochs=steps))
    held = server_split(cfg, model, tokenizer)
    m = make_central_eval(cfg, model, held)(trainable_state(model))
    return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"], "top_share": m["max_prediction_share"],
            "val_macro_f1": m.get("val_macro_f1"), "seconds": time.time() - t0}


def majority(config: dict[str, Any]) -> dict[str, float]:
    """The majority class of the sites' pooled train labels, predicted for every test example."""
    import numpy as np

    from client.data import SiteIdentity, load_site_data
    from common.metrics import confusion_matrix, summary_metrics
    from common.model import load_tokenizer
    from server.central_eval import server_data

    cfg = AppConfig.from_run_config(config)
    tokenizer = load_tokenizer(cfg.model)
    k, n = len(cfg.data.labels), cfg.simulation.num_sites
    counts = sum(np.bincount(load_site_data(cfg, SiteIdentity(f"site-{i}", i, n, ""), tokenizer).train.labels.numpy(),
                             minlength=k) for i in range(n))
    labels = server_data(cfg, tokenizer).test.labels.numpy()
    m = summary_metrics(confusion_matrix(labels, np.full(len(labels), int(np.argmax(counts))), k), 0.0)
    return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"]}


def _mean_std(runs: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _arm_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm over its seeds: macro-F1 mean ± std, mean accuracy and top share, each run's macro-F1."""
    mean, std = _mean_std(runs, "macro_f1")
    return {"macro_f1": mean, "macro_f1_std": std, "accuracy": _mean_std(runs, "accuracy")[0],
            "top_share": _mean_std(runs, "top_share")[0], "runs": [round(r["macro_f1"], 4) for r in runs]}


def run_workload(workload: str, *, seeds: int, folder: Path, progress=print) -> dict[str, Any]:  # noqa: ANN001
    """Tune the non-DP arms' head-lr on the validation part (seed 0), then every arm over `seeds` seeds."""
    t0 = time.time()
    base = _config(workload, {})
    lr_key = "train.head-lr" if base["model.mode"] == "head" else "train.lr"
    tuning: dict[str, dict[str, float]] = {"centralised": {}, "federated_nondp": {}}
    for lr in LR_GRID:
        tuning["centralised"][str(lr)] = centralised({**base, lr_key: lr}, folder)["val_macro_f1"]
        tuning["federated_nondp"][str(lr)] = simulate({**base, lr_key: lr, "dp.enabled": False}, folder,
                                                      f"{workload}-tune-{lr}")["val_macro_f1"]
        progress(f"{workload}: tuning {lr_key} = {lr}: validation macro-F1 centralised "
                 f"{tuning['centralised'][str(lr)]:.3f}, federated non-DP {tuning['federated_nondp'][str(lr)]:.3f}")
    best = {arm: float(max(scores, key=scores.get)) for arm, scores in tuning.items()}
    arms: dict[str, list[dict[str, Any]]] = {"centralised": [], "federated_nondp": [], **{e: [] for e in EPSILONS}}
    for seed in range(seeds):
        seeded = {**base, "train.seed": seed}
        arms["centralised"].append(centralised({**seeded, lr_key: best["centralised"]}, folder))
        arms["federated_nondp"].append(simulate({**seeded, lr_key: best["federated_nondp"], "dp.enabled": False},
                                                folder, f"{workload}-nondp-{seed}"))
        for eps in EPSILONS:
            arms[eps].append(simulate({**seeded, "dp.target-epsilon": float(eps)}, folder, f"{workload}-eps{eps}-{seed}"))
        progress(f"{workload}: seed {seed}: centralised {arms['centralised'][-1]['macro_f1']:.3f}, federated "
                 f"non-DP {arms['federated_nondp'][-1]['macro_f1']:.3f}, DP "
                 + ", ".join(f"ε={e} {arms[e][-1]['macro_f1']:.3f}" for e in EPSILONS))
    maj = majority(base)
    out: dict[str, Any] = {"majority_macro_f1": maj["macro_f1"], "majority_accuracy": maj["accuracy"]}
    for arm in ("centralised", "federated_nondp"):
        mean, std = _mean_std(arms[arm], "macro_f1")
        out[f"{arm}_macro_f1"], out[f"{arm}_macro_f1_std"] = mean, std
        out[f"{arm}_accuracy"] = _mean_std(arms[arm], "accuracy")[0]
        out[f"{arm}_top_share"] = _mean_std(arms[arm], "top_share")[0]
    out["dp"] = {}
    for eps in EPSILONS:
        noise = [v for r in arms[eps] for v in r["accuracy_noise_std"].values()]
        out["dp"][eps] = {**_arm_summary(arms[eps]),
                          "site_accuracy_noise_std": max(noise) if noise else None,
                          "site_accuracy_noise_std_median": statistics.median(noise) if noise else None}
    out["runs"] = {arm: [round(r["macro_f1"], 4) for r in arms[arm]] for arm in ("centralised", "federated_nondp")}
    out["tuning"] = {"key": lr_key, "grid": list(LR_GRID), "validation_macro_f1": tuning, "chosen": best,
                     "dp_default": base[lr_key]}
    out["config"] = {"scenario": WORKLOADS[workload][0], "mode": base["model.mode"], "rounds": base["num-server-rounds"],
                     "sites": base["simulation.num-sites"], "local_epochs": base["train.local-epochs"], "seeds": seeds}
    out["seconds"] = time.time() - t0
    return out


def run_modes(workload: str, modes: list[str], *, seeds: int, rounds: int, folder: Path,
              progress=print) -> dict[str, Any]:  # noqa: ANN001
    """Each training recipe of `modes`, federated under DP at ε = 8 over `rounds` rounds and `seeds` seeds."""
    t0 = time.time()
    out: dict[str, Any] = {"epsilon": MODES_EPSILON, "rounds": rounds, "seeds": seeds, "modes": {}}
    for mode in modes:
        runs = [simulate(_config(workload, {**MODES[mode], "num-server-rounds": rounds, "train.seed": seed,
                                            "dp.target-epsilon": MODES_EPSILON}), folder, f"{workload}-{mode}-{seed}")
                for seed in range(seeds)]
        m = out["modes"][mode] = {**_arm_summary(runs), "seconds": _mean_std(runs, "seconds")[0],
                                  "recipe": MODES[mode]}
        progress(f"{workload}: {mode}: macro-F1 {m['macro_f1']:.3f} ± {m['macro_f1_std']:.3f} at ε = 8 over "
                 f"{rounds} rounds ({m['seconds']:.0f} s a run)")
    out["seconds"] = time.time() - t0
    return out


def run(workloads: list[str] | None = None, *, seeds: int = 3, modes: list[str] | None = None,
        rounds: int = 0, progress=print) -> dict[str, Any]:  # noqa: ANN001
    """The DP sweep per workload, or with `modes` the training-mode comparison (`rounds` 0 = the scenario's)."""
    names = workloads or list(WORKLOADS)
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    bad = [m for m in modes or () if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode recipe(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if rounds < 0:
        raise ValueError(f"--rounds must be 0 (the scenario's) or more, got {rounds}")
    with tempfile.TemporaryDirectory(prefix="fedlens-accuracy-") as tmp:
        if modes:
            return {"workloads": {w: run_modes(w, modes, seeds=seeds, folder=Path(tmp), progress=progress,
                                               rounds=rounds or _config(w, {})["num-server-rounds"])
                                  for w in names}, "cpus": os.cpu_count()}
        return {"workloads": {w: run_workload(w, seeds=seeds, folder=Path(tmp), progress=progress) for w in names},
                "cpus": os.cpu_count()}


def format_table(out: dict[str, Any]) -> str:
    if any("modes" in w for w in out["workloads"].values()):
        lines = ["workload     mode             macro-F1 at ε = 8   accuracy  top share  seconds a run"]
        for name, w in out["workloads"].items():
            for mode, m in w["modes"].items():
                lines.append(f"{name:<12} {mode:<16} {m['macro_f1']:.3f} ± {m['macro_f1_std']:.3f}       "
                             f"{m['accuracy']:.3f}     {m['top_share']:.2f}       {m['seconds']:.0f}")
        w = next(iter(out["workloads"].values()))
        lines.append(f"federated DP at ε = 8 over {w['rounds']} rounds, mean ± std over {w['seeds']} seed(s); "
                     "macro-F1 on the server's test part after the last round")
        return "\n".join(lines)
    lines = ["workload     majority  centralised     fed non-DP      DP ε=1          DP ε=3          DP ε=8"
             "          top share ε=8  site acc. noise ε=8"]
    for name, w in out["workloads"].items():
        cells = [f"{w['majority_macro_f1']:.3f}   ",
                 f"{w['centralised_macro_f1']:.3f} ± {w['centralised_macro_f1_std']:.3f}",
                 f"{w['federated_nondp_macro_f1']:.3f} ± {w['federated_nondp_macro_f1_std']:.3f}"]
        cells += [f"{w['dp'][e]['macro_f1']:.3f} ± {w['dp'][e]['macro_f1_std']:.3f}" for e in EPSILONS]
        noise = w["dp"]["8"]["site_accuracy_noise_std"]
        cells += [f"{w['dp']['8']['top_share']:.2f}          ", f"{noise:.4f}" if noise is not None else "-"]
        lines.append(f"{name:<12} " + "  ".join(cells))
    lines.append("macro-F1 on the server's test part after the last round, mean ± std over seeds; "
                 "non-DP head-lr tuned on the validation part (JSON: tuning)")
    return "\n".join(lines)
