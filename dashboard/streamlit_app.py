"""fedlens dashboard v0: pick a run, see its global curves and every site's metrics and privacy spend, live.

Run as:  fedlens dashboard --store runs/fedlens.db   (or: streamlit run dashboard/streamlit_app.py -- --store PATH)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` does not put the project on the path
from dashboard import data  # noqa: E402

# ==== Constants ======================================================================================================
REFRESH_SECONDS = 2  # while a run is live
COLLAPSE_SHARE = 0.9  # one class taking this share of predictions = the model collapsed onto it


def store_path() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default=os.environ.get("FEDLENS_STORE", "runs/fedlens.db"))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return str(Path(args.store).resolve())


# ==== Page ===========================================================================================================
st.set_page_config(page_title="fedlens", layout="wide")
STORE = store_path()
st.sidebar.title("fedlens")
st.sidebar.caption(f"store: `{STORE}`")

runs = data.runs(STORE)
if runs.empty:
    st.info(f"No runs in {STORE} yet. Start one with `fedlens simulate --scenario simulations/smoke.toml`; "
            "this page picks it up by itself.")
    st.stop()

labels = {r.run_id: f"{r.run_id} · {r.status} · {r.rounds_completed}/{r.rounds_planned} rounds"
          for r in runs.itertuples()}
run_id = st.sidebar.selectbox("Run", list(labels), format_func=labels.get)


@st.fragment(run_every=REFRESH_SECONDS if runs.set_index("run_id").loc[run_id, "status"] == "running" else None)
def run_view(run_id: str) -> None:
    try:
        snap = data.run(STORE, run_id)
    except LookupError as e:
        st.error(str(e))
        return
    rounds, site_rounds = snap["rounds"], snap["site_rounds"]
    st.title(f"Run {run_id}")
    st.caption(f"{snap['scenario']} · {snap['model']} · status **{snap['status']}**")
    if snap["status"] == "failed":
        st.error(f"The run failed: {snap['error']}. Rounds committed before the failure are shown below.")

    # ---- KPI row ----------------------------------------------------------------------------------------------------
    done, planned = len(rounds), int(snap["rounds_planned"])
    cols = st.columns(5)
    cols[0].metric("Round", f"{done} / {planned}")
    cols[0].progress(done / planned if planned else 0.0)
    last = rounds.iloc[-1] if done else None
    prev = rounds.iloc[-2] if done > 1 else None

    def kpi(col, label: str, key: str) -> None:  # noqa: ANN001
        if last is None or pd.isna(last.get(key)):
            col.metric(label, "—")
            return
        delta = None if prev is None or pd.isna(prev.get(key)) else f"{last[key] - prev[key]:+.3f}"
        col.metric(label, f"{last[key]:.3f}", delta)

    has_test = done and "test_accuracy" in rounds and rounds["test_accuracy"].notna().any()
    kpi(cols[1], "Accuracy (test set)" if has_test else "Accuracy (sites, noised)",
        "test_accuracy" if has_test else "accuracy")
    kpi(cols[2], "Macro-F1 (test set)" if has_test else "Macro-F1 (sites, noised)",
        "test_macro_f1" if has_test else "macro_f1")
    table = data.site_table(snap)
    eps = table["ε spent"].dropna() if not table.empty else pd.Series(dtype=float)
    budget = table["ε budget"].dropna() if not table.empty else pd.Series(dtype=float)
    cols[3].metric("Max ε spent / budget", f"{eps.max():.2f} / {budget.max():g}" if not eps.empty and not budget.empty
                   else "no DP" if not snap["config"].get("dp.enabled", True) else "—")
    failing = table[table["status"] != "ok"] if not table.empty else table
    cols[4].metric("Sites failing", f"{len(failing)} / {len(table)}")

    if done == 0:
        st.info("Round 1 is in progress: results appear here as soon as it is committed.")
    if has_test and last is not None and pd.notna(last.get("test_max_prediction_share")) \
            and last["test_max_prediction_share"] >= COLLAPSE_SHARE:
        st.warning(f"The global model predicts one class for {last['test_max_prediction_share']:.0%} of the test "
                   "set: it has collapsed onto the majority class (accuracy is then the class share, macro-F1 ≈ 1/K).")

    # ---- global curves ----------------------------------------------------------------------------------------------
    curves = data.global_curves(rounds)
    if not curves.empty:
        st.subheader("Global model per round")
        left, right = st.columns(2)
        quality = curves[curves["metric"] != "loss"]
        left.altair_chart(alt.Chart(quality).mark_line(point=True).encode(
            x=alt.X("round:O", title="round"), y=alt.Y("value:Q", title="score", scale=alt.Scale(domain=[0, 1])),
            color="metric:N", strokeDash="source:N", tooltip=["round", "metric", "source", alt.Tooltip("value", format=".3f")],
        ), width="stretch")
        right.altair_chart(alt.Chart(curves[curves["metric"] == "loss"]).mark_line(point=True).encode(
            x=alt.X("round:O", title="round"), y=alt.Y("value:Q", title="loss"), color="source:N",
            tooltip=["round", "source", alt.Tooltip("value", format=".3f")],
        ), width="stretch")

    # ---- sites ------------------------------------------------------------------------------------------------------
    st.subheader("Sites")
    if table.empty:
        st.info("No site has answered yet.")
    else:
        st.dataframe(table, hide_index=True, width="stretch", column_config={
            "ε spent": st.column_config.ProgressColumn(
                "ε spent", format="%.2f", min_value=0.0,
                max_value=float(budget.max()) if not budget.empty else 1.0),
            "accuracy": st.column_config.NumberColumn(format="%.3f"),
            "macro-F1": st.column_config.NumberColumn(format="%.3f"),
            "val loss": st.column_config.NumberColumn(format="%.3f"),
            "train loss": st.column_config.NumberColumn(format="%.3f"),
            "update norm": st.column_config.NumberColumn(format="%.3f"),
            "ε training": st.column_config.NumberColumn(format="%.2f", help="ε of the site's DP-SGD alone"),
            "ε diagnostics": st.column_config.NumberColumn(
                format="%.2f", help="ε of the site's released error summaries alone (dp.diagnostics-share)"),
            "ECE": st.column_config.NumberColumn(format="%.2f", help="expected calibration error (noised bins)"),
            "label issues": st.column_config.NumberColumn(
                format="percent", help="share of validation examples the model confidently puts in another class "
                                       "(Cleanlab's confident joint, noised); noise can push it above 100 %"),
            "clipped": st.column_config.NumberColumn(
                format="percent", help="share of per-sample gradients clipped in the last DP-SGD round"),
            "noise / signal": st.column_config.NumberColumn(
                format="%.2f", help="‖DP noise‖ / ‖Σ clipped gradients‖ per step; above 1 the step is mostly noise"),
        })
        if snap["config"].get("dp.enabled", True):
            st.caption("Site metrics come from each site's noised summary (Gaussian noise on counts, charged to its "
                       "ε): on small validation splits they are noisy by design.")
        metric = st.radio("Per-site curve", ["accuracy", "macro_f1", "loss", "train_loss"], horizontal=True)
        sc = data.site_curves(site_rounds, metric)
        if not sc.empty:
            st.altair_chart(alt.Chart(sc).mark_line(point=True).encode(
                x=alt.X("round:O"), y=alt.Y("value:Q", title=metric), color="site:N",
                tooltip=["round", "site", alt.Tooltip("value", format=".3f")]), width="stretch")

    # ---- one site's error summary -----------------------------------------------------------------------------------
    if not table.empty:
        error_summary(snap, list(table["site"]))

    # ---- events -----------------------------------------------------------------------------------------------------
    events = snap["events"]
    if not events.empty:
        st.subheader("Events")
        shown = events[["round", "site", "kind", "message"]].iloc[::-1]
        st.dataframe(shown, hide_index=True, width="stretch")


def error_summary(snap: dict, sites: list[str]) -> None:
    st.subheader("Error summary of a site")
    site = st.selectbox("Site", sites, key="summary-site")
    summary = data.latest_summary(snap["site_rounds"], site)
    if summary is None:
        st.info(f"{site} has not released a summary yet (it failed, withheld it, or round 1 is still running).")
        return
    labels = str(snap["config"].get("data.labels", "")).split(",")
    std = (summary.get("noise_std") or {}).get("confusion", 0.0)
    st.caption(f"Round {summary['round']}. " + (f"Noised values: Gaussian noise of std {std:.1f} per count "
                                                 "(secondary histograms twice that), then clamped at 0 and "
                                                 "rescaled to the site's public split sizes."
                                                 if std else "Exact values (DP off)."))
    left, mid, right = st.columns(3)
    conf = data.confusion_frame(summary, labels)
    left.altair_chart(alt.Chart(conf, title="Confusion (validation)").mark_rect().encode(
        x=alt.X("predicted:N"), y=alt.Y("given:N"), color=alt.Color("count:Q", scale=alt.Scale(scheme="blues")),
        tooltip=["given", "predicted", alt.Tooltip("count", format=".1f")]), width="stretch")
    hist = pd.DataFrame({"label": labels * 3 if len(labels) == len(summary["label_histogram"]) else
                         [str(i) for i in range(len(summary["label_histogram"]))] * 3,
                         "which": ["validation labels"] * len(summary["label_histogram"])
                         + ["predictions"] * len(summary["label_histogram"])
                         + ["train labels"] * len(summary["label_histogram"]),
                         "count": summary["label_histogram"] + summary["prediction_histogram"]
                         + summary["train_label_histogram"]})
    mid.altair_chart(alt.Chart(hist, title="Labels and predictions").mark_bar().encode(
        x=alt.X("label:N", title=None), xOffset="which:N", y=alt.Y("count:Q"), color="which:N",
        tooltip=["which", "label", alt.Tooltip("count", format=".1f")]), width="stretch")
    edges = summary["loss"]["edges"]
    loss = pd.DataFrame({"loss": [round((a + b) / 2, 2) for a, b in zip(edges[:-1], edges[1:], strict=True)] * 2,
                         "split": ["validation"] * (len(edges) - 1) + ["train"] * (len(edges) - 1),
                         "examples": summary["loss"]["val_histogram"] + summary["loss"]["train_histogram"]})
    right.altair_chart(alt.Chart(loss, title="Per-example loss").mark_bar(opacity=0.7).encode(
        x=alt.X("loss:O", title="loss (bin centre)"), y=alt.Y("examples:Q", stack=None), color="split:N",
        tooltip=["split", "loss", alt.Tooltip("examples", format=".1f")]), width="stretch")


run_view(run_id)
