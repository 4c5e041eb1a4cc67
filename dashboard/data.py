"""Step 6's data layer: the run store -> pandas DataFrames for the pages (cached briefly so live runs stay fresh)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from common import run_store

TTL_SECONDS = 2  # a new round shows within a couple of seconds; the store is cheap to read


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def runs(store: str) -> pd.DataFrame:
    """One row per run, newest first. Empty when the store does not exist yet or holds no run."""
    if not Path(store).is_file():
        return pd.DataFrame()
    frame = pd.DataFrame(run_store.list_runs(store))
    if not frame.empty:
        frame["started"] = pd.to_datetime(frame["started_at"], unit="s").dt.strftime("%Y-%m-%d %H:%M")
    return frame


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def run(store: str, run_id: str) -> dict:
    """One run as a consistent snapshot: run fields + DataFrames of rounds, site rows, sites, events."""
    raw = run_store.load_run(store, run_id)
    out = {k: v for k, v in raw.items() if not isinstance(v, list)}
    out["rounds"] = pd.DataFrame(raw["rounds"])
    out["site_rounds"] = pd.DataFrame(raw["site_rounds"])
    out["sites"] = pd.DataFrame(raw["sites"])
    out["events"] = pd.DataFrame(raw["events"])
    return out


def global_curves(rounds: pd.DataFrame) -> pd.DataFrame:
    """Long format (round, metric, source, value) for the global charts."""
    if rounds.empty:
        return pd.DataFrame(columns=["round", "metric", "source", "value"])
    parts = []
    for col, metric, source in [("test_accuracy", "accuracy", "server test set"),
                                ("test_macro_f1", "macro-F1", "server test set"),
                                ("test_loss", "loss", "server test set"),
                                ("accuracy", "accuracy", "sites' validation (noised)"),
                                ("macro_f1", "macro-F1", "sites' validation (noised)"),
                                ("loss", "loss", "sites' validation (noised)"),
                                ("train_loss", "loss", "sites' train (noised)")]:
        if col in rounds and rounds[col].notna().any():
            parts.append(pd.DataFrame({"round": rounds["round"], "metric": metric, "source": source,
                                       "value": rounds[col]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["round", "metric", "source", "value"])


def site_table(snapshot: dict) -> pd.DataFrame:
    """One row per site: size, status, latest metrics, ε spent vs budget, update norm."""
    sites, rows = snapshot["sites"], snapshot["site_rounds"]
    config = snapshot.get("config", {})
    budget = float(config.get("dp.target-epsilon", 0.0)) if config.get("dp.enabled", True) else None
    names = list(sites["site"]) if not sites.empty else []
    if not rows.empty:
        names += [s for s in rows["site"].unique() if s not in names]
    out = []
    for name in names:
        mine = rows[rows["site"] == name] if not rows.empty else rows
        size = sites[sites["site"] == name] if not sites.empty else sites
        train = mine[mine["phase"] == "train"] if not mine.empty else mine
        evals = mine[(mine["phase"] == "evaluate") & (mine["status"] == "ok")] if not mine.empty else mine
        last_round = mine[mine["round"] == mine["round"].max()] if not mine.empty else mine
        bad = last_round[last_round["status"] != "ok"] if not last_round.empty else last_round
        latest_eval = evals.iloc[-1] if not evals.empty else None
        eps = mine["epsilon"].dropna() if not mine.empty else pd.Series(dtype=float)
        out.append({
            "site": name,
            "status": bad.iloc[-1]["status"] if not bad.empty else ("ok" if not mine.empty else "waiting"),
            "train examples": int(size.iloc[0]["n_train"]) if not size.empty and pd.notna(size.iloc[0]["n_train"]) else None,
            "ε spent": float(eps.max()) if not eps.empty else None,
            "ε training": _most(mine, "epsilon_training"),
            "ε diagnostics": _most(mine, "epsilon_diagnostics"),
            "ε budget": budget,
            "accuracy": latest_eval["accuracy"] if latest_eval is not None else None,
            "macro-F1": latest_eval["macro_f1"] if latest_eval is not None else None,
            "val loss": latest_eval["loss"] if latest_eval is not None else None,
            "train loss": latest_eval["train_loss"] if latest_eval is not None else None,
            "ECE": _latest(evals, "ece"),
            "label issues": _latest(evals, "label_issues"),
            "clipped": _latest(evals, "clip_fraction"),
            "noise / signal": _latest(evals, "noise_to_signal"),
            "update norm": _latest(train, "update_norm"),
            "reason": bad.iloc[-1]["reason"] if not bad.empty else "",
        })
    return pd.DataFrame(out)


def _latest(frame: pd.DataFrame, col: str):  # noqa: ANN202
    # Stores written before a column existed read as a frame without it: show nothing, not an error.
    if frame.empty or col not in frame or not frame[col].notna().any():
        return None
    return frame[col].dropna().iloc[-1]


def _most(frame: pd.DataFrame, col: str) -> float | None:
    return float(frame[col].max()) if not frame.empty and col in frame and frame[col].notna().any() else None


def latest_summary(site_rounds: pd.DataFrame, site: str) -> dict | None:
    """The newest noised summary a site released (common/diagnostics.derive's fields), with its round."""
    if site_rounds.empty or "summary_json" not in site_rounds:
        return None
    mine = site_rounds[(site_rounds["site"] == site) & site_rounds["summary_json"].notna()]
    if mine.empty:
        return None
    row = mine.iloc[-1]
    return {"round": int(row["round"]), **json.loads(row["summary_json"])}


def confusion_frame(summary: dict, labels: list[str]) -> pd.DataFrame:
    """Long format (given, predicted, count) of a noised confusion matrix, rebuilt from its per-class parts."""
    k = len(summary["label_histogram"])
    names = labels if len(labels) == k else [str(i) for i in range(k)]
    matrix = summary.get("confusion")
    rows = [{"given": names[i], "predicted": names[j], "count": matrix[i][j]} for i in range(k) for j in range(k)] \
        if matrix else []
    return pd.DataFrame(rows)


def site_curves(site_rounds: pd.DataFrame, metric: str) -> pd.DataFrame:
    """(round, site, value) of one per-site evaluation metric."""
    if site_rounds.empty:
        return pd.DataFrame(columns=["round", "site", "value"])
    ev = site_rounds[(site_rounds["phase"] == "evaluate") & (site_rounds["status"] == "ok")]
    return ev[["round", "site", metric]].rename(columns={metric: "value"})
