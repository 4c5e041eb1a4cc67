"""Step 4, replayed: what if some sites had been left out of a round? Re-aggregate that round without them, with the
run's own rule (server.aggregation), from the updates the server kept (common/checkpoints.py), and evaluate both
global models on the server's held-out test set.

The same function serves `fedlens whatif` and the dashboard's What-if page. It uses only what the server already
holds (DP-SGD outputs and its own test set): no site is contacted and no ε is spent. Importing it is light (NumPy
and the store); the model and the test set (torch) are built on the first call.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.checkpoints import Checkpoints
from common.config import AppConfig
from common.run_store import load_run
from server.aggregate import aggregate, krum_selection, update_norm


@lru_cache(maxsize=2)
def _evaluator(config_items: tuple):  # noqa: ANN202
    # Building the model and tokenising the test set takes seconds: once per run configuration.
    from common.model import build_model, load_tokenizer
    from server.central_eval import make_central_eval, server_split

    cfg = AppConfig.from_run_config(dict(config_items))
    model = build_model(cfg.model, cfg.data.labels, seed=cfg.train.seed)
    return make_central_eval(cfg, model, server_split(cfg, model, load_tokenizer(cfg.model)))


def reaggregate(store: str | Path, run_id: str | None, round_: int, exclude: list[str]) -> dict[str, Any]:
    """The round's global model with and without the `exclude`d sites, side by side.

    Raises:
        LookupError: unknown run, or the round's updates were not kept.
        ValueError: an excluded site did not contribute to that round, or nothing would be left to average.
    """
    run = load_run(store, run_id)
    ckpt = Checkpoints(store, run["run_id"], keep=0)
    actual, updates = ckpt.load(round_)
    unknown = sorted(set(exclude) - set(updates))
    if unknown:
        raise ValueError(f"site(s) {', '.join(unknown)} contributed no update to round {round_}; "
                         f"its contributors were: {', '.join(sorted(updates)) or 'none'}")
    kept = {s: u for s, u in updates.items() if s not in exclude}
    if not kept:
        raise ValueError(f"excluding {', '.join(exclude)} leaves no update to average in round {round_}")
    server = AppConfig.from_run_config(dict(run["config"])).server
    # The rule the run used: a median round re-aggregated by FedAvg would show the effect of the rule, not of the
    # sites left out. Scores are not needed here.
    without, scores = aggregate(kept, server.aggregation, trim_fraction=server.trim_fraction,
                                byzantine=server.byzantine)
    # Multi-Krum averages only the n − f best of what is left; the other rules use every kept update.
    used = krum_selection(scores, byzantine=server.byzantine) if server.aggregation == "krum" and scores else kept
    out: dict[str, Any] = {
        "run_id": run["run_id"], "round": round_, "excluded": sorted(exclude), "sites_used": sorted(used),
        "aggregation": server.aggregation,
        "examples_used": sum(kept[s][1] for s in used),
        "distance": update_norm(without, actual),  # ‖re-aggregated − actual‖ over the travelling weights
        "actual": None, "without": None, "change": None,
    }
    evaluate = _evaluator(tuple(sorted(run["config"].items())))
    if evaluate is None:
        out["note"] = "server.central-eval is off for this run: no test set to compare the two models on"
        return out
    out["actual"], out["without"] = evaluate(actual), evaluate(without)
    out["change"] = {k: out["without"][k] - out["actual"][k] for k in out["actual"]
                     if math.isfinite(out["actual"][k]) and math.isfinite(out["without"][k])}
    return out


def describe(out: dict[str, Any]) -> str:
    """One sentence on a re-aggregation (`reaggregate`'s result), for the CLI and the dashboard alike."""
    return (f"Round {out['round']} without {', '.join(out['excluded'])}: {len(out['sites_used'])} site(s), "
            f"{out['examples_used']} examples, aggregated by the run's own rule ({out['aggregation']}); the global "
            f"weights move by {out['distance']:.4f} (L2).")
