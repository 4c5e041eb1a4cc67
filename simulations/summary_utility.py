"""Step 3, measured: how much do the released (noised) error summaries still say? Noised vs exact numbers on the demo
sites.

A model is fine-tuned (without DP, centralised, so that it is a reasonable one) on the union of the demo sites' train
splits; each site then computes its exact summary and releases it many times at a given per-round ε. The script
prints, per ε, the mean absolute error of the noised per-class F1 against the exact one over classes and sites (and
the same for accuracy, ECE and the label-issue share), plus the same for the sum over sites (the global view).
Run as:  python simulations/summary_utility.py [--epochs 3] [--repeats 300] [--epsilons 0.1,0.5,1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from client import privacy
from client.data import SiteIdentity, load_site_data
from client.privacy import dpsgd_schedule
from client.summary import Summary, local_summary, release
from client.train import prior_from_counts, train_local
from common import diagnostics as dg
from common.config import AppConfig, load_overrides, resolve_run_config
from common.model import Encoded, build_model, load_tokenizer
from fedlens.audit import SeededNoise


def _numbers(blocks: dict[str, np.ndarray], loss_clip: float, n_val: int, n_train: int) -> dict[str, np.ndarray]:
    d = dg.derive(blocks, loss_clip=loss_clip, n_val=n_val, n_train=n_train)
    return {"per_class_f1": np.asarray(d["per_class"]["f1"]), "accuracy": np.array([d["accuracy"]]),
            "ece": np.array([d["calibration"]["ece"]]),
            "label_issue_share": np.array([min(1.0, d["label_issues"]["share"])])}


def _exact_summaries(cfg: AppConfig, epochs: int) -> tuple[list[Summary], list[tuple[int, int]]]:
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    n = cfg.simulation.num_sites
    sites = [load_site_data(cfg, SiteIdentity(f"site-{i}", i, n, ""), tokenizer) for i in range(n)]
    train = Encoded(*(torch.cat([getattr(s.train, f) for s in sites]) for f in ("input_ids", "attention_mask",
                                                                               "labels")))
    counts = torch.bincount(train.labels, minlength=len(cfg.data.labels)).float()
    # A centralised, non-private baseline: its exact counts and size are its own to use (no site, no release).
    schedule = dpsgd_schedule(n_public=len(train), batch_size=cfg.train.batch_size, local_epochs=1)
    model = build_model(cfg.model, cfg.data.labels, seed=cfg.train.seed)
    t0 = time.time()
    for epoch in range(epochs):
        train_local(model, train, train_cfg=replace(cfg.train, local_epochs=1), dp_cfg=cfg.dp, noise_multiplier=0.0,
                    prior=prior_from_counts(counts), schedule=schedule, seed=epoch)
    print(json.dumps({"trained_s": round(time.time() - t0, 1), "train_examples": len(train),
                      "val_examples": [len(s.val) for s in sites]}), flush=True)
    k, loss_clip = len(cfg.data.labels), cfg.dp.loss_clip
    first = [local_summary(model, s.train, s.val, num_classes=k, loss_clip=loss_clip,
                           thresholds=np.full(k, dg.DEFAULT_THRESHOLD)) for s in sites]
    # Thresholds as the server would send them: from the (here exact) self-confidence of all sites.
    t = dg.thresholds(sum(f.blocks["self_confidence"] for f in first), sum(f.blocks["confusion"].sum(1) for f in first))
    exact = [local_summary(model, s.train, s.val, num_classes=k, loss_clip=loss_clip, thresholds=t) for s in sites]
    return exact, [(len(s.val), len(s.train)) for s in sites]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="simulations/demo.toml")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--epsilons", default="0.1,0.5,1")
    ap.add_argument("--exact-cache", default="", help="a .npz file: reuse (or save) the exact summaries")
    args = ap.parse_args()
    cfg = AppConfig.from_run_config(resolve_run_config(load_overrides(args.scenario),
                                                       {"dp.enabled": False, "train.batch-size": 32}))
    k, loss_clip = len(cfg.data.labels), cfg.dp.loss_clip
    if args.exact_cache and Path(args.exact_cache).is_file():
        cached = np.load(args.exact_cache)
        n = int(cached["n"])
        exact = [Summary({b.name: cached[f"{i}/{b.name}"] for b in dg.BLOCKS}, k, 0, 0.0, dg.SENSITIVITY)
                 for i in range(n)]
        sizes = [tuple(int(x) for x in cached[f"{i}/sizes"]) for i in range(n)]
    else:
        exact, sizes = _exact_summaries(cfg, args.epochs)
        if args.exact_cache:
            np.savez(args.exact_cache, n=len(exact), **{f"{i}/{name}": v for i, e in enumerate(exact)
                                                        for name, v in e.blocks.items()},
                     **{f"{i}/sizes": np.array(sz) for i, sz in enumerate(sizes)})
    total = Summary({b: sum(e.blocks[b] for e in exact) for b in exact[0].blocks}, k, 0, 0.0, dg.SENSITIVITY)
    n_tot = tuple(map(sum, zip(*sizes, strict=True)))
    truth = [_numbers(e.blocks, loss_clip, *sz) for e, sz in zip(exact, sizes, strict=True)]
    truth_total = _numbers(total.blocks, loss_clip, *n_tot)

    default_sigma = privacy.release_noise_multiplier(
        configured=cfg.dp.release_noise_multiplier, diagnostics_share=cfg.dp.diagnostics_share,
        target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.target_delta, rounds=cfg.num_server_rounds)
    settings = [(float(e), privacy.calibrate_release_noise_multiplier(epsilon_diagnostics=float(e),
                                                                      delta=cfg.dp.target_delta, rounds=1))
                for e in args.epsilons.split(",")]
    default_eps = privacy.epsilon([privacy.LedgerEntry(0, privacy.SUMMARY, "gaussian", default_sigma, 1.0, 1, 1.0)],
                                  cfg.dp.target_delta)
    settings.append((default_eps, default_sigma))
    rng = SeededNoise(0)  # a research figure, reproducible: never a site's noise
    for eps, sigma in settings:
        err: dict[str, list[float]] = {}
        err_total: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            noised = [release(e, noise_multiplier=sigma, rng=rng) for e in exact]
            for nz, tr, sz in zip(noised, truth, sizes, strict=True):
                for key, v in _numbers(nz.blocks, loss_clip, *sz).items():
                    err.setdefault(key, []).extend(np.abs(v - tr[key]).tolist())
            summed = {b: sum(nz.blocks[b] for nz in noised) for b in exact[0].blocks}
            for key, v in _numbers(summed, loss_clip, *n_tot).items():
                err_total.setdefault(key, []).extend(np.abs(v - truth_total[key]).tolist())
        print(json.dumps({
            "epsilon_per_round": round(eps, 3), "release_noise_multiplier": round(sigma, 3),
            "confusion_noise_std": round(sigma * dg.SENSITIVITY, 2),
            "default": sigma == default_sigma,
            "mae_per_site": {key: round(float(np.nanmean(v)), 4) for key, v in err.items()},
            "mae_all_sites": {key: round(float(np.nanmean(v)), 4) for key, v in err_total.items()},
            "exact_per_class_f1": [[round(x, 3) for x in tr["per_class_f1"]] for tr in truth],
        }), flush=True)


if __name__ == "__main__":
    main()
