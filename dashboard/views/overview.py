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
    bands = data.noise_bands(snap)
    curves = curves.merge(bands, on=["round", "metric", "source"], how="left")
    curves["low"], curves["high"] = curves["value"] - 2 * curves["std"], curves["value"] + 2 * curves["std"]
    # A noised value whose ±2 std spans more than half its range says nothing: not drawn, and the caption says so.
    span = curves["metric"].map({"accuracy": 1.0, "macro-F1": 1.0}).fillna(float(snap["cfg"].dp.loss_clip))
    hidden = curves[4 * curves["std"].fillna(0) > span / 2]
    curves = curves.drop(hidden.index)
    x = alt.X("round:O")
    # One colour per series (metric · source), named in the legend as a line; the dash repeats the source; the band
    # takes the series' colour.
    curves["series"] = curves["metric"] + " · " + curves["source"].str.replace(" (noised)", "", regex=False)
    tip = ["round", "metric", "source", alt.Tooltip("value", format=".3f"), alt.Tooltip("std", format=".3f",
                                                                                        title="noise std")]

    def chart(frame: pd.DataFrame, y_title: str, domain: list[float] | None) -> list[alt.Chart]:
        series = sorted(frame["series"].unique())
        # The band and the line share one colour scale and one legend (a legend switched off in either layer
        # would switch off the merged one).
        color = alt.Color("series:N", scale=alt.Scale(domain=series),
                          legend=alt.Legend(title=None, symbolType="stroke", symbolStrokeWidth=3, symbolOpacity=1,
                                            labelLimit=180))
        return [alt.Chart(frame).mark_area(opacity=0.18).encode(x=x, y="low:Q", y2="high:Q", color=color)
                .transform_filter("isValid(datum.std)"),
                alt.Chart(frame).mark_line(point=True).encode(
                    x=x, y=alt.Y("value:Q", title=y_title, scale=alt.Scale(domain=domain) if domain else alt.Undefined),
                    color=color, strokeDash=alt.StrokeDash("source:N", legend=None), tooltip=tip)]

    quality = curves[curves["metric"] != "loss"]
    majority = data.majority_share(data.summaries(ui.store(), snap["run_id"]))
    if quality.empty:
        left.info("No accuracy to draw yet.")
    else:
        layers = chart(quality, "score", [0, 1])
        if majority is not None:
            layers.append(alt.Chart(pd.DataFrame({"share": [majority], "what": ["majority class"]})).mark_rule(
                strokeDash=[2, 2], color="gray").encode(y="share:Q", tooltip=[alt.Tooltip("share", format=".3f"),
                                                                              "what"]))
        left.altair_chart(alt.layer(*layers, title="accuracy and macro-F1"), width="stretch")
    loss = curves[curves["metric"] == "loss"]
    if loss.empty:
        right.info("No loss recorded yet.")
    else:
        right.altair_chart(alt.layer(*chart(loss, "loss", None), title="loss"), width="stretch")
    notes = []
    if not bands.empty:
        notes.append("Shaded: ±2 noise std of the sites' noised global values (known from each release's σ and the "
                     "sites' sizes); a dip inside the band is noise, not the model.")
    if majority is not None:
        notes.append(f"Dotted: a model that always predicts the most common class scores {majority:.3f} on the "
                     "sites' validation splits (their noised class counts).")
    if not hidden.empty:
        notes.append("Too noisy at these sites' sizes and ε to draw: " + "; ".join(
            f"{m} from {src.split(' (')[0]} (±{2 * g['std'].max():.2f} at 2 std; rounds "
            f"{', '.join(map(str, sorted(g['round'].astype(int))))})" for (m, src), g in
            hidden.groupby(["metric", "source"])) + ".")
    if notes:
        st.caption(" ".join(notes))
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
