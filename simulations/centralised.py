"""Step 2 without federation or DP, the reference: the centralised baseline: fine-tune the same model, without DP, on
the union of the sites' train splits.

This is the number a federated DP run is compared with (what pooling all the data in one place would give).
Run as:  python simulations/centralised.py [--scenario simulations/demo.toml] [--epochs 5] [--set key=value ...]
It prints one JSON line per epoch with the accuracy / macro-F1 / loss on the 379 held-out test reviews.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from client.data import SiteIdentity, load_site_data
from client.privacy import dpsgd_schedule
from client.train import prior_from_counts, train_local
from common.config import AppConfig, load_overrides, parse_overrides, resolve_run_config
from common.model import Encoded, build_model, load_tokenizer, trainable_state
from server.central_eval import make_central_eval, server_test_set


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="simulations/demo.toml")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="config key=value")
    args = ap.parse_args()
    extra = parse_overrides(args.set)
    raw = resolve_run_config(load_overrides(args.scenario), extra, {"dp.enabled": False})
    cfg = AppConfig.from_run_config(raw)
    torch.manual_seed(cfg.train.seed)

    # The union of exactly the train splits the federated sites use (validation rows stay out, as at the sites).
    tokenizer = load_tokenizer(cfg.model)
    n = cfg.simulation.num_sites
    parts = [load_site_data(cfg, SiteIdentity(f"site-{i}", i, n, ""), tokenizer).train for i in range(n)]
    train = Encoded(torch.cat([p.input_ids for p in parts]), torch.cat([p.attention_mask for p in parts]),
                    torch.cat([p.labels for p in parts]))
    counts = torch.bincount(train.labels, minlength=len(cfg.data.labels)).float()
    # A centralised, non-private baseline: its exact counts and size are its own to use (no site, no release).
    schedule = dpsgd_schedule(n_public=len(train), batch_size=cfg.train.batch_size, local_epochs=1)

    model = build_model(cfg.model, cfg.data.labels, seed=cfg.train.seed)
    evaluate = make_central_eval(cfg, build_model(cfg.model, cfg.data.labels, seed=cfg.train.seed),
                                 server_test_set(cfg, tokenizer))
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        # One pass per printed epoch, whatever train.local-epochs says (that key is per federated round).
        r = train_local(model, train, train_cfg=replace(cfg.train, local_epochs=1), dp_cfg=cfg.dp, noise_multiplier=0.0,
                        prior=prior_from_counts(counts), schedule=schedule, seed=cfg.train.seed + epoch)
        m = evaluate(trainable_state(model))
        print(json.dumps({"epoch": epoch, "train_examples": len(train), "train_loss": round(r.mean_loss, 4),
                          "median_step_s": round(float(np.median(r.step_seconds)), 3),
                          **{k: round(v, 4) for k, v in m.items()}, "seconds": round(time.time() - t0, 1),
                          "config": args.set}), flush=True)


if __name__ == "__main__":
    main()
