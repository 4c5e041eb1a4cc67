"""Step 5 → readers: a stored run as per-site views and its config tree, shared by `fedlens report` and the dashboard.

`common.run_store.load_run` returns a run as plain dicts: one row per site, round and phase. What each reader shows
of a site (its status in its latest round, the most ε it spent, its latest metrics, ...) is derived here once, from
those dicts, with the standard library only: the report needs neither pandas nor Streamlit, and the dashboard
turns the views into a DataFrame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.config import AppConfig

# Event kinds (not finding kinds) that name a site which failed; a site that failed before it joined shows only here.
FAILURE_EVENTS = ("site-failed", "run-failed")
METRICS = ("accuracy", "macro_f1", "loss", "train_loss")  # of a site's latest evaluation, as both readers show them


def run_config(run: dict[str, Any]) -> AppConfig:
    """The config tree of a stored run (a `load_run` dict): its stored values, and today's pyproject default for
    every key it lacks (a store written before the key existed, or a hand-made one).

    Keys this version does not know (a later or earlier version's) are left out; the values are not validated again.
    """
    return AppConfig.from_stored(run["config"])


def diagnostics_share(run: dict[str, Any]) -> float | None:
    """The share of its budget a DP run let its summaries spend, as the run recorded it; None without DP, or in a
    store written before the share existed (not today's default: that run had no such share)."""
    dp = run_config(run).dp
    return dp.diagnostics_share if dp.enabled and "dp.diagnostics-share" in run["config"] else None


@dataclass(frozen=True)
class SiteView:
    """One site of a stored run, as the readers show it. Each ε is the most any of its rows reports (ε only grows)."""

    site: str
    registered: bool  # in the run's sites table: it joined, with released sizes
    n_train: int | None  # its released train / validation sizes (None: it never joined)
    n_val: int | None
    answered: bool  # at least one row (ok, refused or failed) in some round
    status: str  # of its latest round: a row that is not "ok" wins ("refused" | "failed"), else "ok"; "waiting": no row
    reason: str  # why, when status is neither "ok" nor "waiting" (else "")
    last_reason: str  # the newest non-empty reason of any of its rows, any round
    failure: str  # the message of its first site-failed / run-failed event ("" if none)
    failure_at: int | None  # ... that event's position among the run's events
    rounds_trained: int  # train rows with status "ok"
    epsilon: float | None  # None: no row carries one (DP off, or nothing spent yet)
    epsilon_training: float | None
    epsilon_diagnostics: float | None
    epsilon_lifetime: float | None  # its lifetime ε on its data, all runs (∞: a run without DP)
    epsilon_cap: float | None  # its own lifetime cap, newest report
    noise_multiplier: float | None  # DP-SGD σ of its newest train row (any status)
    metrics: dict[str, float | None] | None  # METRICS of its newest "ok" evaluation; None: it never evaluated
    # The newest value each of these took (a round whose summary lacks one does not hide an older one).
    ece: float | None  # ok evaluations
    label_issues: float | None
    clip_fraction: float | None
    signal_to_noise: float | None
    update_norm: float | None  # train rows, any status
    update_cosine: float | None
    # The round each of the values above comes from, by field name ("metrics" for the METRICS of one evaluation,
    # "epsilon" for the round of the most ε, ...); a value that is None has no entry.
    rounds: dict[str, int] = field(default_factory=dict)


def site_views(run: dict[str, Any]) -> list[SiteView]:
    """One view per site the run knows: the sites that joined (in the store's order), then sites that have rows but
    never joined (in the order they first appear), then sites seen only in a failure event (in event order)."""
    rows_of: dict[str, list[dict[str, Any]]] = {}
    for r in run["site_rounds"]:  # ordered by round, site, phase
        rows_of.setdefault(r["site"], []).append(r)
    failures: dict[str, tuple[int, str]] = {}
    for i, e in enumerate(run["events"]):
        if e["kind"] in FAILURE_EVENTS and e["site"]:
            failures.setdefault(e["site"], (i, e["message"]))
    joined = {s["site"]: s for s in run["sites"]}
    names = list(joined) + [s for s in rows_of if s not in joined]
    names += [s for s in failures if s not in set(names)]
    return [_view(name, joined.get(name), rows_of.get(name, []), failures.get(name)) for name in names]


def _view(name: str, joined: dict[str, Any] | None, rows: list[dict[str, Any]],
          failure: tuple[int, str] | None) -> SiteView:
    train = [r for r in rows if r["phase"] == "train"]
    evals = [r for r in rows if r["phase"] == "evaluate" and r["status"] == "ok"]
    # Its latest round: the last row that is not ok decides (rows are in phase order within a round).
    last_round = [r for r in rows if r["round"] == rows[-1]["round"]] if rows else []
    bad = [r for r in last_round if r["status"] != "ok"]
    return SiteView(
        site=name,
        registered=joined is not None,
        n_train=joined["n_train"] if joined else None,
        n_val=joined["n_val"] if joined else None,
        answered=bool(rows),
        status=bad[-1]["status"] if bad else ("ok" if rows else "waiting"),
        reason=bad[-1]["reason"] if bad else "",
        last_reason=next((r["reason"] for r in reversed(rows) if r.get("reason")), ""),
        failure=failure[1] if failure else "",
        failure_at=failure[0] if failure else None,
        rounds_trained=sum(1 for r in train if r["status"] == "ok"),
        epsilon=_most(rows, "epsilon"),
        epsilon_training=_most(rows, "epsilon_training"),
        epsilon_diagnostics=_most(rows, "epsilon_diagnostics"),
        epsilon_lifetime=_most(rows, "epsilon_lifetime"),
        epsilon_cap=_newest(rows, "epsilon_cap"),
        noise_multiplier=train[-1].get("noise_multiplier") if train else None,
        metrics={k: evals[-1].get(k) for k in METRICS} if evals else None,
        ece=_newest(evals, "ece"),
        label_issues=_newest(evals, "label_issues"),
        clip_fraction=_newest(evals, "clip_fraction"),
        signal_to_noise=_newest(evals, "signal_to_noise"),
        update_norm=_newest(train, "update_norm"),
        update_cosine=_newest(train, "update_cosine"),
        rounds={k: r for k, r in (
            ("metrics", evals[-1]["round"] if evals else None), ("epsilon", _round_of_most(rows, "epsilon")),
            ("epsilon_lifetime", _round_of_most(rows, "epsilon_lifetime")),
            ("noise_multiplier", train[-1]["round"] if train else None),
            *((k, _newest_round(evals, k)) for k in ("ece", "label_issues", "clip_fraction", "signal_to_noise")),
            *((k, _newest_round(train, k)) for k in ("update_norm", "update_cosine")),
            ("status", rows[-1]["round"] if rows else None)) if r is not None},
    )


def _most(rows: list[dict[str, Any]], key: str) -> Any:
    # A store written before a column existed has rows without it: nothing to show, not an error.
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def _newest(rows: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def _newest_round(rows: list[dict[str, Any]], key: str) -> int | None:
    return next((r["round"] for r in reversed(rows) if r.get(key) is not None), None)


def _round_of_most(rows: list[dict[str, Any]], key: str) -> int | None:
    values = [(r[key], r["round"]) for r in rows if r.get(key) is not None]
    return max(values)[1] if values else None
