"""Step 6 · What-if: re-aggregate a round without some sites and compare on the server's test set (same code as
`fedlens whatif`). It uses the updates the server kept; no site is contacted and no ε is spent."""

import pandas as pd
import streamlit as st

from common.checkpoints import Checkpoints
from common.rounds import LEFT_OUT
from dashboard import ui


@st.cache_data(show_spinner=False, max_entries=32)
def reaggregate(store: str, run_id: str, round_: int, exclude: tuple[str, ...]) -> dict:
    from server.whatif import reaggregate as run

    return run(store, run_id, round_, list(exclude))


def body(snap: dict) -> None:
    ui.header(snap, "What-if")
    kept = [r for r in Checkpoints(ui.store(), snap["run_id"], keep=0).rounds() if r > 0]
    if not kept:
        st.info("This run kept no per-round updates (server.keep-rounds = 0, or round 1 is still running): "
                "there is nothing to re-aggregate.")
        return
    rnd = st.select_slider("Round", kept, value=kept[-1], key="whatif-round") if len(kept) > 1 else kept[0]
    rows = snap["site_rounds"]
    # A site whose update was left out of the average (an outlier norm) contributed nothing to leave out.
    contributors = sorted(rows[(rows["round"] == rnd) & (rows["phase"] == "train") & (rows["status"] == "ok")
                               & rows["update_norm"].notna()
                               & ~rows["reason"].fillna("").str.startswith(LEFT_OUT)]["site"]) if not rows.empty else []
    exclude = st.multiselect("Leave out", contributors, key="whatif-exclude",
                             help="sites whose accepted update of this round is dropped before averaging")
    if not exclude:
        st.caption(f"Round {rnd} averaged {len(contributors)} site(s): pick the ones to leave out.")
        return
    try:
        with st.spinner("Re-aggregating and evaluating both models on the server's test set…"):
            out = reaggregate(ui.store(), snap["run_id"], rnd, tuple(sorted(exclude)))
    except (LookupError, ValueError) as e:
        st.error(str(e))
        return
    from server.whatif import describe  # light: the model is built only when a re-aggregation evaluates

    st.write(describe(out))
    if out["actual"] is None:
        st.info(out.get("note", "No test set to compare on."))
        return
    cols = st.columns(3)
    for col, key, label in zip(cols, ("accuracy", "macro_f1", "loss"), ("Test accuracy", "Test macro-F1", "Test loss"),
                               strict=True):
        col.metric(label, f"{out['without'][key]:.3f}", f"{out['change'][key]:+.3f} vs actual",
                   delta_color="inverse" if key == "loss" else "normal")
    st.dataframe(pd.DataFrame([{"model": "actual round", **out["actual"]}, {"model": "without", **out["without"]}]),
                 hide_index=True, width="stretch")
    st.caption(f"Same as: `fedlens whatif --store {ui.store()} --run {snap['run_id']} --round {rnd} "
               f"--exclude {','.join(out['excluded'])}`")


ui.live(body)
