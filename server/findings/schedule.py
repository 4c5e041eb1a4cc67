"""Step 4 → findings from the public DP-SGD schedule: overfitting at a site that runs many times the others' local steps."""

from __future__ import annotations

import statistics

from common.rounds import Finding
from common.rounds import FindingKind as K
from server.findings.evidence import MIN_SITES, SiteEvidence

STEPS_OUTLIER = 4.0  # × the median local DP steps per round


def overfitting(sites: dict[str, SiteEvidence]) -> dict[tuple[str | None, str], Finding]:
    """Sites whose median local DP steps per round (public ledger) are many times the other sites' median."""
    out: dict[tuple[str | None, str], Finding] = {}
    stepped = {s: statistics.median(e.steps) for s, e in sites.items() if e.steps}
    if len(stepped) >= MIN_SITES:
        for site, steps in stepped.items():
            others = statistics.median(v for s, v in stepped.items() if s != site)
            if others > 0 and steps >= STEPS_OUTLIER * others:
                out[(site, K.OVERFITTING)] = Finding(
                    K.OVERFITTING, "warning",
                    f"{site} runs {steps:.0f} local DP steps per round, {steps / others:.0f}× the others' median "
                    f"{others:.0f} (public ledger): many local epochs on its data overfit it and pull the "
                    "average toward it", site, confidence=0.9)
    return out
