"""Step 6, measured: how fast the dashboard renders a big run: a synthetic store of N sites × R rounds, each page rendered headless
with Streamlit's AppTest, median seconds per page. Also the store builder the dashboard tests use.

Run as:  python -m dashboard.bench [--sites 100] [--rounds 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import diagnostics as dg
from common.rounds import Event, Finding, FindingKind, LedgerRow, RoundRecord, SiteRoundRow, SiteSummary
from common.run_store import RunWriter

PAGES = ("views/overview.py", "views/sites.py", "views/findings.py", "views/errors.py", "views/cross_site.py",
         "views/privacy.py", "views/whatif.py", "views/runs.py")
CONFIG = {"dp.enabled": True, "dp.target-epsilon": 8.0, "dp.target-delta": 1e-5, "dp.diagnostics-share": 0.25,
          "data.labels": "negative,neutral,positive"}


def _summary(rng: np.random.Generator, n_val: int, n_train: int, rnd: int) -> SiteSummary:
    k = 3
    blocks = dg.empty_blocks(k)
    blocks["confusion"] = rng.multinomial(n_val, [0.1, 0.03, 0.07, 0.03, 0.05, 0.07, 0.05, 0.05, 0.55]) \
        .reshape(3, 3).astype(float) + rng.normal(0, 8, (3, 3))
    blocks["val_loss_sum"][0] = n_val * 0.3
    blocks["train_loss_sum"][0] = n_train * 0.28
    blocks["calibration"] = rng.uniform(0, n_val / 10, (2, dg.CONF_BINS))
    blocks["val_loss_hist"] = rng.uniform(0, n_val / 5, dg.LOSS_BINS)
    blocks["train_loss_hist"] = rng.uniform(0, n_train / 5, dg.LOSS_BINS)
    blocks["train_labels"] = np.array([0.2, 0.15, 0.65]) * n_train
    blocks["self_confidence"] = np.array([0.4, 0.3, 0.6]) * n_val / 3
    blocks["label_issues"] = rng.uniform(0, 3, (3, 3))
    blocks["grad_norm_hist"] = rng.uniform(0, n_train / 8, len(dg.GRAD_EDGES) - 1)
    blocks["clipped_sum_norm"][0] = n_train / 4
    d = dg.derive(blocks, loss_clip=3.0, n_val=n_val, n_train=n_train, dpsgd_noise_multiplier=2.0,
                  trainable_values=74_883)
    return SiteSummary(round_trained=rnd, noise_multiplier=4.8, noise_std=dg.noise_std(4.8), n_train=n_train,
                       derived=d, released={key: v.tolist() for key, v in blocks.items()})


def make_store(path: str | Path, *, sites: int, rounds: int, run_id: str = "synthetic", status: str = "completed",
               failing: tuple[str, ...] = (), seed: int = 0, cross_site: bool = False) -> Path:
    """A run store with one run shaped like a real one (every column the pages read), written by the real writer;
    `cross_site`: its summaries carry the local models × sites counts of server.cross-site-eval."""
    rng = np.random.default_rng(seed)
    w = RunWriter(path, run_id)
    w.start(scenario="synthetic", rounds_planned=rounds, model="synthetic model", config=CONFIG)
    names = [f"site-{i:03d}" for i in range(sites)]
    for name in names:
        w.add_site(name, n_train=120, n_val=30)
    for rnd in range(1, rounds + 1):
        acc = 0.5 + 0.2 * rnd / rounds
        rec = RoundRecord(rnd, 60.0, {"accuracy": acc + rng.normal(0, 0.05), "macro_f1": acc - 0.2,
                                      "loss": 1.0 - 0.3 * rnd / rounds, "train_loss": 0.9 - 0.3 * rnd / rounds,
                                      "test_accuracy": acc, "test_macro_f1": acc - 0.15, "test_loss": 0.9,
                                      "test_max_prediction_share": 0.7})
        eps = 8.0 * rnd / rounds
        for name in names:
            if name in failing and rnd == rounds:
                rec.sites.append(SiteRoundRow(name, "train", "failed", reason=f"site {name}: data file missing"))
                rec.events.append(Event("site-failed", f"{name} failed in train: data file missing", name))
                rec.findings.append(Finding(FindingKind.SITE_FAILED, "critical",
                                            f"{name} failed in train in round {rnd}: data file missing", name))
                continue
            s = _summary(rng, 30, 120, rnd)
            d = s.derived
            if cross_site:  # model j on this site's data: 0.5 + 0.1·j, the last model worst everywhere
                models = [n for n in names if n not in failing]
                s.cross_site = {"models": models, "noise_std": dg.noise_std(4.8, len(models))[dg.CROSS],
                                   "accuracy": [0.5 + 0.1 * j if j < len(models) - 1 else 0.1
                                                for j in range(len(models))]}
            rec.sites.append(SiteRoundRow(name, "train", "ok", num_examples=120, epsilon=eps * 0.95,
                                          epsilon_budget=8.0, delta=1e-5, noise_multiplier=2.1, sample_rate=1.0,
                                          steps=2, seconds=20.0, update_norm=5.0 + rng.normal(0, 0.1),
                                          update_cosine=0.001 * rnd, update_cosine_median=0.002 * rnd,
                                          epsilon_training=eps * 0.9, epsilon_diagnostics=eps * 0.25))
            rec.sites.append(SiteRoundRow(name, "evaluate", "ok", num_examples=30, epsilon=eps, noise_multiplier=4.8,
                                          accuracy=d["accuracy"], macro_f1=d["macro_f1"], loss=d["loss"]["val"],
                                          train_loss=d["loss"]["train"], epsilon_training=eps * 0.9,
                                          epsilon_diagnostics=eps * 0.25, ece=d["calibration"]["ece"],
                                          label_issues=d["label_issues"]["share"],
                                          clip_fraction=d["dp_health"]["clip_fraction"],
                                          grad_norm=d["dp_health"]["mean_grad_norm"],
                                          signal_to_noise=d["dp_health"]["signal_to_noise"],
                                          epsilon_lifetime=eps + 1.5, epsilon_cap=10.0,  # an earlier run spent 1.5
                                          summary=s))
            rec.ledger += [LedgerRow(name, rnd, "dpsgd", "subsampled-gaussian", 2.1, 1.0, 2, 1.0),
                           LedgerRow(name, rnd, "summary", "gaussian", 4.8, 1.0, 1, dg.SENSITIVITY)]
        w.write_round(rec)
    if status != "running":
        w.finish(status)
    w.close()
    return Path(path)


def render_seconds(store: Path, *, repeats: int = 3) -> dict[str, float]:
    """Median wall seconds to render each page of the dashboard on `store`, with the data cache cold (AppTest runs
    the real script; the browser's drawing of the charts is not included)."""
    import os

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from common.config import PROJECT_ROOT

    os.environ["FEDLENS_STORE"] = str(store)
    app = str(PROJECT_ROOT / "dashboard" / "streamlit_app.py")
    out = {}
    for page in PAGES:
        times = []
        for _ in range(repeats):
            at = AppTest.from_file(app, default_timeout=120)
            at.run()  # the default page first, as a user's visit starts
            st.cache_data.clear()  # cold: the data cache lives 2 s, so a page a user opens usually reloads the store
            t0 = time.perf_counter()
            at.switch_page(page).run()
            times.append(time.perf_counter() - t0)
            if at.exception:
                raise RuntimeError(f"{page}: {at.exception[0].message}")
        out[page.split("/")[-1].removesuffix(".py")] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = make_store(Path(tmp) / "bench.db", sites=args.sites, rounds=args.rounds)
        built = time.perf_counter() - t0
        seconds = render_seconds(store, repeats=args.repeats)
    print(json.dumps({"sites": args.sites, "rounds": args.rounds, "store_build_s": round(built, 1),
                      "render_s": {k: round(v, 3) for k, v in seconds.items()},
                      "max_render_s": round(max(seconds.values()), 3)}, indent=2))


if __name__ == "__main__":
    main()
