"""Step 4 → findings across sites in one round: free riders, diverging sites and stragglers, from update norms and timing.

Update geometry across sites. Under DP every honest update is mostly noise of the same scale (norms within a few
% of each other, measured), so only gross departures are evidence: an update of norm ~0 (nothing trained) or many
times the median (diverging, or not a trained update at all). Post-processing only: the norms and timings the server
already holds.
"""

from __future__ import annotations

import statistics

from common.rounds import Finding, RoundRecord, SiteRoundRow
from common.rounds import FindingKind as K

MIN_SITES = 3  # cross-site comparisons need a median of at least this many sites


def cross_site(rec: RoundRecord) -> dict[tuple[str | None, str], Finding]:
    """Sites whose update or timing departs grossly from the others' this round (post-processing only)."""
    trained = {r.site: r for r in rec.sites if r.phase == "train" and r.status == "ok" and r.update_norm is not None}
    if len(trained) < MIN_SITES:
        return {}
    return {**norm_departure(rec, trained), **straggler(rec, trained)}


ZERO_NORM = 1e-6  # × median update norm: the site sent back what it received
NORM_OUTLIER = 5.0  # × median update norm


def norm_departure(rec: RoundRecord, trained: dict[str, SiteRoundRow]) -> dict[tuple[str | None, str], Finding]:
    """A free rider (an update of norm ~0, or a huge one with no training measured) or a diverging site (a huge one),
    against the median norm of the sites that trained (`trained`: their train rows, at least MIN_SITES)."""
    out: dict[tuple[str | None, str], Finding] = {}
    measured = {r.site for r in rec.sites if r.phase == "evaluate" and r.status == "ok" and r.train_loss is not None}
    median = statistics.median(r.update_norm for r in trained.values())
    for site, r in trained.items():
        if median <= 0:
            break
        if r.update_norm <= ZERO_NORM * median:
            out[(site, K.FREE_RIDER)] = Finding(
                K.FREE_RIDER, "critical", f"{site}'s update in round {rec.round} equals the global model it received "
                f"(update norm {r.update_norm:.2g} vs median {median:.3g} over {len(trained)} sites): it did not "
                "train, yet its weight counted in the average", site)
        elif r.update_norm >= NORM_OUTLIER * median:
            if site in measured:
                out[(site, K.DIVERGENCE)] = Finding(
                    K.DIVERGENCE, "critical", f"{site}'s update in round {rec.round} is {r.update_norm / median:.0f}× "
                    f"the median norm ({r.update_norm:.3g} vs {median:.3g} over {len(trained)} sites): its local "
                    "training diverges (learning rate too high, or far too many local steps)", site)
            else:
                out[(site, K.FREE_RIDER)] = Finding(
                    K.FREE_RIDER, "critical", f"{site}'s update in round {rec.round} is {r.update_norm / median:.0f}× "
                    f"the median norm and it measured no training losses this round: it sent weights it did not "
                    "train", site)
    return out


STRAGGLER = 3.0  # × median training seconds (and at least STRAGGLER_MIN_S more), and × the median seconds per example
STRAGGLER_MIN_S = 5.0


def straggler(rec: RoundRecord, trained: dict[str, SiteRoundRow]) -> dict[tuple[str | None, str], Finding]:
    """A site that takes many times the median time to train, and is slow per example too (`trained`: the train
    rows of the sites that trained)."""
    out: dict[tuple[str | None, str], Finding] = {}
    # The site's whole handler span (what the round waits for), else its reported compute seconds.
    seconds = {s: (r.ended_at - r.started_at) if r.started_at and r.ended_at else r.seconds
               for s, r in trained.items() if r.seconds is not None or r.started_at}
    # Examples each site processed (steps × q × n, from the public DP-SGD schedule): a site holding 10× the data
    # honestly takes ~10× as long, so a straggler must also be slow per example.
    work = {s: r.steps * r.sample_rate * r.num_examples for s, r in trained.items()
            if r.steps and r.sample_rate and r.num_examples}
    per_example = {s: seconds[s] / work[s] for s in seconds if s in work} if set(work) >= set(seconds) else {}
    if len(seconds) >= MIN_SITES:
        typical = statistics.median(seconds.values())
        typical_rate = statistics.median(per_example.values()) if per_example else 0.0
        for site, sec in seconds.items():
            slow_per_example = not per_example or per_example[site] >= STRAGGLER * typical_rate
            if sec >= STRAGGLER * typical and sec >= typical + STRAGGLER_MIN_S and slow_per_example:
                out[(site, K.STRAGGLER)] = Finding(
                    K.STRAGGLER, "warning", f"{site} took {sec:.0f} s to train in round {rec.round}, {sec / typical:.0f}× "
                    f"the median {typical:.1f} s over {len(seconds)} sites: a straggler that every round waits for "
                    "(server.round-timeout drops it)", site)
    return out
