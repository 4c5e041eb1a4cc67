"""Step 6 · Sites: which site is wrong? One row per site, its health, and its curves against the global one."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data, ui


def body(snap: dict) -> None:
    ui.header(snap, "Sites")
    table = data.site_table(snap)
    if table.empty:
        st.info("No site has answered yet.")
        return
    table.insert(1, "health", [badge(snap["findings"], s, status) for s, status in zip(table["site"], table["status"],
                                                                                        strict=True)])
    budget = table["ε budget"].dropna()
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        "health": st.column_config.TextColumn(help="the site's status if it is failing, else its worst finding (Findings page)"),
        "ε spent": st.column_config.ProgressColumn(
            "ε spent", format="%.2f", min_value=0.0, max_value=float(budget.max()) if not budget.empty else 1.0),
        "accuracy": st.column_config.NumberColumn(format="%.3f"),
        "macro-F1": st.column_config.NumberColumn(format="%.3f"),
        "val loss": st.column_config.NumberColumn(format="%.3f"),
        "train loss": st.column_config.NumberColumn(format="%.3f"),
        "update norm": st.column_config.NumberColumn(format="%.3f"),
        "update cosine": st.column_config.NumberColumn(
            format="%.3f", help="cosine of the site's update to the mean of the other sites' updates; under DP "
                                "honest updates are mostly noise and read near 0; a site far below the others "
                                "points against them"),
        "ε training": st.column_config.NumberColumn(format="%.2f", help="ε of the site's DP-SGD alone"),
        "ε diagnostics": st.column_config.NumberColumn(
            format="%.2f", help="ε of the site's released error summaries alone (dp.diagnostics-share)"),
        "ECE": st.column_config.NumberColumn(format="%.2f", help="expected calibration error (noised bins)"),
        "label issues": st.column_config.NumberColumn(
            format="percent", help="share of validation examples the model confidently puts in another class "
                                   "(Cleanlab's confident joint, noised)"),
        "clipped": st.column_config.NumberColumn(
            format="percent", help="share of per-sample gradients clipped in the last DP-SGD round"),
        "signal / noise": st.column_config.NumberColumn(
            format="%.2f", help="‖Σ clipped gradients‖ / (σ·C) per DP step: the gradient against the noise along "
                                "its own direction; below 1 a step's progress is mostly noise (noised value)"),
    })
    ui.noised_note(snap)

    st.subheader("Per-site curves")
    metric = st.radio("Metric", ["accuracy", "macro_f1", "loss", "train_loss", "update_norm", "update_cosine",
                                "signal_to_noise"],
                      horizontal=True, key="site-metric")
    curves = site_vs_global(snap, metric)
    if curves.empty:
        st.info("No round has been committed yet.")
        return
    st.altair_chart(alt.Chart(curves).mark_line(point=True).encode(
        x=alt.X("round:O"), y=alt.Y("value:Q", title=metric), color="site:N",
        strokeDash=alt.StrokeDash("kind:N", title=None),
        tooltip=["round", "site", alt.Tooltip("value", format=".3f")]), width="stretch")


def badge(findings: pd.DataFrame, site: str, status: str) -> str:
    """Plain text (a data grid cell has no emoji font on every machine): the status, or the worst finding."""
    if status not in ("ok", "waiting"):
        return f"✗ {status}"
    mine = findings[findings["site"] == site] if not findings.empty else findings
    for sev in ("critical", "warning", "info"):
        hits = mine[mine["severity"] == sev] if not mine.empty else mine
        if not hits.empty:
            return f"{sev}: {hits.iloc[-1]['kind']}"
    return "✓ ok"


def site_vs_global(snap: dict, metric: str) -> pd.DataFrame:
    rows, rounds = snap["site_rounds"], snap["rounds"]
    if rows.empty or metric not in rows:
        return pd.DataFrame()
    phase = "train" if metric in ("update_norm", "update_cosine") else "evaluate"
    mine = rows[(rows["phase"] == phase) & (rows["status"] == "ok")][["round", "site", metric]]
    out = mine.rename(columns={metric: "value"}).assign(kind="site")
    if metric in rounds:  # the global value of the same metric (sum of the sites' noised summaries)
        glob = rounds[["round", metric]].rename(columns={metric: "value"}).assign(site="global (all sites)",
                                                                                  kind="global")
        out = pd.concat([out, glob], ignore_index=True)
    return out.dropna(subset=["value"])


ui.live(body)
