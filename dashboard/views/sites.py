"""Step 6 · Sites: which site is wrong? One row per site, its health, and its curves against the global one."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data, ui

OVERVIEW, GROUPS = data.SITE_OVERVIEW, data.SITE_GROUPS
ROUND = "the round this group's values come from (a site's newest summary or update may be older than its newest round)"
FORMATS = {
    "health": st.column_config.TextColumn(help="the site's status if it is failing, else its worst finding and the "
                                               "round it was recorded (Findings page)"),
    "latest round": st.column_config.NumberColumn(help="the newest round the site answered in"),
    "metrics round": st.column_config.NumberColumn(help=ROUND),
    "summary round": st.column_config.NumberColumn(help=ROUND),
    "update round": st.column_config.NumberColumn(help=ROUND),
    "accuracy": st.column_config.NumberColumn(format="%.3f"),
    "macro-F1": st.column_config.NumberColumn(format="%.3f"),
    "val loss": st.column_config.NumberColumn(format="%.3f"),
    "train loss": st.column_config.NumberColumn(format="%.3f"),
    "update norm": st.column_config.NumberColumn(format="%.3f"),
    "update cosine": st.column_config.NumberColumn(
        format="%.3f", help="cosine of the site's update to the mean of the other sites' updates; under DP "
                            "honest updates are mostly noise and read near 0; a site far below the others "
                            "points against them"),
    "σ (DP-SGD)": st.column_config.NumberColumn(format="%.2f", help="the noise multiplier of its newest training"),
    "ε training": st.column_config.NumberColumn(format="%.2f", help="ε of the site's DP-SGD alone"),
    "ε diagnostics": st.column_config.NumberColumn(
        format="%.2f", help="ε of the site's released error summaries alone (dp.diagnostics-share)"),
    "lifetime ε": st.column_config.NumberColumn(format="%.2f", help="everything released from its data, all runs"),
    "lifetime cap": st.column_config.NumberColumn(format="%.1f", help="the site's own lifetime cap (its policy)"),
    "ECE": st.column_config.NumberColumn(format="%.2f", help="expected calibration error (noised bins)"),
    "label issues": st.column_config.NumberColumn(
        format="percent", help="share of validation examples the model confidently puts in another class "
                               "(Cleanlab's confident joint, noised)"),
    "clipped": st.column_config.NumberColumn(
        format="percent", help="share of per-sample gradients clipped in the last DP-SGD round"),
    "signal / noise": st.column_config.NumberColumn(
        format="%.2f", help="‖Σ clipped gradients‖ / (σ·C) per DP step: the gradient against the noise along "
                            "its own direction; below 1 a step's progress is mostly noise (noised value)"),
}


def body(snap: dict) -> None:
    ui.header(snap, "Sites")
    table = data.site_table(snap)
    if table.empty:
        st.info("No site has answered yet.")
        return
    table.insert(1, "health", [badge(snap["findings"], s, status) for s, status in zip(table["site"], table["status"],
                                                                                        strict=True)])
    budget = table["ε budget"].dropna()
    spent = st.column_config.ProgressColumn("ε spent", format="%.2f", min_value=0.0,
                                            max_value=float(budget.max()) if not budget.empty else 1.0)
    formats = {**FORMATS, "ε spent": spent}
    st.dataframe(table[list(OVERVIEW)], hide_index=True, width="stretch",
                 column_config={k: v for k, v in formats.items() if k in OVERVIEW})
    for tab, (name, columns) in zip(st.tabs(list(GROUPS)), GROUPS.items(), strict=True):
        with tab:
            st.dataframe(table[list(columns)], hide_index=True, width="stretch",
                         column_config={k: v for k, v in formats.items() if k in columns}, key=f"sites-{name}")
    ui.noised_note(snap)

    st.subheader("One site")
    site = st.selectbox("Site", table["site"].tolist(), key="site-detail")
    st.dataframe(detail(table.set_index("site").loc[site]), hide_index=True, width="stretch")

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
    """Plain text (a data grid cell has no emoji font on every machine): the status, or the worst finding with the
    round it was recorded in."""
    if status not in ("ok", "waiting"):
        return f"✗ {status}"
    mine = findings[findings["site"] == site] if not findings.empty else findings
    for sev in ("critical", "warning", "info"):
        hits = mine[mine["severity"] == sev] if not mine.empty else mine
        if not hits.empty:
            last = hits.iloc[-1]
            at = f" (round {int(last['round'])})" if pd.notna(last.get("round")) else ""
            return f"{sev}: {last['kind']}{at}"
    return "✓ ok"


ROUND_OF = {**dict.fromkeys(GROUPS["Quality"][1:-1], "metrics round"),
            **dict.fromkeys(GROUPS["Errors & DP health"][1:-1], "summary round"),
            **dict.fromkeys(GROUPS["Updates"][1:-1], "update round")}


def detail(row: pd.Series) -> pd.DataFrame:
    """Every value of one site, with the round it comes from where it is a round's value."""
    skip = {"metrics round", "summary round", "update round"}
    return pd.DataFrame([{"value": name, "is": "" if pd.isna(v) else str(round(v, 4) if isinstance(v, float) else v),
                          "round": row.get(ROUND_OF[name]) if name in ROUND_OF else None}
                         for name, v in row.items() if name not in skip])


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
