"""Step 6, the dashboard: pick a run in the sidebar; each page answers one question about it, live.

Run as:  fedlens dashboard --store runs/fedlens.db   (or: streamlit run dashboard/streamlit_app.py -- --store PATH)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` does not put the project on the path
from dashboard import data  # noqa: E402

VIEWS = Path(__file__).resolve().parent / "views"


def store_path() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default=os.environ.get("FEDLENS_STORE", "runs/fedlens.db"))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return str(Path(args.store).resolve())


st.set_page_config(page_title="fedlens", layout="wide")
st.session_state["store"] = STORE = store_path()
st.sidebar.title("fedlens")
runs = data.runs(STORE)
if not runs.empty:
    labels = {r.run_id: f"{r.run_id} · {r.status} · {r.rounds_completed}/{r.rounds_planned} rounds"
              for r in runs.itertuples()}
    wanted = st.query_params.get("run")
    if wanted in labels and "run_id" not in st.session_state:
        st.session_state["run_id"] = wanted
    elif wanted and wanted not in labels:
        st.sidebar.warning(f"Run {wanted!r} (from the address) is not in this store; showing the newest run.")
    if st.session_state.get("run_id") not in labels:
        st.session_state["run_id"] = next(iter(labels))  # the newest
    # The run id alone in the box (the sidebar is ~240 px: a longer label was cut); its state just below.
    st.sidebar.selectbox("Run", list(labels), key="run_id")
    st.sidebar.caption(labels[st.session_state["run_id"]].split(" · ", 1)[1])
st.sidebar.caption(f"store: `{STORE}`")

pages = [
    st.Page(VIEWS / "overview.py", title="Overview", icon=":material/monitoring:", default=True),
    st.Page(VIEWS / "sites.py", title="Sites", icon=":material/lan:"),
    st.Page(VIEWS / "findings.py", title="Findings", icon=":material/troubleshoot:"),
    st.Page(VIEWS / "errors.py", title="Errors", icon=":material/grid_on:"),
    st.Page(VIEWS / "cross_site.py", title="Cross-site", icon=":material/compare_arrows:"),
    st.Page(VIEWS / "privacy.py", title="Privacy", icon=":material/lock:"),
    st.Page(VIEWS / "whatif.py", title="What-if", icon=":material/alt_route:"),
    st.Page(VIEWS / "runs.py", title="Runs", icon=":material/list:"),
]
st.navigation(pages).run()
