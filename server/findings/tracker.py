"""Step 4 → findings, recorded: every rule run on each round, a finding recorded in the round it appears.

A finding is recorded again only if it clears and comes back. Each round the tracker merges, in this order, the
statistical diagnosis across sites and rounds (Diagnosis, below), the global model's trends (trends.py), what the
round shows directly (direct.py) and the gross cross-site departures of its updates and timing (cross_site.py).

Statistical diagnosis across sites and rounds: which site's data or training is wrong, and how. Tests, per site s
against the pooled others (never told how many sites are faulty; a site is compared with the leave-one-out pool so a
faulty site does not mask itself), over the evidence accumulated so far (evidence.py), in this order:

- each site's labels (labels.py): per class against the model every site received (agreement.py) for
  label_noise and label_flip, the label histogram for class_missing, and a label mix that only differs (info);
- each site's local model on public texts (probe.py), for a site the labels did not already name;
- input-side evidence (loss.py, domain.py): data_shift, for a site whose labels do not explain it, or an info
  `domain_difference` where its texts sit apart from the others' and the model reads them as well;
- the public DP-SGD schedule (schedule.py): overfitting.

Under run-level label skew the probe and the loss comparison are withheld (a site's local model and loss follow
its label mix); the per-class tests are not.
"""

from __future__ import annotations

from common.rounds import Finding, RoundRecord
from common.rounds import FindingKind as K
from server.findings.agreement import agreements
from server.findings.cross_site import cross_site, stragglers
from server.findings.direct import observed
from server.findings.domain import departs, domain_gaps
from server.findings.evidence import MIN_SITES, Z_ALARM, SiteEvidence, accumulate
from server.findings.labels import (
    MIN_LABEL_RELEASES,
    departures,
    label_fault,
    label_skew,
    reference,
    wrong_labels,
)
from server.findings.loss import data_shift
from server.findings.probe import probe_fault
from server.findings.schedule import overfitting
from server.findings.trends import trends


def current(rec: RoundRecord) -> dict[tuple[str | None, str], Finding]:
    """Every finding that holds in this round, keyed by (site, kind)."""
    return {**observed(rec), **cross_site(rec)}


class Diagnosis:
    """Accumulates each round's evidence and returns the statistical findings that hold after it."""

    def __init__(self, *, loss_clip: float, class_names: tuple[str, ...] | None = None) -> None:
        # loss_clip: the run's dp.loss-clip (the loss blocks are in its units); class_names: data.labels.
        self.loss_clip = loss_clip
        self.names = class_names
        self.sites: dict[str, SiteEvidence] = {}
        self.round = 0

    def add(self, rec: RoundRecord) -> None:
        accumulate(self.sites, rec, loss_clip=self.loss_clip)
        self.round = rec.round

    def findings(self) -> dict[tuple[str | None, str], Finding]:
        out: dict[tuple[str | None, str], Finding] = {}
        agree = agreements(self.sites)  # per class, against the model every site received
        gaps = domain_gaps(self.sites)  # label-free: where each site's texts sit in the encoder's space
        # A site whose texts sit apart from the others' reads the labels differently because its texts differ (a
        # foreign domain's sentiment is not the snippets'): its disagreement is the inputs' case, not its labels'.
        apart = {s for s, g in gaps.items() if departs(g, Z_ALARM)}
        labelled = {s: e for s, e in self.sites.items() if e.label_rounds >= MIN_LABEL_RELEASES and e.n_train}
        skew = False
        if len(labelled) >= MIN_SITES:
            # Each site against the others' reference (leave-one-out), read by both the skew and the label tests.
            m = len(labelled) - 1
            refs = {s: reference([e for o, e in labelled.items() if o != s]) for s in labelled}
            departure = departures(labelled, refs)
            # A site whose labels are wrong departs because of its fault: skew is judged on the others.
            wrong = {s for s in labelled if s in agree and wrong_labels(agree[s]) and s not in apart}
            note = label_skew({s: e for s, e in labelled.items() if s not in wrong},
                              {s: d for s, d in departure.items() if s not in wrong})
            if note is not None:
                out[(None, K.LABEL_SKEW)] = note
            skew = note is not None
            for site, ev in labelled.items():
                # Is skew the rule among the *other* sites? Then a class this one lacks is part of it.
                others = {s: e for s, e in labelled.items() if s not in wrong and s != site}
                skew_elsewhere = label_skew(others, {s: departure[s] for s in others}) is not None
                f = label_fault(site, ev, refs[site], m, agree.get(site), departure=departure[site],
                                skewed_run=skew_elsewhere, names=self.names, apart=site in apart)
                if f is not None:
                    out[(site, f.kind)] = f
        named = {key[0] for key, f in out.items() if key[0] is not None and f.severity != "info"}
        # Under label skew a site's local model leans to its own label mix and its loss follows that mix: the probe
        # and the loss test would read the skew as a fault, so they wait for a partition without it.
        probed = {s: e.probe / e.probe_rounds for s, e in self.sites.items() if e.probe_rounds}
        if len(probed) >= MIN_SITES and not skew:
            for site, v in probed.items():
                if site in named or (site, K.LABEL_SKEW) in out:
                    continue  # the labels already name the cause, or its labels agree with the model
                f = probe_fault(site, v, {s: w for s, w in probed.items() if s != site},
                                self.sites[site].probe_rounds, names=self.names)
                if f is not None:
                    out[(site, f.kind)] = f
        lossy = {s: e for s, e in self.sites.items() if e.loss_rounds >= 2}  # one round is too noisy to call
        for site, ev in self.sites.items():
            if site in named:
                continue  # the labels already explain a high loss and a disagreement
            f = data_shift(site, ev, agree.get(site), [e.loss_mean() for s, e in lossy.items() if s != site]
                           if site in lossy and len(lossy) >= MIN_SITES and not skew else None, gaps.get(site))
            if f is not None:
                out[(site, f.kind)] = f
        out.update(overfitting(self.sites))
        out.update(stragglers({s: e.spans for s, e in self.sites.items()}, self.round))
        return out


class FindingsTracker:
    """Remembers which findings are open, so each is recorded when it appears (or reappears), not every round; the
    statistical diagnosis (Diagnosis) accumulates its evidence over the rounds here."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        self.open: set[tuple[str | None, str]] = set()
        self.diagnosis = diagnosis
        self.history: list[dict[str, float | None]] = []

    def update(self, rec: RoundRecord) -> list[Finding]:
        self.diagnosis.add(rec)
        self.history.append(dict(rec.metrics))
        now = {**self.diagnosis.findings(), **trends(self.history, rec.round), **current(rec)}
        new = [f for key, f in now.items() if key not in self.open]
        self.open = set(now)
        return new


    def replay(self, records: list[RoundRecord]) -> None:
        """Rebuild the evidence, the trend baselines and the open findings from a run's committed rounds, recording
        nothing: a resumed run goes on from where it stopped (its findings are in the store already), neither
        repeating them nor starting its baselines afresh."""
        for rec in records:
            self.update(rec)


def rediagnose(records: list[RoundRecord], *, loss_clip: float,
               class_names: tuple[str, ...] | None = None) -> list[tuple[int, Finding]]:
    """The findings the current code draws from a stored run's rounds, as (round, finding) in the order they would
    have been recorded: for a run made before a diagnosis change, or to check what was recorded."""
    tracker = FindingsTracker(Diagnosis(loss_clip=loss_clip, class_names=class_names))
    return [(rec.round, f) for rec in records for f in tracker.update(rec)]
