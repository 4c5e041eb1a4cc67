"""Step 4 → findings from the first-use training loss: a data shift at a site whose loss stays high for no label reason.

Each site's first-use training loss (weight-1 block) against the others' median: data_shift when it is high and the
labels are not the reason (text drawn from elsewhere, corrupted text, a different domain). The test waits for a
site's second release (one release's noise alone raised most false alarms).
"""

from __future__ import annotations

import math

from common.rounds import Finding
from common.rounds import FindingKind as K
from server.findings.evidence import Z_ALARM, SiteEvidence, confidence, median_spread

MIN_LOSS_EXCESS = 0.15  # mean first-use training loss above the others' median (nats) for a data shift


def data_shift(site: str, ev: SiteEvidence, others: list[float]) -> Finding | None:
    """The site's mean first-use training loss against the other sites' (`others`: their means, in nats)."""
    typical, spread = median_spread(others)
    spread = spread if len(others) >= 3 else 0.0
    mine = ev.loss_mean()
    sd = math.sqrt(ev.loss_var_sum) / ev.loss_rounds
    # The others' spread (their domains differ too), at least this site's own noise, and the reference's error.
    scale = math.sqrt(max(spread ** 2, sd ** 2) + sd ** 2) * math.sqrt(1 + 1 / len(others))
    z = (mine - typical) / scale if scale > 0 else 0.0
    if mine - typical >= MIN_LOSS_EXCESS and z >= Z_ALARM:
        return Finding(
            K.DATA_SHIFT, "warning",
            f"{site}'s training loss stays at {mine:.2f} while the other sites' median is {typical:.2f} "
            f"(z = {z:.1f} over {ev.loss_rounds} rounds) and its label mix is ordinary: its inputs differ from "
            "the others' (another domain, corrupted or differently prepared text)", site, confidence=confidence(z))
    return None
