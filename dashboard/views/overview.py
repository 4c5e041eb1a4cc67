"""Step 6 · Overview: is the run healthy? KPIs, the collapse warning, and the global curves per round."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data, ui
from server.findings import COLLAPSE_SHARE  # the findings engine's threshold: the warning and the finding agree


def body(snap: dict) -> None:
    ui.header(snap, "Overview")
    rounds = snap["rounds"]
    done, planned = len(rounds), int(snap["rounds_planned"])
    last = rounds.iloc[-1] if done else None
    prev = rounds.iloc[-2] if done > 1 else None
    table = data.site_table(snap)

    cols = st.columns(6)
    cols[0].metric("Round", f"{done} / {planned}")
    cols[0].progress(done / planned if planned else 0.0)

    def kpi(col, label: str, key: str) -> None:  # noqa: ANN001
        if last is None or pd.isna(last.get(key)):
            col.metric(label, "—")
            return
        delta = None if prev is None or pd.isna(prev.get(key)) else f"{last[key] - prev[key]:+.3f}"
        col.metric(label, f"{last[key]:.3f}", delta)

    has_test = bool(done) and "test_accuracy" in rounds and rounds["test_accuracy"].notna().any()
    kpi(cols[1], "Accuracy (test set)" if has_test else "Accuracy (sites, noised)",
        "test_accuracy" if has_test else "accuracy")
    kpi(cols[2], "Macro-F1 (test set)" if has_test else "Macro-F1 (sites, noised)",
        "test_macro_f1" if has_test else "macro_f1")
    name, detail = worst_site(table)
    cols[3].metric("Worst site", name, detail, delta_color="off", delta_arrow="off")
    eps = table["ε spent"].dropna() if not table.empty else pd.Series(dtype=float)
    budget = table["ε budget"].dropna() if not table.empty else pd.Series(dtype=float)
    cols[4].metric("Max ε spent / budget", f"{eps.max():.2f} / {budget.max():g}" if not eps.empty and not budget.empty
                   else "no DP" if not ui.dp_on(snap) else "—")
    findings = snap["findings"]
    failing = table[table["status"] != "ok"] if not table.empty else table
    # Info-level notes (label skew between sites) explain the run; they are not problems to act on.
    problems = findings[findings["severity"] != "info"] if not findings.empty else findings
    cols[5].metric("Open findings", len(problems), help=f"sites failing now: {len(failing)} / {len(table)}; "
                                                        f"notes: {len(findings) - len(problems)}")

    if done == 0:
        st.info("Round 1 is in progress: results appear here as soon as it is committed.")
    if has_test and last is not None and pd.notna(last.get("test_max_prediction_share")) \
            and last["test_max_prediction_share"] >= COLLAPSE_SHARE:
        st.warning(f"The global model predicts one class for {last['test_max_prediction_share']:.0%} of the test "
                   "set: it has collapsed onto the majority class (accuracy is then the class share, macro-F1 ≈ 1/K).")
    if not failing.empty:
        st.warning("Sites failing in their latest round: " + ", ".join(
            f"{r.site} ({r.status}: {r.reason})" for r in failing.itertuples()))

    curves = data.global_curves(rounds)
    if curves.empty:
        return
    st.subheader("Global model per round")
    left, right = st.columns(2)
    quality = curves[curves["metric"] != "loss"]
    left.altair_chart(alt.Chart(quality, title="accuracy and macro-F1").mark_line(point=True).encode(
        x=alt.X("round:O"), y=alt.Y("value:Q", title="score", scale=alt.Scale(domain=[0, 1])),
        color="metric:N", strokeDash="source:N",
        tooltip=["round", "metric", "source", alt.Tooltip("value", format=".3f")]), width="stretch")
    right.altair_chart(alt.Chart(curves[curves["metric"] == "loss"], title="loss").mark_line(point=True).encode(
        x=alt.X("round:O"), y=alt.Y("value:Q", title="loss"), color="source:N",
        tooltip=["round", "source", alt.Tooltip("value", format=".3f")]), width="stretch")
    ui.noised_note(snap)


def worst_site(table: pd.DataFrame) -> tuple[str, str | None]:
    """A failing site first; else the lowest noised macro-F1 (a hint, not a verdict, on small sites)."""
    if table.empty:
        return "—", None
    failing = table[table["status"] != "ok"]
    if not failing.empty:
        return failing.iloc[0]["site"], failing.iloc[0]["status"]
    scored = table.dropna(subset=["macro-F1"])
    if scored.empty:
        return "—", None
    row = scored.sort_values("macro-F1").iloc[0]
    return row["site"], f"macro-F1 {row['macro-F1']:.2f} (noised)"


ui.live(body)
