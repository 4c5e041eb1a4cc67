"""DP step time / non-DP step time for the same model, batch and sequence length, measured side by side.

Run as:  python simulations/dp_overhead.py [--steps 8] [--batch 32] [--set model.mode=full]
Prints the configuration and one JSON object: median seconds per step with and without Opacus, and their ratio.
Steps alternate (DP, non-DP, DP, ...) so that machine noise hits both alike; the first two of each are warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

import torch

from client.data import Encoded, SiteIdentity, load_site_data
from client.train import train_local
from common.config import AppConfig, resolve_run_config
from common.model import build_model, device, load_tokenizer
from fedlens.cli import _parse_value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--set", action="append", default=[], help="config key=value")
    args = ap.parse_args()
    extra = {k: _parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = AppConfig.from_run_config(resolve_run_config({"train.batch-size": args.batch,
                                                        "train.max-physical-batch": 4 * args.batch}, extra))
    tok = load_tokenizer(cfg.model)
    site = load_site_data(cfg, SiteIdentity("site-0", 0, 1, ""), tok)  # one site holding all 600 reviews
    # Exactly one logical batch per "epoch" so that each call is one optimizer step.
    one_batch = Encoded(site.train.input_ids[: args.batch], site.train.attention_mask[: args.batch],
                        site.train.labels[: args.batch])
    dp_model = build_model(cfg.model, cfg.data.labels, seed=0)
    plain_model = build_model(cfg.model, cfg.data.labels, seed=0)
    times: dict[str, list[float]] = {"dp": [], "plain": []}
    for i in range(args.steps + 2):
        for name, model, dp_on in (("dp", dp_model, True), ("plain", plain_model, False)):
            # Sample rate 1 (the whole one-batch set): the step does the full per-sample work at batch B.
            # Only the step is timed (forward, backward, clip + noise, update), not make_private's set-up.
            r = train_local(model, one_batch, train_cfg=replace(cfg.train, local_epochs=1),
                            dp_cfg=replace(cfg.dp, enabled=dp_on), noise_multiplier=1.0, label_counts=None, seed=i)
            if i >= 2:
                times[name].append(sum(r.step_seconds))
    dp_s, plain_s = statistics.median(times["dp"]), statistics.median(times["plain"])
    print(json.dumps({
        "dp_step_s": round(dp_s, 3), "non_dp_step_s": round(plain_s, 3), "ratio": round(dp_s / plain_s, 3),
        "config": {"model": "tiny" if cfg.model.tiny else (cfg.model.path or "all-MiniLM-L6-v2"),
                   "mode": cfg.model.mode, "batch": args.batch, "max_length": cfg.data.max_length,
                   "grad_sample_mode": cfg.dp.grad_sample_mode, "steps": args.steps, "device": str(device()),
                   "threads": torch.get_num_threads()},
    }))


if __name__ == "__main__":
    main()
