"""Step 6 · Findings: what fedlens concluded, newest first, grouped by site, each with its evidence."""

import streamlit as st

from common.rounds import FindingKind as K
from dashboard import ui
from server.findings import COLLAPSE_SHARE
from server.findings.limits import sentence

ICON = {"critical": ":red[:material/error:]", "warning": ":orange[:material/warning:]",
        "info": ":blue[:material/info:]"}
# Which page holds the charts behind each kind of finding.
EVIDENCE = {K.SITE_FAILED: "views/sites.py", K.BUDGET_EXHAUSTED: "views/privacy.py",
            K.DP_NOISE_DOMINATES: "views/privacy.py", K.MAJORITY_COLLAPSE: "views/overview.py",
            K.UPDATE_REJECTED: "views/sites.py", K.FREE_RIDER: "views/sites.py", K.DIVERGENCE: "views/sites.py",
            K.STRAGGLER: "views/sites.py", K.LABEL_NOISE: "views/errors.py", K.LABEL_FLIP: "views/errors.py",
            K.CLASS_MISSING: "views/errors.py", K.DATA_SHIFT: "views/errors.py", K.OVERFITTING: "views/sites.py",
            K.UNDERFITTING: "views/overview.py", K.GLOBAL_OVERFITTING: "views/overview.py",
            K.LABEL_SKEW: "views/errors.py", K.DOMAIN_DIFFERENCE: "views/errors.py"}


def rules_out(snap: dict) -> None:
    """Per site, what a quiet diagnosis rules out at its size and release noise (server/findings/limits.py)."""
    rows = snap["site_rounds"]
    if rows.empty or not snap["site_views"]:
        return
    evals = rows[(rows["phase"] == "evaluate") & (rows["status"] == "ok")]
    with st.expander("What a quiet page rules out, site by site (detection limits)"):
        for v in snap["site_views"]:
            mine = evals[evals["site"] == v.site]["noise_multiplier"].dropna()
            n = (v.n_train or 0) + (v.n_val or 0)
            st.markdown(f"**{v.site}**: "
                        f"{sentence(n, float(mine.iloc[-1]) if not mine.empty else None, max(len(mine), 1))}.")
        st.caption("Measured on synthetic releases through this diagnosis (`fedlens bench limits`, "
                   "docs/PERFORMANCE.md) and confirmed by simulation (`fedlens bench diagnosis`).")


def latest(snap: dict, kind: str, recorded: float) -> str:
    """Where a run-level finding stands at the newest round, when that is later than the round it was recorded in
    (a finding's sentence keeps the numbers of the round it appeared)."""
    rounds = snap["rounds"]
    if kind != K.MAJORITY_COLLAPSE or rounds.empty or "test_max_prediction_share" not in rounds:
        return ""
    last = rounds.dropna(subset=["test_max_prediction_share"]).tail(1)
    if last.empty or int(last["round"].iloc[0]) <= (recorded if recorded == recorded else 0):
        return ""
    rnd, share = int(last["round"].iloc[0]), float(last["test_max_prediction_share"].iloc[0])
    return (f"Now, at round {rnd}: {share:.0%} of the test predictions are one class"
            + (" (still collapsed)." if share >= COLLAPSE_SHARE else " (below the collapse threshold: cleared)."))


def body(snap: dict) -> None:
    ui.header(snap, "Findings")
    findings = snap["findings"]
    if findings.empty:
        st.success("No findings: every site answered, nothing looks wrong so far." if not snap["rounds"].empty
                   else "No findings yet: they appear as rounds complete.")
        rules_out(snap)
        return
    findings = findings.iloc[::-1]  # newest first
    st.caption(f"{len(findings)} finding(s). Site-level findings rest on noised summaries: read them as leads.")
    for site, group in findings.groupby(findings["site"].fillna("(whole run)"), sort=False):
        st.subheader(site)
        for f in group.itertuples():
            with st.container(border=True):
                confidence = getattr(f, "confidence", None)
                st.markdown(f"{ICON.get(f.severity, '•')} **{f.kind}** · round {ui.fmt(f.round, 'g')} · {f.severity}"
                            + (f" · confidence {confidence:.2f}" if confidence is not None and confidence == confidence
                               else ""))
                st.write(f.message)
                now = latest(snap, f.kind, f.round)
                if now:
                    st.caption(now)
                page = EVIDENCE.get(f.kind)
                if page:
                    st.page_link(page, label="see the evidence", icon=":material/arrow_forward:")
    rules_out(snap)


ui.live(body)
