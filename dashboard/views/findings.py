"""Findings: what fedlens concluded, newest first, grouped by site, each with its evidence."""

import streamlit as st

from dashboard import ui

ICON = {"critical": ":red[:material/error:]", "warning": ":orange[:material/warning:]",
        "info": ":blue[:material/info:]"}
# Which page holds the charts behind each kind of finding.
EVIDENCE = {"site-failed": "views/sites.py", "budget_exhausted": "views/privacy.py",
            "dp_noise_dominates": "views/privacy.py", "majority_collapse": "views/overview.py",
            "update-rejected": "views/sites.py", "free_rider": "views/sites.py", "divergence": "views/sites.py",
            "dropout": "views/sites.py", "label_noise": "views/errors.py", "label_flip": "views/errors.py",
            "class_missing": "views/errors.py", "data_shift": "views/errors.py", "overfitting": "views/sites.py",
            "underfitting": "views/overview.py", "global_overfitting": "views/overview.py"}


def body(snap: dict) -> None:
    ui.header(snap, "Findings")
    findings = snap["findings"]
    if findings.empty:
        st.success("No findings: every site answered, nothing looks wrong so far." if not snap["rounds"].empty
                   else "No findings yet: they appear as rounds complete.")
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
                page = EVIDENCE.get(f.kind)
                if page:
                    st.page_link(page, label="see the evidence", icon=":material/arrow_forward:")


ui.live(body)
