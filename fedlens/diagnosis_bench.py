"""`fedlens bench diagnosis`: run a folder of fault scenarios and score the findings against their ground truth.

Each scenario runs in a fresh `fedlens simulate` process. The injected faults (run store table `faults`, which no
diagnosis code reads) are the truth; a site is *flagged* when it has any site-level finding other than
budget_exhausted (an honest site at the end of its budget is not faulty). Scores, over all (scenario, site) pairs:

  precision, recall         flagged vs faulty sites
  root_cause_accuracy       of the faulty sites found, the share whose most confident finding names the cause
                            (EXPECTED below: e.g. text_corruption -> data_shift, crash -> dropout or site-failed)
  rounds_to_detect          mean and max round of the first finding naming the right cause
  clean_silent_rate         scenarios without faults in which no site was flagged
  diagnostics_share         the server's diagnostics time / round time, summed over every round
  min_noise_multiplier      the smallest DP-SGD σ any site trained with (the issue asks σ ≥ 0.8 everywhere)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.rounds import FindingKind as K
from fedlens.bench import PROJECT_ROOT

SUITE = PROJECT_ROOT / "simulations" / "faults"
EXPECTED: dict[str, set[str]] = {  # injected fault kind -> the finding kinds that name it
    "label_noise": {K.LABEL_NOISE}, "label_flip": {K.LABEL_FLIP}, "class_missing": {K.CLASS_MISSING},
    "text_corruption": {K.DATA_SHIFT}, "domain_shift": {K.DATA_SHIFT}, "lr_blowup": {K.DIVERGENCE},
    "overfit": {K.OVERFITTING}, "free_rider": {K.FREE_RIDER}, "crash": {K.STRAGGLER, K.SITE_FAILED},
    "straggler": {K.STRAGGLER}, "bad_update": {K.UPDATE_REJECTED},
}
NOT_A_FAULT = {K.BUDGET_EXHAUSTED}
TARGETS = {"precision": 0.95, "recall": 0.95, "root_cause_accuracy": 0.90, "rounds_to_detect": 5,
           "clean_silent_rate": 0.95, "diagnostics_share": 0.02, "min_noise_multiplier": 0.8}


def run_scenario(path: Path, store: Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Simulate one scenario in a fresh process (`overrides`: `key=value` config items on top of the scenario's);
    returns its faults, findings, rounds and ledger."""
    from common.run_store import load_faults, load_run

    # Each scenario is its own simulated world: its sites' lifetime ledgers start with it (beside its store), or
    # the scenarios run before it would use up their budgets.
    sites = store.with_name(f"{store.stem}-sites")
    shutil.rmtree(sites, ignore_errors=True)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "1",
           "FEDLENS_SITE_STATE": str(sites)}
    t0 = time.time()
    sets = [a for item in overrides for a in ("--set", item)]
    proc = subprocess.run([sys.executable, "-m", "fedlens.cli", "simulate", "--scenario", str(path), "--store",
                           str(store), *sets], capture_output=True, text=True, env=env)
    run = load_run(store)
    return {"scenario": path.stem, "seconds": time.time() - t0, "status": run["status"],
            "returncode": proc.returncode, "faults": load_faults(store, run["run_id"]), "findings": run["findings"],
            "rounds": run["rounds"], "ledger": run["ledger"], "stderr_tail": proc.stderr[-1500:]}


def score(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The benchmark's scores from finished scenario runs (pure: the unit tests feed it made-up runs)."""
    tp = fp = fn = 0
    causes_right, detect_rounds, clean, clean_silent = 0, [], 0, 0
    per_kind: dict[str, dict[str, Any]] = {}
    diag_s = round_s = 0.0
    sigmas = []
    for r in runs:
        truth: dict[str, set[str]] = {}
        for f in r["faults"]:
            truth.setdefault(f["site"], set()).add(f["kind"])
        flagged: dict[str, list[dict]] = {}
        for f in r["findings"]:
            if f["site"] is not None and f["kind"] not in NOT_A_FAULT:
                flagged.setdefault(f["site"], []).append(f)
        if not truth:
            clean += 1
            clean_silent += not flagged
        tp += len(set(flagged) & set(truth))
        fp += len(set(flagged) - set(truth))
        fn += len(set(truth) - set(flagged))
        for site, kinds in truth.items():
            expected = set().union(*(EXPECTED.get(k, {k}) for k in kinds))
            mine = flagged.get(site, [])
            # Root cause: the most confident finding at the site (the latest among equals) names the fault.
            top = max(mine, key=lambda f: (f.get("confidence") or 1.0, f["round"] or 0)) if mine else None
            right = top is not None and top["kind"] in expected
            first = min((f["round"] for f in mine if f["kind"] in expected), default=None)
            causes_right += right
            if first is not None:
                detect_rounds.append(first)
            for kind in kinds:
                k = per_kind.setdefault(kind, {"sites": 0, "found": 0, "root_cause": 0, "rounds_to_detect": []})
                k["sites"] += 1
                k["found"] += bool(mine)
                k["root_cause"] += right
                if first is not None:
                    k["rounds_to_detect"].append(first)
        for rnd in r["rounds"]:
            diag_s += rnd.get("diagnostics_seconds") or 0.0
            round_s += rnd.get("seconds") or 0.0
        sigmas += [e["noise_multiplier"] for e in r["ledger"] if e["kind"] == "dpsgd"]
    found = tp
    for k in per_kind.values():
        rounds = k.pop("rounds_to_detect")
        k["rounds_to_detect"] = max(rounds) if rounds else None
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "root_cause_accuracy": causes_right / found if found else None,
        "rounds_to_detect": max(detect_rounds) if detect_rounds else None,
        "rounds_to_detect_mean": sum(detect_rounds) / len(detect_rounds) if detect_rounds else None,
        "clean_silent_rate": clean_silent / clean if clean else None,
        "diagnostics_share": diag_s / round_s if round_s else None,
        "min_noise_multiplier": min(sigmas) if sigmas else None,
        "per_kind": per_kind,
        "counts": {"true_positive_sites": tp, "false_positive_sites": fp, "missed_sites": fn, "clean_runs": clean},
    }


def run(suite: Path = SUITE, *, repeat: int = 1, keep: Path | None = None, overrides: tuple[str, ...] = (),
        progress=print) -> dict[str, Any]:  # noqa: ANN001
    """Run every scenario of `suite` `repeat` times and score all runs together; with `repeat` > 1 the scores of each
    pass are kept under "repeats" (the spread between passes is the benchmark's own noise). `keep`: a folder that
    keeps each run store (open one with `fedlens report` or the dashboard)."""
    files = sorted(Path(suite).glob("*.toml"))
    if not files:
        raise ValueError(f"no scenario files (*.toml) in {suite}")
    if repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {repeat}")
    runs, passes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(keep) if keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for rep in range(1, repeat + 1):
            this = []
            for i, path in enumerate(files, 1):
                progress(f"[{'' if repeat == 1 else f'pass {rep}/{repeat}, '}{i}/{len(files)}] {path.name}…")
                store = folder / (f"{path.stem}.db" if repeat == 1 else f"{path.stem}-{rep}.db")
                store.unlink(missing_ok=True)
                r = run_scenario(path, store, overrides)
                if r["status"] != "completed":
                    progress(f"  {path.name} ended {r['status']}: {r['stderr_tail'][-300:]}")
                this.append(r)
            passes.append(this)
            runs += this
    out = score(runs)
    if repeat > 1:
        out["repeats"] = [{k: v for k, v in score(p).items() if k not in ("per_kind", "counts")} for p in passes]
    out["scenarios"] = _scenario_rows(runs)
    out["suite"], out["targets"] = str(suite), TARGETS
    return out


def rescore(folder: Path, *, progress=print) -> dict[str, Any]:  # noqa: ANN001
    """Score run stores kept by an earlier `--keep` with this version's diagnosis (`fedlens diagnose` on each):
    the same releases, timings and faults, the current rules. Seconds instead of a new run of the suite."""
    from common.run_store import load_faults
    from fedlens.diagnose import rediagnose_store

    stores = sorted(Path(folder).glob("*.db"))
    if not stores:
        raise ValueError(f"no run stores (*.db) in {folder}; keep some with `fedlens bench diagnosis --keep DIR`")
    runs = []
    for store in stores:
        progress(f"rescoring {store.name}…")
        run, found = rediagnose_store(store)
        runs.append({"scenario": store.stem, "status": run["status"], "seconds": 0.0,
                     "faults": load_faults(store, run["run_id"]), "rounds": run["rounds"], "ledger": run["ledger"],
                     "findings": [{"site": f.site, "kind": f.kind, "round": r, "confidence": f.confidence}
                                  for r, f in found]})
    out = score(runs)
    out["scenarios"] = _scenario_rows(runs)
    out["suite"], out["targets"], out["rescored"] = str(folder), TARGETS, True
    return out


def _scenario_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per scenario run for the table: its truth and the site-level findings it raised (site:kind@round)."""
    return [{"scenario": r["scenario"], "status": r["status"], "seconds": round(r["seconds"], 1),
             "faults": [f"{f['site']}:{f['kind']}" for f in r["faults"]],
             "findings": sorted({f"{f['site']}:{f['kind']}@{f['round']}" for f in r["findings"]
                                 if f["site"] is not None})} for r in runs]


def format_table(out: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"{'figure':<22} {'measured':>10}  target"]
    for key, target in TARGETS.items():
        lines.append(f"{key:<22} {fmt(out.get(key)):>10}  {'≤' if key in ('rounds_to_detect', 'diagnostics_share') else '≥'} "
                     f"{target}")
    for i, rep in enumerate(out.get("repeats", []), 1):
        lines.append(f"pass {i}: " + ", ".join(f"{k} {fmt(rep.get(k))}" for k in TARGETS))
    lines.append("")
    lines.append(f"{'fault kind':<16} {'sites':>5} {'found':>5} {'root cause':>10} {'rounds':>6}")
    for kind, k in sorted(out["per_kind"].items()):
        lines.append(f"{kind:<16} {k['sites']:>5} {k['found']:>5} {k['root_cause']:>10} {fmt(k['rounds_to_detect']):>6}")
    lines.append("")
    for s in out.get("scenarios", []):
        lines.append(f"{s['scenario']:<22} {s['status']:<10} truth {', '.join(s['faults']) or '(clean)'}; "
                     f"found {', '.join(s['findings']) or 'nothing'}")
    return "\n".join(lines)
