"""Step 4 → findings from the public DP-SGD schedule: overfitting at a site that makes many more passes over its
data per round than the others.

Every site's schedule is public (its ledger entry: σ, q, steps), and steps × q is the number of passes over what it
trained on. Honest sites of one run make the same number (the run's train.local-epochs), so a site making several
times the others' median passes, on whatever share of its data, trains for longer than the run asked and fits its
own examples.
"""

from __future__ import annotations

import math
import statistics

from common.rounds import Finding
from common.rounds import FindingKind as K
from server.findings.evidence import MIN_SITES, SiteEvidence, relative_spread

PASSES_OUTLIER = 2.0  # × the others' median passes per round (at least; more where they differ among themselves)


def overfitting(sites: dict[str, SiteEvidence]) -> dict[tuple[str | None, str], Finding]:
    """Sites whose median passes per round (public ledger: steps × q) are several times the other sites'."""
    out: dict[tuple[str | None, str], Finding] = {}
    passes = {s: statistics.median(e.passes) for s, e in sites.items() if e.passes}
    if len(passes) >= MIN_SITES:
        for site, mine in passes.items():
            values = [v for s, v in passes.items() if s != site]
            others = statistics.median(values)
            if others > 0 and mine >= max(PASSES_OUTLIER, math.exp(4 * relative_spread(values))) * others:
                steps = statistics.median(sites[site].steps)
                out[(site, K.OVERFITTING)] = Finding(
                    K.OVERFITTING, "warning",
                    f"{site} makes {mine:.0f} passes over its training examples per round ({steps:.0f} local DP "
                    f"steps), {mine / others:.1f}× the others' median {others:.0f} (public ledger): many local "
                    "epochs on its data overfit it" + _effect(sites[site]), site, confidence=0.9)
    return out


def _effect(ev: SiteEvidence) -> str:
    """What its update did to the global model: pulled the average toward it, or was left out of it."""
    if not ev.left_out:
        return " and pull the average toward it"
    return (f"; its update was left out of the average in {len(ev.left_out)} of {len(ev.steps)} rounds "
            "(its norm many times the others', server.update-norm-outlier)")
