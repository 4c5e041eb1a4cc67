"""Step 6 · Cross-site: the global model of every round (rows) on every site's data (columns) and the server's test set; with
server.cross-site-eval, also each site's local model on every site's data (NVIDIA FLARE's matrix)."""

import altair as alt
import streamlit as st

from dashboard import data, ui

METRICS = {"accuracy": "accuracy", "macro-F1": "macro_f1", "loss": "loss"}


def body(snap: dict) -> None:
    ui.header(snap, "Cross-site")
    label = st.radio("Metric", list(METRICS), horizontal=True, key="cross-metric")
    frame = data.cross_site(snap["site_rounds"], snap["rounds"], METRICS[label])
    if frame.empty:
        st.info("No evaluation has been committed yet.")
        return
    low_is_good = label == "loss"
    st.altair_chart(alt.Chart(frame).mark_rect().encode(
        x=alt.X("data:N", title="evaluated on", sort=None),
        y=alt.Y("model:N", title="global model of", sort=alt.SortField("round")),
        color=alt.Color("value:Q", title=label,
                        scale=alt.Scale(scheme="redyellowgreen", reverse=low_is_good)),
        tooltip=["model", "data", alt.Tooltip("value", format=".3f")]), width="stretch")
    st.caption("A column that stays worse than the others while the test set improves is a site whose data the "
               "shared model does not fit (shifted data, a missing class or noisy labels). Site columns are noised "
               "validation summaries; the server test set column is exact.")
    local_models(snap)


def local_models(snap: dict) -> None:
    rnd = int(snap["rounds"]["round"].max()) if not snap["rounds"].empty else None
    frame, std = data.local_cross_site(data.summaries(ui.store(), snap["run_id"], rnd) if rnd else {})
    st.subheader("Local models × sites")
    if frame.empty:
        st.caption("Off for this run. With `server.cross-site-eval = true` every site scores each site's local model "
                   "on its validation split and releases the counts in its noised summary (Δ stays 2: the validation side's share reaches the train side's).")
        return
    st.altair_chart(alt.Chart(frame).mark_rect().encode(
        x=alt.X("data:N", title="evaluated on"), y=alt.Y("model:N", title="model"),
        color=alt.Color("value:Q", title="accuracy", scale=alt.Scale(scheme="redyellowgreen", domain=[0, 1])),
        tooltip=["model", "data", alt.Tooltip("value", format=".2f")]), width="stretch")
    st.caption(f"Round {rnd}, noised: each count carries noise of std {std:.1f} examples (accuracy clipped to 0–1). "
               "A row worse everywhere is a local model that learned something wrong (noisy or flipped labels, "
               "divergence); a column worse for every model is a site whose data differ. Compare with the noise: "
               "on sites of a few dozen validation examples most of the spread is noise.")


ui.live(body)
