"""Cross-site: the global model of every round (rows) on every site's data (columns) and the server's test set."""

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


ui.live(body)
