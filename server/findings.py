"""Findings: what the server concludes each round from what it saw, each with the sentence that justifies it.

These are the direct ones (a site failed, refused, sent an unusable update; the model collapsed; DP noise drowns
the updates). A finding is recorded in the round it appears; it is recorded again only if it clears and comes back.
Statistical diagnosis across sites (which site has noisy labels, a missing class, ...) builds on the same record.
"""

from __future__ import annotations

import statistics

from common.run_store import Finding, RoundRecord

COLLAPSE_SHARE = 0.9  # one class taking this share of the test predictions
NOISE_DOMINATED = 10.0  # ‖DP noise‖ / ‖Σ clipped gradients‖ per step above which a step is essentially noise


def current(rec: RoundRecord) -> dict[tuple[str | None, str], Finding]:
    """Every finding that holds in this round, keyed by (site, kind)."""
    out: dict[tuple[str | None, str], Finding] = {}
    for row in rec.sites:
        if row.status == "failed" and row.reason.startswith("update rejected"):
            out[(row.site, "update-rejected")] = Finding(
                "update-rejected", "critical", f"{row.site}'s update was not averaged in round {rec.round}: "
                f"{row.reason.removeprefix('update rejected: ')}", row.site)
        elif row.status == "failed":
            out[(row.site, "site-failed")] = Finding(
                "site-failed", "critical", f"{row.site} failed in {row.phase} in round {rec.round}: {row.reason}",
                row.site)
        elif row.status == "refused":
            out[(row.site, "site-refused")] = Finding(
                "site-refused", "warning", f"{row.site} refused to {row.phase} in round {rec.round} to stay within "
                f"its privacy budget: {row.reason}", row.site)
    share = rec.metrics.get("test_max_prediction_share")
    if share is not None and share >= COLLAPSE_SHARE:
        out[(None, "collapsed")] = Finding(
            "collapsed", "warning", f"the global model predicts one class for {share:.0%} of the server's test set "
            f"(round {rec.round}): it has collapsed onto the majority class; macro-F1 "
            f"{rec.metrics.get('test_macro_f1', float('nan')):.2f}", None)
    nsr = {r.site: r.noise_to_signal for r in rec.sites
           if r.phase == "evaluate" and r.noise_to_signal is not None}
    if nsr:
        median = statistics.median(nsr.values())
        if median >= NOISE_DOMINATED:
            out[(None, "noise-dominated")] = Finding(
                "noise-dominated", "warning", f"DP noise dominates every site's steps: median ‖noise‖ / ‖Σ clipped "
                f"gradients‖ = {median:.0f} across {len(nsr)} sites in round {rec.round} (1 = as much noise as "
                "signal). More examples per site, a larger ε, fewer trainable values or fewer steps per round help.",
                None)
    return out


class FindingsTracker:
    """Remembers which findings are open, so each is recorded when it appears (or reappears), not every round."""

    def __init__(self) -> None:
        self.open: set[tuple[str | None, str]] = set()

    def update(self, rec: RoundRecord) -> list[Finding]:
        now = current(rec)
        new = [f for key, f in now.items() if key not in self.open]
        self.open = set(now)
        return new
