"""`fedlens report`: one run of the store as the documented JSON contract (docs/report-schema.md) or a text table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.rounds import NEIGHBOURING_RELATION
from common.run_store import load_run, load_summaries
from common.run_views import diagnostics_share, run_config, site_views

LEDGER_KEYS = ("round", "kind", "mechanism", "noise_multiplier", "sample_rate", "steps", "sensitivity")
# 2: per-site ledger, epsilon_training / epsilon_diagnostics, summary; 3: findings as site, kind, round, severity,
# confidence, evidence (and renamed kinds); 4: neighbouring_relation (run and every ledger entry), census entries,
# epsilon_lifetime / epsilon_cap per site, dp_health.signal_to_noise (noise_to_signal gone); 5: finding kinds
# site_failed, update_rejected, straggler (were site-failed, update-rejected, dropout; older stores read as today's)
SCHEMA_VERSION = 5


def _clean(v: Any) -> Any:
    # JSON has no NaN / Inf: a value that is not a finite number is reported as null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _metrics(row: dict[str, Any] | None, prefix: str = "") -> dict[str, float | None]:
    # The server's test set also gives the global model's calibration (ECE, mean confidence of its predictions).
    keys = ("accuracy", "macro_f1", "loss", *(("ece", "confidence") if prefix == "test_" else ()))
    return {k: _clean(row.get(prefix + k)) if row else None for k in keys}


def build_report(store: str | Path, run_id: str | None = None) -> dict[str, Any]:
    """The report of one run (newest by default). Keys are a stable contract: later versions add, never rename."""
    run = load_run(store, run_id)
    latest_summaries = load_summaries(store, run["run_id"])
    rounds = run["rounds"]
    last = rounds[-1] if rounds else None
    cfg = run_config(run)
    dp_on = cfg.dp.enabled
    views = site_views(run)

    def spent(eps: float | None) -> float | None:
        return eps if eps is not None else (0.0 if dp_on else None)  # with DP on, a site that spent nothing spent 0

    sites = []
    for v in (v for v in views if v.registered):
        sites.append({
            "site": v.site,
            "examples": v.n_train,
            "validation_examples": v.n_val,
            "epsilon": spent(v.epsilon),
            "epsilon_budget": float(cfg.dp.target_epsilon) if dp_on else None,
            "delta": float(cfg.dp.target_delta) if dp_on else None,
            "status": "ok" if v.status == "waiting" else v.status,  # a site that joined and has no row yet: ok
            "rounds_trained": v.rounds_trained,
            "metrics": {**_metrics(v.metrics), "train_loss": _clean(v.metrics["train_loss"]) if v.metrics else None},
            "noise_multiplier": v.noise_multiplier,
            "last_reason": v.last_reason,
            "epsilon_training": spent(v.epsilon_training),
            "epsilon_diagnostics": spent(v.epsilon_diagnostics),
            # Every entry this run charged, with the relation it is accounted under: composing them with
            # dp-accounting (RDP, add/remove) gives back `epsilon` at `delta`.
            "ledger": [{**{k: e[k] for k in LEDGER_KEYS}, "neighbouring_relation": NEIGHBOURING_RELATION}
                       for e in run.get("ledger", []) if e["site"] == v.site],
            # The site's own lifetime ledger (all runs on its data, at its own δ) against its own cap.
            "epsilon_lifetime": _clean(v.epsilon_lifetime),  # null when ∞ (a run without DP)
            "epsilon_cap": v.epsilon_cap,
            "summary": ({"noised": dp_on, **latest_summaries[v.site]} if v.site in latest_summaries else None),
        })
    # A site that failed before it joined (no sizes): listed with its first failure, in event order.
    for v in sorted((v for v in views if not v.registered and v.failure_at is not None), key=lambda v: v.failure_at):
        sites.append({"site": v.site, "examples": None, "validation_examples": None, "epsilon": None,
                      "epsilon_budget": None, "delta": None, "status": "failed", "rounds_trained": 0,
                      "metrics": _metrics(None) | {"train_loss": None}, "noise_multiplier": None,
                      "last_reason": v.failure, "epsilon_training": None, "epsilon_diagnostics": None,
                      "ledger": [], "summary": None, "epsilon_lifetime": None, "epsilon_cap": None})

    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run["run_id"],
        "scenario": run["scenario"],
        "model": run["model"],
        "status": run["status"],
        "error": run["error"],
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "rounds_planned": run["rounds_planned"],
        "rounds_completed": len(rounds),
        "dp": dp_on,
        "neighbouring_relation": NEIGHBOURING_RELATION if dp_on else None,
        "diagnostics_share": diagnostics_share(run),
        "global": {**_metrics(last), "train_loss": _clean(last["train_loss"]) if last else None,
                   "noised": dp_on},
        "test": _metrics(last, "test_") if last and last["test_accuracy"] is not None else None,
        "rounds": [{"round": r["round"], "seconds": r["seconds"], "sites_ok": r["sites_ok"],
                    "sites_failed": r["sites_failed"], **_metrics(r), "train_loss": _clean(r["train_loss"]),
                    "test": _metrics(r, "test_") if r["test_accuracy"] is not None else None} for r in rounds],
        "sites": sites,
        "events": [{k: e[k] for k in ("round", "site", "kind", "message")} for e in run["events"]],
        # The issue's contract: site, kind, round, severity, confidence and the evidence sentence.
        "findings": [{"site": f["site"], "kind": f["kind"], "round": f["round"], "severity": f["severity"],
                      "confidence": f["confidence"], "evidence": f["message"],
                      "message": f["message"]} for f in run["findings"]],  # message: schema 2's name, kept
        "model_path": run["model_path"],
    }


def format_text(rep: dict[str, Any]) -> str:
    def f(v: Any, spec: str = ".3f") -> str:
        return "—" if v is None else format(v, spec)

    lines = [
        f"run {rep['run_id']}  [{rep['status']}]  scenario {rep['scenario']}",
        f"model {rep['model']}",
        f"rounds {rep['rounds_completed']}/{rep['rounds_planned']}",
        f"global (sites' validation{', noised' if rep['dp'] else ''}): accuracy {f(rep['global']['accuracy'])}  "
        f"macro-F1 {f(rep['global']['macro_f1'])}  loss {f(rep['global']['loss'])}",
    ]
    if rep["test"]:
        t = rep["test"]
        lines.append(f"global (server test set): accuracy {f(t['accuracy'])}  macro-F1 {f(t['macro_f1'])}  "
                     f"loss {f(t['loss'])}  ECE {f(t['ece'])}  confidence {f(t['confidence'])}")
    lines.append("")
    lines.append(f"{'site':<16}{'status':<9}{'examples':>9}{'ε spent':>9}{'train':>7}{'diag':>6}{'budget':>8}"
                 f"{'accuracy':>10}{'macro-F1':>10}{'loss':>8}{'ECE':>7}{'issues':>8}{'clipped':>9}")
    for s in rep["sites"]:
        m = s["metrics"]
        sm = s.get("summary") or {}
        health = sm.get("dp_health") or {}
        lines.append(f"{s['site']:<16}{s['status']:<9}{f(s['examples'], 'd'):>9}{f(s['epsilon'], '.2f'):>9}"
                     f"{f(s.get('epsilon_training'), '.2f'):>7}{f(s.get('epsilon_diagnostics'), '.2f'):>6}"
                     f"{f(s['epsilon_budget'], 'g'):>8}{f(m['accuracy']):>10}{f(m['macro_f1']):>10}{f(m['loss']):>8}"
                     f"{f((sm.get('calibration') or {}).get('ece'), '.2f'):>7}"
                     f"{f((sm.get('label_issues') or {}).get('share'), '.0%'):>8}"
                     f"{f(health.get('clip_fraction'), '.0%'):>9}")
    if rep["findings"]:
        lines.append("")
        lines.append("findings:")
        lines += [f"  round {f['round']}: [{f['severity']}, {f['kind']}, confidence {f['confidence']:.2f}] "
                  f"{f['evidence']}" for f in rep["findings"]]
    problems = [e for e in rep["events"] if e["kind"] not in ("site-joined",)]
    if problems:
        lines.append("")
        lines.append("events:")
        lines += [f"  round {e['round'] if e['round'] is not None else '-'}: {e['message']}" for e in problems]
    if rep["model_path"]:
        lines.append("")
        lines.append(f"final model: {rep['model_path']}")
    return "\n".join(lines)


def dumps(rep: dict[str, Any]) -> str:
    return json.dumps(rep, indent=2, allow_nan=False, default=_clean)
