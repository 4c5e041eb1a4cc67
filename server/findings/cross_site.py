"""Step 4 → findings across sites: free riders, diverging sites and stragglers, from update norms, the DP noise in
each update, and timing.

Update geometry across sites. Under DP an honest update is mostly noise of one scale, but its size also follows the
site's data (a site holding one class pulls the head harder: 3.5× the median norm, measured on a Dirichlet
partition), so norms say only the gross things: an update of norm ~0 (nothing trained), or a huge one with no
training measured (not a trained update). How large a step a site took is read off the noise alone
(aggregate.noise_scale: the same at every honest site within ~4 %), so a site stepping 3× the run's learning rate
shows as 3×, whatever its data. Thresholds are relative to the run's own sites (× their median, and beyond their
own spread), not constants fitted to one dataset. Post-processing only: the updates and timings the server holds.
"""

from __future__ import annotations

import math
import statistics

from common.rounds import Finding, RoundRecord, SiteRoundRow
from common.rounds import FindingKind as K
from server.findings.evidence import relative_spread

MIN_SITES = 3  # cross-site comparisons need a median of at least this many sites


def cross_site(rec: RoundRecord, *, before_evaluation: bool = False) -> dict[tuple[str | None, str], Finding]:
    """Sites whose update departs from the others' this round (post-processing only). `before_evaluation`: read
    while the round's updates are not yet averaged (server.quarantine), with each site's reported steps standing in
    for the training losses its evaluation will measure."""
    trained = {r.site: r for r in rec.sites if r.phase == "train" and r.status == "ok" and r.update_norm is not None}
    if len(trained) < MIN_SITES:
        return {}
    return norm_departure(rec, trained, {s for s, r in trained.items() if r.steps} if before_evaluation else None)


ZERO_NORM = 1e-6  # × median update norm: the site sent back what it received
NORM_OUTLIER = 5.0  # × median update norm: without a noise reading, a diverging site (or weights it did not train)
STEP_OUTLIER = 1.5  # × the median step size read off the noise: a blown-up learning rate (honest sites: ±4 %)


def norm_departure(rec: RoundRecord, trained: dict[str, SiteRoundRow],
                   measured: set[str] | None = None) -> dict[tuple[str | None, str], Finding]:
    """A free rider (an update of norm ~0, or a huge one with no training measured) or a diverging site (a step
    size many times the others', read off its noise; else a huge norm), against the sites that trained (`trained`:
    their train rows, at least MIN_SITES). `measured`: the sites whose evaluation measured training losses this
    round (None: read from the round's evaluate rows; before the evaluation, the server passes those that report
    training steps)."""
    out: dict[tuple[str | None, str], Finding] = {}
    if measured is None:
        measured = {r.site for r in rec.sites
                    if r.phase == "evaluate" and r.status == "ok" and r.train_loss is not None}
    median = statistics.median(r.update_norm for r in trained.values())
    # The reading compares sites on one schedule: a site making many more passes over fewer examples (an
    # overfitting site, named by schedule.py) divides its noise by a smaller batch than its released size says.
    passes = {s: (r.steps or 0) * (r.sample_rate or 0.0) for s, r in trained.items()}
    usual = statistics.median(passes.values())
    # A reading of 0 is no honest update's (its noise is never 0): it is left out rather than allowed to halve the
    # median every other site is judged against.
    scales = {s: r.noise_scale for s, r in trained.items() if r.noise_scale is not None and r.noise_scale > 0
              and s in measured and usual > 0 and passes[s] <= 1.5 * usual}
    steps = statistics.median(r.steps or 0 for r in trained.values())
    for site, r in trained.items():
        if median <= 0:
            break
        if not r.steps and steps > 0 and r.update_norm > ZERO_NORM * median:
            out[(site, K.FREE_RIDER)] = Finding(
                K.FREE_RIDER, "critical", f"{site} sent an update in round {rec.round} (norm {r.update_norm:.3g}) "
                f"after 0 training steps, where the other sites took {steps:.0f}: weights it did not train"
                + _averaged(r), site)
        elif r.update_norm <= ZERO_NORM * median:
            out[(site, K.FREE_RIDER)] = Finding(
                K.FREE_RIDER, "critical", f"{site}'s update in round {rec.round} equals the global model it received "
                f"(update norm {r.update_norm:.2g} vs median {median:.3g} over {len(trained)} sites): it did not "
                "train" + _averaged(r), site)
        elif r.update_norm >= NORM_OUTLIER * median and site not in measured:
            out[(site, K.FREE_RIDER)] = Finding(
                K.FREE_RIDER, "critical", f"{site}'s update in round {rec.round} is {r.update_norm / median:.0f}× "
                f"the median norm and it measured no training losses this round: it sent weights it did not "
                "train" + _averaged(r), site)
        elif len(scales) >= MIN_SITES and site in scales:
            others = [v for s, v in scales.items() if s != site]
            typical = statistics.median(others)
            limit = max(STEP_OUTLIER, math.exp(4 * relative_spread(others)))
            if typical > 0 and scales[site] >= limit * typical:
                out[(site, K.DIVERGENCE)] = Finding(
                    K.DIVERGENCE, "critical", f"{site}'s update in round {rec.round} carries "
                    f"{scales[site] / typical:.1f}× the DP noise of the other sites' at the same σ and schedule "
                    f"(step size {scales[site]:.3g} vs median {typical:.3g} over {len(scales)} sites, read off the "
                    "noise alone): it steps with a learning rate many times the run's, and its training diverges"
                    + _averaged(r), site)
        elif r.update_norm >= NORM_OUTLIER * median and len(scales) < MIN_SITES:
            out[(site, K.DIVERGENCE)] = Finding(
                K.DIVERGENCE, "critical", f"{site}'s update in round {rec.round} is {r.update_norm / median:.0f}× "
                f"the median norm ({r.update_norm:.3g} vs {median:.3g} over {len(trained)} sites): its local "
                "training diverges (learning rate too high, or far too many local steps)" + _averaged(r), site)
    return out


def _averaged(r: SiteRoundRow) -> str:
    """What became of the update, for the sentence: averaged in, or left out (server.update-norm-outlier)."""
    return "; it was left out of the average" if r.left_out else ", yet its weight counted in the average"


STRAGGLER = 2.0  # × the others' median time per round (at least; more where they differ more among themselves)
STRAGGLER_MIN_S = 1.0  # and this many seconds more (timings leave a site rounded to 0.1 s)
STRAGGLER_ROUNDS = 2  # rounds it must be slow in, beyond its first (which computes head mode's features)


def stragglers(spans: dict[str, list[tuple[float, float | None]]],
               round_: int) -> dict[tuple[str | None, str], Finding]:
    """Sites that take many times the others' time to train, round after round, and are slow per example too.

    Args:
        spans: site -> (seconds its train handler took, seconds per example trained) per round it trained, oldest
            first; its first round is its set-up (features, caches) and is left out.
        round_: the round, for the sentence.
    """
    steady = {s: v[1:] for s, v in spans.items() if len(v) > STRAGGLER_ROUNDS}
    if len(steady) < MIN_SITES:
        return {}
    typical = {s: statistics.median(t for t, _ in v) for s, v in steady.items()}
    rate = {s: statistics.median(p for _, p in v if p is not None) for s, v in steady.items()
            if any(p is not None for _, p in v)}
    out: dict[tuple[str | None, str], Finding] = {}
    for site, v in steady.items():
        others = [t for s, t in typical.items() if s != site]
        median = statistics.median(others)
        limit = _limit(others)
        recent = [t for t, _ in v[-STRAGGLER_ROUNDS:]]
        # A site holding 10× the data honestly takes ~10× as long: a straggler is slow per example too, beyond the
        # others' own spread per example (under a skewed partition their times spread with their sizes and their
        # times per example much less: one limit for both let a ×9 straggler through).
        other_rates = [p for s, p in rate.items() if s != site]
        slow_per_example = (site not in rate or not other_rates
                            or rate[site] >= _limit(other_rates) * statistics.median(other_rates))
        if (median > 0 and min(recent) >= limit * median and min(recent) >= median + STRAGGLER_MIN_S
                and slow_per_example):
            out[(site, K.STRAGGLER)] = Finding(
                K.STRAGGLER, "warning", f"{site} took {statistics.median(recent):.1f} s to train in each of its last "
                f"{STRAGGLER_ROUNDS} rounds (to round {round_}), {statistics.median(recent) / median:.1f}× the other "
                f"{len(others)} sites' median {median:.1f} s, and is as slow per example trained: a straggler that "
                "every round waits for (server.round-timeout drops it)", site)
    return out


def _limit(values: list[float]) -> float:
    """× the others' median a straggler must reach: STRAGGLER, or more where their values spread (4 robust std in
    log)."""
    return max(STRAGGLER, math.exp(4 * relative_spread(values)))
