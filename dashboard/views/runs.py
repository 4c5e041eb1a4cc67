"""Step 6 · Runs: every run in the store; pick one (sidebar) or compare two."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data, ui

st.title("Runs")
runs = data.runs(ui.store())
if runs.empty:
    st.info(f"No runs in {ui.store()} yet. Start one with `fedlens simulate --scenario simulations/smoke.toml`.")
    st.stop()
shown = runs.assign(status=runs["status"].map({"running": "live"}).fillna(runs["status"]),
                    rounds=runs["rounds_completed"].astype(str) + " / " + runs["rounds_planned"].astype(str))
# A fix & replay run names the run and round it started from (fedlens replay).
shown["replay of"] = [f"{p} after round {int(r)}" if isinstance(p, str) and p else ""
                      for p, r in zip(shown["parent_run"], shown["parent_round"].fillna(0), strict=True)]
st.dataframe(shown[["run_id", "status", "scenario", "model", "sites", "rounds", "replay of", "started"]],
             hide_index=True, width="stretch")

st.subheader("Compare runs")
picked = st.multiselect("Two runs to compare", list(runs["run_id"]), max_selections=2, key="compare")
if len(picked) < 2:
    st.caption("Pick two runs to overlay their global curves.")
    st.stop()
frames, kpis = [], []
for run_id in picked:
    snap = data.run(ui.store(), run_id)
    curves = data.global_curves(snap["rounds"]).assign(run=run_id)
    frames.append(curves)
    last = snap["rounds"].iloc[-1] if not snap["rounds"].empty else {}
    kpis.append({"run": run_id, "scenario": snap["scenario"], "status": snap["status"],
                 "rounds": len(snap["rounds"]), "test accuracy": last.get("test_accuracy"),
                 "test macro-F1": last.get("test_macro_f1"), "DP": ui.dp_on(snap),
                 "ε budget": snap["cfg"].dp.target_epsilon if ui.dp_on(snap) else None})
st.dataframe(pd.DataFrame(kpis), hide_index=True, width="stretch")
both = pd.concat(frames, ignore_index=True)
test = both[both["source"] == "server test set"]
if not test.empty:
    st.altair_chart(alt.Chart(test).mark_line(point=True).encode(
        x="round:O", y="value:Q", color="run:N", strokeDash="metric:N",
        tooltip=["run", "round", "metric", alt.Tooltip("value", format=".3f")]), width="stretch")
