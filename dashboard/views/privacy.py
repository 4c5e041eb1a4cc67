"""Step 6 · Privacy: how much of its ε has each site spent, on what, and how noisy are its DP steps?"""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data, ui

SMALL_MULTIPLES = 12  # sites drawn one panel each on the ε chart


def body(snap: dict) -> None:
    ui.header(snap, "Privacy")
    if not ui.dp_on(snap):
        st.info("This run has dp.enabled = false: nothing was noised and no ε was spent.")
        return
    dp, share = snap["cfg"].dp, snap["diagnostics_share"]
    budget = float(dp.target_epsilon)
    st.caption(f"This run's budget per site: ε = {budget:g} at δ = {dp.target_delta}"
               + (f"; summaries may spend {share:.0%} of it." if share is not None else ".") +
               " Sample-level DP, **add/remove one example** (one row: a person with many rows is protected as a "
               "group, with an ε that grows with their rows). No exact size leaves a site: sizes, FedAvg weights and "
               "the DP-SGD schedule follow each site's noised census.")
    eps = data.privacy_frame(snap["site_rounds"])
    if eps.empty:
        st.info("No site has spent any ε yet.")
        return
    latest = eps.sort_values("round").groupby(["site", "part"]).tail(1)
    total = latest[latest["part"] == "total"].set_index("site")["epsilon"]
    cols = st.columns(3)
    cols[0].metric("Most spent", f"{total.max():.2f} / {budget:g}", help=f"site {total.idxmax()}")
    cols[1].metric("Least remaining", f"{budget - total.max():.2f}")
    cols[2].metric("Sites over 90 % of budget", int((total >= 0.9 * budget).sum()))

    st.subheader("ε over rounds (cumulative)")
    # Colour is the part; sites are small multiples, so sites that spent the same do not hide each other (up to
    # SMALL_MULTIPLES sites; beyond, one panel with every site's lines per part). Dashed: the run's budget (for
    # total); dotted: the site's own lifetime cap (for lifetime).
    part = alt.Color("part:N", scale=alt.Scale(domain=["total", "training", "diagnostics", "lifetime"],
                                               range=["#1f5fa8", "#7fb3e6", "#e07b39", "#7d3c98"]),
                     legend=alt.Legend(symbolType="stroke", symbolStrokeWidth=3, orient="top", title=None))
    tip = ["round", "site", "part", alt.Tooltip("epsilon", format=".3f")]
    lines = alt.Chart().mark_line(point=True).encode(x=alt.X("round:O"), y=alt.Y("epsilon:Q", title="ε"),
                                                     color=part, detail="site:N", tooltip=tip)
    rule = alt.Chart().mark_rule(color="#333", strokeDash=[4, 4]).encode(y=alt.datum(budget))
    cap = alt.Chart().mark_rule(color="#7d3c98", strokeDash=[1, 3]).encode(y="max(cap):Q")
    # The cap is drawn when it is near the curves; a cap far above them (simulated sites: 100) would squash them.
    top = max(float(eps["epsilon"].max()), budget)
    near = eps["cap"].notna().any() and float(eps["cap"].max()) <= 2 * top
    layers = [lines, rule] + ([cap] if near else [])
    n_sites = eps["site"].nunique()
    if n_sites <= SMALL_MULTIPLES:
        # Up to 5 sites in one row; then rows of 4 (a short last row leaves empty axes under it).
        columns = n_sites if n_sites <= 5 else 4
        st.altair_chart(alt.layer(*layers, data=eps).properties(width=min(170, 760 // columns - 45), height=120)
                        .facet(facet=alt.Facet("site:N", title=None), columns=columns), width="content")
    else:
        layers[0] = lines.encode(opacity=alt.value(0.35))
        st.altair_chart(alt.layer(*layers, data=eps), width="stretch")
    st.caption("total = this run's releases composed (RDP), less than training + diagnostics; lifetime = everything "
               "ever released from the site's data, at its own δ. Dashed: the run's budget; "
               + ("dotted: the site's own lifetime cap" if near else
                  f"the sites' own lifetime caps (up to {float(eps['cap'].max()):g}) are far above, not drawn"
                  if eps["cap"].notna().any() else "no site reported a lifetime cap")
               + ("." if n_sites <= SMALL_MULTIPLES else f"; {n_sites} sites drawn over each other: the table below "
                                                          "has each site's numbers."))

    lifetime = data.lifetime_frame(snap["site_rounds"])
    if not lifetime.empty:
        st.subheader("Lifetime ε against each site's own cap")
        st.caption("Every release ever made from a site's data, in every run, replay and resume (the site's own "
                   "ledger, at its own δ), against the cap its policy sets, beside what this run spent (at the run's "
                   "δ). A site refuses whatever would take it past its cap, whatever the run asks.")
        st.dataframe(lifetime, hide_index=True, width="stretch", column_config={
            "lifetime ε": st.column_config.ProgressColumn(format="%.2f", min_value=0.0,
                                                          max_value=float(lifetime["cap"].max() or 1.0)),
            **{c: st.column_config.NumberColumn(format="%.2f") for c in ("this run", "left to cap", "cap")}})

    rows = snap["site_rounds"]
    train = rows[(rows["phase"] == "train") & (rows["status"] == "ok")]
    ev = rows[(rows["phase"] == "evaluate") & (rows["status"] == "ok")]
    left, right = st.columns(2)
    if "clip_fraction" in ev and ev["clip_fraction"].notna().any():
        left.subheader("Clipped per-sample gradients")
        left.altair_chart(alt.Chart(ev.dropna(subset=["clip_fraction"])).mark_line(point=True).encode(
            x="round:O", y=alt.Y("clip_fraction:Q", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
            color="site:N", tooltip=["round", "site", alt.Tooltip("clip_fraction", format=".0%")]), width="stretch")
    if "signal_to_noise" in ev and ev["signal_to_noise"].notna().any():
        right.subheader("Signal / noise per DP step")
        snr = ev.dropna(subset=["signal_to_noise"]).assign(signal_to_noise=lambda f: f["signal_to_noise"].clip(lower=1e-2))
        one = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(color="grey", strokeDash=[4, 4]).encode(y="y:Q")
        right.altair_chart(alt.Chart(snr).mark_line(point=True).encode(
            x="round:O", y=alt.Y("signal_to_noise:Q", scale=alt.Scale(type="log"), title="‖Σ clipped‖ / (σ·C)"),
            color="site:N", tooltip=["round", "site", alt.Tooltip("signal_to_noise", format=".2f")]) + one,
            width="stretch")
        missing = len(ev) - int(ev["signal_to_noise"].notna().sum())
        failed = int(((rows["phase"] == "evaluate") & (rows["status"] != "ok")).sum())
        right.caption("The sum of clipped gradients against the noise along its own direction (std σ·C): below "
                      "the dashed line a step's progress is mostly noise. The rest of the noise moves the weights "
                      "sideways. Read from each site's noised summary, so it is noisy itself."
                      + (f" {missing + failed} of {len(ev) + failed} site-rounds have no reading: "
                         f"{failed} failed or refused their evaluation, {missing} released no DP-health block (the "
                         "site did not train that round, or its summary was withheld)." if missing + failed else ""))

    st.subheader("Per site")
    wide = latest.pivot(index="site", columns="part", values="epsilon")
    sigma_train = train.groupby("site")["noise_multiplier"].last()
    sigma_summary = ev.groupby("site")["noise_multiplier"].last()
    per_site = pd.DataFrame({
        "site": wide.index,
        "ε spent": wide.get("total"),
        "ε training": wide.get("training"),
        "ε diagnostics": wide.get("diagnostics"),
        "remaining": budget - wide.get("total"),
        "DP-SGD σ": sigma_train.reindex(wide.index),
        "summary σ": sigma_summary.reindex(wide.index),
    })
    st.dataframe(per_site, hide_index=True, width="stretch", column_config={
        "ε spent": st.column_config.ProgressColumn(format="%.2f", min_value=0.0, max_value=budget or 1.0),
        **{c: st.column_config.NumberColumn(format="%.3f") for c in ("ε training", "ε diagnostics", "remaining",
                                                                      "DP-SGD σ", "summary σ")}})
    ledger = snap.get("ledger")
    if ledger is not None and not ledger.empty:
        with st.expander("Ledger: every spend, as the sites reported it"):
            st.dataframe(ledger, hide_index=True, width="stretch")


ui.live(body)
