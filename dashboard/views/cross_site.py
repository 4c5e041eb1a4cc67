"""Step 6 · Cross-site: the global model of every round (rows) on every site's data (columns) and the server's test set; with
server.cross-site-eval, also each site's local model on every site's data (NVIDIA FLARE's matrix)."""

import altair as alt
import streamlit as st

from dashboard import data, ui

METRICS = {"accuracy": "accuracy", "macro-F1": "macro_f1", "loss": "loss"}


def body(snap: dict) -> None:
    ui.header(snap, "Cross-site")
    label = st.radio("Metric", list(METRICS), horizontal=True, key="cross-metric")
    cfg = snap["cfg"]
    k = len(cfg.data.labels)
    frame = data.cross_site(snap["site_rounds"], snap["rounds"], METRICS[label], num_classes=k, dp=cfg.dp.enabled)
    if frame.empty:
        st.info("No evaluation has been committed yet.")
        return
    low_is_good = label == "loss"
    # As on the Overview: a noised cell whose ±2 std spans more than half the axis is noise, and is not drawn.
    noisy = frame[4 * frame["std"].fillna(0) > 0.5]
    frame = frame.drop(noisy.index)
    if frame.empty:
        st.info(f"Too noisy at these sites' sizes and ε to draw: each site cell's {label} is ±"
                f"{2 * noisy['std'].min():.2f} or more at 2 std, and there is no test set column.")
        local_models(snap)
        return
    # The colour starts where a model stops being trivial: for accuracy the majority-class share (a collapsed
    # model, always the majority, reads red, not green), for macro-F1 1/K; the loss's own range.
    floor = (data.majority_share(data.summaries(ui.store(), snap["run_id"])) if label == "accuracy"
             else 1.0 / k if label == "macro-F1" and k else None)
    scale = (alt.Scale(scheme="redyellowgreen", domain=[floor, 1.0], clamp=True) if floor is not None
             else alt.Scale(scheme="redyellowgreen", reverse=low_is_good))
    st.altair_chart(alt.Chart(frame).mark_rect().encode(
        x=alt.X("data:N", title="evaluated on", sort=None),
        y=alt.Y("model:N", title="global model of", sort=alt.SortField("round")),
        color=alt.Color("value:Q", title=label, scale=scale),
        tooltip=["model", "data", alt.Tooltip("value", format=".3f"),
                 alt.Tooltip("std", format=".3f", title="noise std")]), width="stretch")
    notes = ["A column that stays worse than the others while the test set improves is a site whose data the shared "
             "model does not fit (shifted data, a missing class or noisy labels). Site columns are noised validation "
             "summaries; the server test set column is exact."]
    if floor is not None:
        notes.append(f"Red at or below {floor:.2f}: " + ("the share of the most common class (the sites' noised "
                                                          "class counts), what always predicting it scores."
                                                          if label == "accuracy" else "1/K, chance."))
    stds = frame["std"].dropna()
    stds = stds[stds > 0]
    if not stds.empty:
        spread = (f"±{2 * stds.min():.2f}" if 2 * stds.min() == 2 * stds.max() or f"{2 * stds.min():.2f}" ==
                  f"{2 * stds.max():.2f}" else f"±{2 * stds.min():.2f} to ±{2 * stds.max():.2f}")
        notes.append(f"A site cell's noise is {spread} at 2 std (its size and σ): a swing within that between rounds "
                     "is noise, not the site.")
    if not noisy.empty:
        notes.append(f"Not drawn, too noisy at their sites' sizes and ε: {len(noisy)} site cell(s) (±"
                     f"{2 * noisy['std'].min():.2f} or more at 2 std).")
    st.caption(" ".join(notes))
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
