"""Step 6 · Errors: where does the model under-perform, and on which site? Everything here is a noised release."""

import altair as alt
import streamlit as st

from dashboard import data, ui


def body(snap: dict) -> None:
    ui.header(snap, "Errors")
    if ui.no_summaries(snap):
        return
    rnd = ui.round_picker(snap, key="errors-round")
    summaries = data.summaries(ui.store(), snap["run_id"], rnd)
    if not summaries:
        st.info(f"No site released a summary in round {rnd}.")
        return
    labels = ui.labels(snap)
    any_summary = next(iter(summaries.values()))
    std = (any_summary.get("noise_std") or {}).get("confusion", 0.0)
    st.caption(f"Round {rnd}: {len(summaries)} site(s). "
               + (f"**Noised values**: Gaussian noise of std {std:.1f} per count (secondary blocks twice that), "
                  "clamped at 0 and rescaled to each site's public split size." if std else "Exact values (DP off)."))

    st.subheader("Confusion matrices (validation, rows = given label)")
    conf = data.confusion_long(summaries, labels)
    st.altair_chart(alt.Chart(conf).mark_rect().encode(
        x=alt.X("predicted:N"), y=alt.Y("given:N"), color=alt.Color("count:Q", scale=alt.Scale(scheme="blues")),
        facet=alt.Facet("site:N", columns=4),
        tooltip=["site", "given", "predicted", alt.Tooltip("count", format=".1f")]).properties(width=160, height=130))

    left, right = st.columns(2)
    f1 = data.per_class_frame(summaries, labels, "f1")
    left.subheader("Per-class F1")
    left.altair_chart(alt.Chart(f1).mark_rect().encode(
        x="class:N", y="site:N", color=alt.Color("value:Q", scale=alt.Scale(domain=[0, 1], scheme="redyellowgreen")),
        tooltip=["site", "class", alt.Tooltip("value", format=".2f")]), width="stretch")
    right.subheader("Label issues (given → confidently)")
    issues = data.confusion_long(summaries, labels, block="label_issues")
    issues = issues[issues["given"] != issues["predicted"]].assign(pair=lambda d: d["given"] + " → " + d["predicted"])
    right.altair_chart(alt.Chart(issues).mark_rect().encode(
        x=alt.X("pair:N", title=None), y="site:N", color=alt.Color("count:Q", scale=alt.Scale(scheme="oranges")),
        tooltip=["site", "pair", alt.Tooltip("count", format=".1f")]), width="stretch")

    st.subheader("Labels and predictions across sites (share of each site)")
    hist = data.histograms_long(summaries, labels)
    st.altair_chart(alt.Chart(hist).mark_bar().encode(
        x=alt.X("class:N", title=None), xOffset="which:N", y=alt.Y("share:Q", axis=alt.Axis(format="%")),
        color="which:N", column=alt.Column("site:N"),
        tooltip=["site", "which", "class", alt.Tooltip("share", format=".0%")]).properties(width=150, height=160))

    st.subheader("Calibration (reliability: accuracy per confidence bin)")
    cal = data.calibration_long(summaries)
    diagonal = alt.Chart({"values": [{"x": 0, "y": 0}, {"x": 1, "y": 1}]}).mark_line(color="gray", strokeDash=[4, 4]) \
        .encode(x="x:Q", y="y:Q")
    points = alt.Chart(cal).mark_line(point=True).encode(
        x=alt.X("confidence:Q", scale=alt.Scale(domain=[0, 1])), y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
        color="site:N", tooltip=["site", alt.Tooltip("confidence", format=".2f"), alt.Tooltip("accuracy", format=".2f"),
                                 alt.Tooltip("count", format=".1f")])
    st.altair_chart(diagonal + points, width="stretch")
    st.caption("ECE per site: " + ", ".join(f"{s} {ui.fmt(v['calibration']['ece'], '.2f')}"
                                            for s, v in summaries.items()))


ui.live(body)
