"""Step 4 → findings from the inputs' side: a data shift at a site whose texts the model every site received reads
unlike the others'.

Two readings of the received model on the site's own data, against the other sites': its confidence (label-free,
from the validation confidence histogram: with wrong labels it is the others', with corrupted or foreign texts it
drops) and, beside it, how much it disagrees with the labels (agreement.py) or the site's first-use training loss.
A data shift needs the confidence drop (z ≥ 4) *and* one of the others pointing the same way (z ≥ 2): a loss or a
disagreement alone is what wrong labels also give. The tests wait for a site's second release (one release's noise alone raised most false alarms).
"""

from __future__ import annotations

import math

from common.rounds import Finding
from common.rounds import FindingKind as K
from server.findings.agreement import Agreement
from server.findings.domain import DomainGap, departs
from server.findings.evidence import Z_ALARM, Z_CORROBORATE, SiteEvidence, confidence, median_spread

MIN_LOSS_EXCESS = 0.15  # mean first-use training loss above the others' median (nats)
MIN_CONFIDENCE_DROP = 0.02  # mean confidence below the others' median


def loss_excess(ev: SiteEvidence, others: list[float]) -> tuple[float, float, float]:
    """(the site's mean first-use training loss, the others' median, the excess's z-score)."""
    typical, spread = median_spread(others)
    spread = spread if len(others) >= 3 else 0.0
    mine = ev.loss_mean()
    sd = math.sqrt(ev.loss_var_sum) / ev.loss_rounds
    # The others' spread (their domains differ too), at least this site's own noise, and the reference's error.
    scale = math.sqrt(max(spread ** 2, sd ** 2) + sd ** 2) * math.sqrt(1 + 1 / len(others))
    return mine, typical, (mine - typical) / scale if scale > 0 else 0.0


def data_shift(site: str, ev: SiteEvidence, ag: Agreement | None, others: list[float] | None,
               gap: DomainGap | None = None) -> Finding | None:
    """data_shift when the received model is less sure of the site's texts than of the others' and it also
    disagrees with their labels or loses more on them, or when the texts sit apart in the encoder's space
    (domain.py) and one of those readings corroborates; a `domain_difference` note when they sit apart and the model
    reads them as well as the others'. `others`: the other sites' mean first-use losses (None when the loss
    comparison is withheld)."""
    releases = "noised releases" if ev.noised else "exact releases"
    apart = departs(gap, Z_ALARM)
    if ag is None or (not apart and (ag.confidence_z < Z_ALARM or ag.confidence_drop < MIN_CONFIDENCE_DROP
                                     or len(ev.confidence) < 2)):
        return None
    where = (f"its texts sit {gap.gap:.2f} from the others' in the encoder's space, per class the model predicts "
             f"(unit-norm centroids; z = {gap.z:.1f} over {gap.rounds} {releases})") if apart else ""
    # The second readings: disagreement with the labels, and the first-use loss (which must reach Z_ALARM to stand
    # beside a confidence drop, Z_CORROBORATE beside texts that sit apart).
    disagrees = (f"it disagrees with {ag.excess:.1%} more of their labels than at the other sites (z = {ag.z:.1f})"
                 if ag.z >= Z_CORROBORATE else None)
    loses, zl = None, 0.0
    if others and ev.loss_rounds >= 2:
        mine, typical, zl = loss_excess(ev, others)
        if mine - typical >= MIN_LOSS_EXCESS and zl >= Z_CORROBORATE:
            loses = f"its training loss stays at {mine:.2f} against the others' median {typical:.2f} (z = {zl:.1f})"
    readings = [r for r in (disagrees, loses if zl >= Z_ALARM else None) if r]
    z = min(ag.confidence_z, ag.z) if disagrees else min(ag.confidence_z, zl) if readings else ag.confidence_z
    # Its confidence against the others', in the direction it moved (a drop in the first case below, always).
    moved = (f"its mean confidence on them is {abs(ag.confidence_drop):.2f} "
             f"{'below' if ag.confidence_drop >= 0 else 'above'} the others' (z = {abs(ag.confidence_z):.1f})")
    if ag.confidence_z >= Z_ALARM and ag.confidence_drop >= MIN_CONFIDENCE_DROP and len(ev.confidence) >= 2 \
            and readings:
        return Finding(
            K.DATA_SHIFT, "warning",
            f"{site}'s texts read unlike the other sites' to the model every site received: {moved} and "
            f"{' and '.join(readings)}, over {len(ev.confidence)} {releases}"
            + (f"; {where}" if where else "") + ": its inputs differ (another domain, corrupted or differently "
            "prepared text), not its labels", site, confidence=confidence(z))
    if not apart:
        return None
    # Beside texts that sit apart, a confidence that departs either way: garbled text at a site holding one class
    # was read *more* confidently as that class (+0.10, z 3.9 in a Dirichlet run), which is no reading "as well".
    unsure = ag.confidence_z >= Z_CORROBORATE and ag.confidence_drop >= MIN_CONFIDENCE_DROP
    surer = -ag.confidence_z >= Z_CORROBORATE and -ag.confidence_drop >= MIN_CONFIDENCE_DROP
    worse = [r for r in (moved if unsure or surer else None, disagrees, loses) if r]
    if worse:
        return Finding(
            K.DATA_SHIFT, "warning",
            f"{site}'s texts differ from the other sites': {where}, and the model every site received reads them "
            f"{'otherwise' if surer else 'worse'}: {' and '.join(worse)}: its inputs differ (another domain, "
            "corrupted or differently prepared text), not its labels", site, confidence=confidence(gap.z))
    return Finding(
        K.DOMAIN_DIFFERENCE, "info",
        f"{site}'s texts differ from the other sites': {where}; but the model every site received reads them as "
        f"well as the others' (confidence {-ag.confidence_drop:+.2f} against theirs, z = {-ag.confidence_z:+.1f}; "
        f"disagreement with their labels {ag.excess:+.1%}, z = {ag.z:.1f}): a difference in its data, not a fault",
        site, confidence=0.8)
