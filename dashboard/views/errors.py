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
    conf = _dark(data.confusion_long(summaries, labels), "count")
    rect = alt.Chart().mark_rect().encode(
        x=alt.X("predicted:N"), y=alt.Y("given:N"), color=alt.Color("count:Q", scale=alt.Scale(scheme="blues")),
        tooltip=["site", "given", "predicted", alt.Tooltip("count", format=".1f")])
    st.altair_chart(alt.layer(*_annotated(rect, "count", ".0f"), data=conf).properties(width=160, height=130)
                    .facet(facet=alt.Facet("site:N", title=None), columns=4))
    if std:
        st.caption(f"Each cell is a noised count (± {std:.1f} at one std): read differences of a few counts as noise.")

    left, right = st.columns(2)
    f1 = data.per_class_frame(summaries, labels, "f1").assign(dark=False)  # red-yellow-green: black reads on all
    left.subheader("Per-class F1")
    left.altair_chart(alt.layer(*_annotated(alt.Chart().mark_rect().encode(
        x="class:N", y="site:N", color=alt.Color("value:Q", scale=alt.Scale(domain=[0, 1], scheme="redyellowgreen")),
        tooltip=["site", "class", alt.Tooltip("value", format=".2f")]), "value", ".2f"), data=f1), width="stretch")
    right.subheader("Label issues (given → confidently)")
    issues = data.confusion_long(summaries, labels, block="label_issues")
    issues = _dark(issues[issues["given"] != issues["predicted"]].assign(
        pair=lambda d: d["given"] + " → " + d["predicted"]), "count")
    right.altair_chart(alt.layer(*_annotated(alt.Chart().mark_rect().encode(
        x=alt.X("pair:N", title=None, axis=alt.Axis(labelAngle=-40, labelLimit=220)), y="site:N",
        color=alt.Color("count:Q", scale=alt.Scale(scheme="oranges")),
        tooltip=["site", "pair", alt.Tooltip("count", format=".1f")]), "count", ".0f"), data=issues),
        width="stretch")

    st.subheader("Labels and predictions across sites (share of each site)")
    hist = data.histograms_long(summaries, labels)
    # Rows of 4 sites (5 panels of 150 px ran past a 1280 px window).
    st.altair_chart(alt.Chart(hist).mark_bar().encode(
        x=alt.X("class:N", title=None), xOffset="which:N", y=alt.Y("share:Q", axis=alt.Axis(format="%")),
        color=alt.Color("which:N", legend=alt.Legend(orient="top", title=None)),
        tooltip=["site", "which", "class", alt.Tooltip("share", format=".0%"),
                 alt.Tooltip("std", format=".0%", title="noise std")]).properties(width=150, height=140)
        .facet(facet=alt.Facet("site:N", title=None), columns=4))
    if hist["std"].max() > 0:
        st.caption(f"Each share is noised: ±{2 * hist['std'].min():.0%} to ±{2 * hist['std'].max():.0%} at 2 std "
                   "(the site's size and σ). A site's predicted shares that differ from the test set's (exact, "
                   "Overview) by less than that differ by noise, not by the model.")

    st.subheader("Calibration (reliability: accuracy per confidence bin)")
    cal = data.calibration_long(summaries)
    cal_std = (any_summary.get("noise_std") or {}).get("calibration", 0.0)
    # A bin's accuracy is (noised correct) / (noised count): with fewer than MIN_BIN_NOISE × std examples its ±1 std
    # spans a quarter of the axis or more, and the line would be a zig-zag of noise. Those bins are not drawn.
    shown = cal[cal["count"] >= MIN_BIN_NOISE * cal_std] if cal_std else cal
    diagonal = alt.Chart(alt.Data(values=[{"x": 0, "y": 0}, {"x": 1, "y": 1}])).mark_line(
        color="gray", strokeDash=[4, 4]).encode(x=alt.X("x:Q", title="confidence"), y=alt.Y("y:Q", title="accuracy"))
    if shown.empty:
        st.info("Too noisy at these sites' sizes and ε: no confidence bin holds enough examples to read its accuracy.")
    else:
        points = alt.Chart(shown).mark_line(point=True).encode(
            x=alt.X("confidence:Q", scale=alt.Scale(domain=[0, 1]), title="confidence"),
            y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy"),
            color="site:N", tooltip=["site", alt.Tooltip("confidence", format=".2f"),
                                     alt.Tooltip("accuracy", format=".2f"), alt.Tooltip("count", format=".1f")])
        st.altair_chart(diagonal + points, width="stretch")
    st.caption("ECE per site: " + ", ".join(f"{s} {ui.fmt(v['calibration']['ece'], '.2f')}"
                                            for s, v in summaries.items())
               + (f". Bins with fewer than {MIN_BIN_NOISE * cal_std:.0f} noised examples are left out "
                  f"({len(cal) - len(shown)} of {len(cal)}): their accuracy is noise." if len(shown) < len(cal) else ""))


MIN_BIN_NOISE = 4  # a bin is drawn when its count is at least this many noise stds (accuracy ± ≤ 0.25)


def _dark(frame, field: str):  # noqa: ANN001, ANN202
    """`dark`: the cells in the top 40 % of the frame's range, where a black number would not read."""
    hi = frame[field].max() if not frame.empty else 0.0
    return frame.assign(dark=frame[field] > 0.6 * hi if hi and hi > 0 else False)


def _annotated(rect: alt.Chart, field: str, fmt: str) -> list[alt.Chart]:
    """A heatmap and the value written on each of its cells (white on the dark ones)."""
    return [rect, rect.mark_text(fontSize=11).encode(
        text=alt.Text(f"{field}:Q", format=fmt),
        color=alt.condition("datum.dark", alt.value("white"), alt.value("black")))]


ui.live(body)
