"""Step 6: what every dashboard page shares: the store and run the sidebar picked, live refresh, and the empty states."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from dashboard import data

REFRESH_SECONDS = 2  # while a run is live


def store() -> str:
    return st.session_state["store"]


def labels(snap: dict) -> list[str]:
    return list(snap["cfg"].data.labels)


def dp_on(snap: dict) -> bool:
    return snap["cfg"].dp.enabled


def live(body: Callable[[dict], None]) -> None:
    """Run a page body on the picked run's snapshot; while the run is live, re-run it every 2 s (a fragment: only
    the page body refreshes, without flicker or a full reload)."""
    runs = data.runs(store())
    if runs.empty:
        st.info(f"No runs in {store()} yet. Start one with `fedlens simulate --scenario simulations/smoke.toml`; "
                "this page picks it up by itself.")
        return
    run_id = st.session_state.get("run_id")
    if run_id not in set(runs["run_id"]):
        st.error(f"Run {run_id!r} is not in {store()}. Pick one in the sidebar.")
        return
    status = runs.set_index("run_id").loc[run_id, "status"]

    @st.fragment(run_every=REFRESH_SECONDS if status == "running" else None)
    def view() -> None:
        try:
            snap = data.run(store(), run_id)
        except LookupError as e:
            st.error(str(e))
            return
        body(snap)

    view()


def header(snap: dict, title: str) -> None:
    st.title(title)
    st.caption(f"run `{snap['run_id']}` · {snap['scenario']} · {snap['model']} · status **{snap['status']}**")
    if snap["status"] == "failed":
        st.error(f"The run failed: {snap['error']}. Rounds committed before the failure are shown.")


def noised_note(snap: dict) -> None:
    if dp_on(snap):
        st.caption("Per-site numbers come from each site's noised summary (Gaussian noise on counts, charged to its "
                   "ε): on small validation splits they are noisy by design. Compare sites and trends, not single "
                   "values.")


def no_summaries(snap: dict) -> bool:
    """True (after saying so) when no site has released a summary yet."""
    rows = snap["site_rounds"]
    if rows.empty or not rows["has_summary"].any():
        st.info("No site has released an error summary yet: round 1 is still running, every site failed, or "
                "dp.diagnostics-share is 0.")
        return True
    return False


def round_picker(snap: dict, key: str) -> int | None:
    rounds = snap["rounds"]
    if rounds.empty:
        return None
    choices = [int(r) for r in rounds["round"]]
    return st.select_slider("Round", choices, value=choices[-1], key=key) if len(choices) > 1 else choices[0]


def fmt(v, spec: str = ".3f") -> str:  # noqa: ANN001
    return "—" if v is None or (isinstance(v, float) and pd.isna(v)) else format(v, spec)
