"""Step 4 → findings observed directly in a round: failed, refused and rejected sites, majority collapse, DP noise dominating.

Each is read from the round alone (the sites' replies and the server's test metrics); the tracker records it in the
round it appears.
"""

from __future__ import annotations

import statistics

from common.rounds import Finding, RoundRecord
from common.rounds import FindingKind as K


def observed(rec: RoundRecord) -> dict[tuple[str | None, str], Finding]:
    """Every finding observed directly in this round, keyed by (site, kind)."""
    return {**site_status(rec), **majority_collapse(rec), **dp_noise_dominates(rec)}


def site_status(rec: RoundRecord) -> dict[tuple[str | None, str], Finding]:
    """Sites that failed, sent an update the server did not average, or refused by their own privacy policy."""
    out: dict[tuple[str | None, str], Finding] = {}
    for row in rec.sites:
        if row.status == "failed" and row.reason.startswith("update rejected"):
            out[(row.site, K.UPDATE_REJECTED)] = Finding(
                K.UPDATE_REJECTED, "critical", f"{row.site}'s update was not averaged in round {rec.round}: "
                f"{row.reason.removeprefix('update rejected: ')}", row.site)
        elif row.status == "failed":
            out[(row.site, K.SITE_FAILED)] = Finding(
                K.SITE_FAILED, "critical", f"{row.site} failed in {row.phase} in round {rec.round}: {row.reason}",
                row.site)
        elif row.status == "refused":
            out[(row.site, K.BUDGET_EXHAUSTED)] = Finding(
                K.BUDGET_EXHAUSTED, "warning", f"{row.site} refused to {row.phase} in round {rec.round} to stay within "
                f"its privacy budget: {row.reason}", row.site)
    return out


COLLAPSE_SHARE = 0.9  # one class taking this share of the test predictions


def majority_collapse(rec: RoundRecord) -> dict[tuple[str | None, str], Finding]:
    """The global model predicts one class for nearly all of the server's test set."""
    out: dict[tuple[str | None, str], Finding] = {}
    share = rec.metrics.get("test_max_prediction_share")
    if share is not None and share >= COLLAPSE_SHARE:
        f1 = rec.metrics.get("test_macro_f1")
        out[(None, K.MAJORITY_COLLAPSE)] = Finding(
            K.MAJORITY_COLLAPSE, "warning", f"the global model predicts one class for {share:.0%} of the server's test set "
            f"(round {rec.round}): it has collapsed onto the majority class"
            + (f"; macro-F1 {f1:.2f}" if f1 is not None else ""), None)
    return out


# A round's signal-to-noise √T · ‖Σ clipped gradients‖ / (σ·C) below which its progress along the gradient is
# mostly noise: the noise's component along the signal's direction has std σ·C a step (√T·σ·C over T steps),
# against T·‖Σ‖ of signal if the direction holds. At 1 the two are equal.
NOISE_DOMINATED = 1.0


def dp_noise_dominates(rec: RoundRecord) -> dict[tuple[str | None, str], Finding]:
    """The median site's round signal-to-noise, at the top of its release noise, is below NOISE_DOMINATED."""
    out: dict[tuple[str | None, str], Finding] = {}
    # Each site's reading is itself noised (its std is public): a site counts with the upper end of its reading,
    # + 2 std, so that release noise alone cannot make the finding fire.
    steps = {r.site: r.steps for r in rec.sites if r.phase == "train" and r.status == "ok" and r.steps}
    snr = {r.site: (r.signal_to_noise + 2 * (r.signal_to_noise_std or 0.0)) * steps[r.site] ** 0.5 for r in rec.sites
           if r.phase == "evaluate" and r.signal_to_noise is not None and r.site in steps}
    if snr:
        median = statistics.median(snr.values())
        if median < NOISE_DOMINATED:
            out[(None, K.DP_NOISE_DOMINATES)] = Finding(
                K.DP_NOISE_DOMINATES, "warning", f"DP noise dominates the sites' training: the median round "
                f"signal-to-noise √steps · ‖Σ clipped gradients‖ / (σ·C), at the top of its noise (+2 std), is "
                f"{median:.2f} over the {len(snr)} sites that trained in round {rec.round} (below 1, the noise along "
                "the gradient outweighs the gradient). More examples per site, a larger ε or more steps per round "
                "help.", None)
    return out
