"""Statistical diagnosis across sites and rounds: which site's data or training is wrong, and how.

Everything here is post-processing of what sites already release (noised summaries, the public ledger fields σ, q,
steps, the public split sizes): no ε is spent. The noise of each released block is known (σ·Δ / weight), so each
test below is a z-score against noise *plus* the sampling spread an honest site would show, accumulated over rounds
(a site's train-label histogram is the same every round under fresh noise, so its mean sharpens as 1/√rounds).

Label skew first: a site's label counts are compared with the others' shares by χ² per degree of freedom (~1 when
all sites share one label mix). Label faults are the exception and skew the rule, so when more than a third of the
sites (and at least 2) depart by χ²/dof ≥ 16, the run gets a `label_skew` note and the label, loss and probe tests
below are withheld: on label counts a skewed site and a faulty one look alike, and a site's loss and local model
follow its label mix. (Natural and IID partitions of the drug reviews read χ²/dof ≤ 5 at clean sites; a Dirichlet
α = 0.5 partition reads 12–216.)

Tests, per site s against the pooled others (never told how many sites are faulty; a site is compared with the
leave-one-out pool so a faulty site does not mask itself):

- label histogram (train split, weight-1 block) vs the others' class shares p:
  class_missing  a class the others hold ≥ 5 % of is absent at s;
  label_flip     a class absent at s whose mass turned up as an excess in one other class;
  label_noise    the histogram moved toward uniform: r̂ = (K−1)/K · ⟨m − e, u − e⟩ / ‖u − e‖² estimates the share of
                 labels replaced by a random other one (e = n·p, u = n/K);
- first-use training loss (weight-1 block) vs the others' median: data_shift when it is high and the labels are not
  the reason (text drawn from elsewhere, corrupted text, a different domain);
- the public DP-SGD schedule: overfitting when a site runs many times the median number of local steps per round;
- each site's local model (its released update) on public texts at the server (FedDebug's idea, no site data and no
  ε): a model that predicts near-uniformly where the others are confident (label noise), or confidently another
  class (a flip), when the label histogram did not already name the cause.

The label and loss tests wait for a site's second release (one release's noise alone raised most false alarms).
Thresholds are a z-score plus an effect size, so that a clean run stays quiet; confidence is Φ(z − 2),
a heuristic, not a calibrated probability.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from common.rounds import Finding, RoundRecord
from common.rounds import FindingKind as K

Z_ALARM = 4.0  # z-score a loss departure must reach (noise + the honest sites' spread) before it is reported
Z_LABELS = 3.0  # the same for a label-histogram departure (its honest spread is known exactly: multinomial)
FLIP_MARGIN = 1.0  # χ² by which "class a relabelled as b" must beat "class a missing" to be reported as a flip
MIN_SHARE = 0.05  # a class the others hold less of than this cannot be called missing
MIN_NOISE_RATE = 0.35  # estimated share of randomised labels below which label noise is not reported
MIN_LOSS_EXCESS = 0.15  # mean first-use training loss above the others' median (nats) for a data shift
STEPS_OUTLIER = 4.0  # × the median local DP steps per round
MIN_SITES = 3
# Releases a site's label histogram must have before it is tested: one release's noise (std ~7 per count) turns a
# small class into an apparent gap in ~1 of 50 clean runs; two halve its variance (measured on synthetic releases).
MIN_LABEL_RELEASES = 2
SKEW_DEPARTURE = 16.0  # χ²/dof of a site's label counts against the others' shares that counts as a departure
SKEW_SHARE = 1 / 3  # more than this share of sites departing (and at least 2) = label skew, not faults
PROBE_TV = 0.3  # total-variation distance of a site model's predictions on public texts from the others' median
PROBE_MIN_MAD = 0.03  # floor on the others' spread of that distance (a few sites can agree by chance)
PROBE_UNIFORM = 0.93  # normalised entropy of predictions above which a model "predicts almost evenly"


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def median_spread(values: list[float]) -> tuple[float, float]:
    """(median, robust std = 1.4826 × median absolute deviation) of the other sites' values."""
    typical = statistics.median(values)
    return typical, 1.4826 * statistics.median(abs(v - typical) for v in values)


def confidence(z: float) -> float:
    return round(min(0.999, _phi(z - 2.0)), 3)


@dataclass
class SiteEvidence:
    """One site's released blocks summed over rounds, and how many went in (so means and their noise are known)."""

    n_train: int = 0
    labels: np.ndarray | None = None  # Σ over rounds of the noised train-label histogram
    label_rounds: int = 0
    label_var: float = 0.0  # noise variance of one round's cell
    loss_sum: float = 0.0  # Σ over rounds of the noised mean first-use train loss (nats)
    loss_rounds: int = 0
    loss_var_sum: float = 0.0  # Σ over rounds of that mean's noise variance
    steps: list[int] = field(default_factory=list)
    probe: np.ndarray | None = None  # Σ over rounds of its local model's mean predicted distribution on public texts
    probe_rounds: int = 0

    def label_mean(self) -> np.ndarray:
        return self.labels / self.label_rounds

    def loss_mean(self) -> float:
        return self.loss_sum / self.loss_rounds


class Diagnosis:
    """Accumulates each round's evidence and returns the statistical findings that hold after it."""

    def __init__(self, loss_clip: float = 3.0, class_names: tuple[str, ...] | None = None) -> None:
        self.loss_clip = loss_clip
        self.names = class_names
        self.sites: dict[str, SiteEvidence] = {}

    def _name(self, c: int) -> str:
        return self.names[c] if self.names and c < len(self.names) else f"class {c}"

    def add(self, rec: RoundRecord) -> None:
        for row in rec.sites:
            ev = self.sites.setdefault(row.site, SiteEvidence())
            if row.phase == "train" and row.status == "ok" and row.steps:
                ev.steps.append(int(row.steps))
                ev.n_train = ev.n_train or int(row.num_examples or 0)  # the summary's split size wins (below)
            if row.phase == "train" and row.probe:
                v = np.asarray(row.probe, dtype=np.float64)
                ev.probe = v if ev.probe is None else ev.probe + v
                ev.probe_rounds += 1
            if row.phase != "evaluate" or row.status != "ok" or row.summary is None:
                continue
            summary = row.summary
            released, std = summary.released, summary.noise_std
            if not released or "train_labels" not in released:
                continue
            # The histogram covers the site's whole train split (public size), whatever share of it the site
            # trained on this round (an overfitting site trains on a few examples).
            ev.n_train = int(summary.n_train or ev.n_train)
            labels = np.asarray(released["train_labels"], dtype=np.float64)
            ev.labels = labels if ev.labels is None else ev.labels + labels
            ev.label_rounds += 1
            ev.label_var = float(std.get("train_labels", 0.0)) ** 2
            n = ev.n_train or max(float(labels.sum()), 1.0)
            if summary.round_trained == rec.round and released.get("train_loss_sum") is not None:
                # Σ min(loss, L) / L over the train split -> mean loss in nats, and its noise variance.
                ev.loss_sum += float(released["train_loss_sum"][0]) * self.loss_clip / n
                ev.loss_var_sum += (float(std.get("train_loss_sum", 0.0)) * self.loss_clip / n) ** 2
                ev.loss_rounds += 1

    def findings(self) -> dict[tuple[str | None, str], Finding]:
        out: dict[tuple[str | None, str], Finding] = {}
        labelled = {s: e for s, e in self.sites.items() if e.label_rounds >= MIN_LABEL_RELEASES and e.n_train}
        if len(labelled) >= MIN_SITES:
            # Each site against the others' reference (leave-one-out), read by both the skew and the label tests.
            m = len(labelled) - 1
            refs = {s: self._reference([e for o, e in labelled.items() if o != s]) for s in labelled}
            departure = {s: self._departure(ev, refs[s], m) for s, ev in labelled.items()}
            skewed = sorted(s for s, d in departure.items() if d >= SKEW_DEPARTURE)
            if len(skewed) >= 2 and len(skewed) > SKEW_SHARE * len(labelled):
                # Label faults are the exception and label skew between sites the rule: when many sites' label
                # mixes depart, a histogram cannot tell a faulty site from a skewed one, so it names none.
                out[(None, K.LABEL_SKEW)] = Finding(
                    K.LABEL_SKEW, "info",
                    f"{len(skewed)} of {len(labelled)} sites' label mixes differ from the others' far beyond sampling "
                    f"and release noise ({', '.join(f'{s} χ²/dof {departure[s]:.0f}' for s in skewed)}; honest "
                    "sites with one shared mix read ~1): the sites' label mixes are skewed (non-IID), so the "
                    "label, loss and probe tests are withheld: on label counts alone a faulty site looks like a "
                    "skewed one, and a site's loss and local model follow its label mix", None, confidence=0.8)
            else:
                for site, ev in labelled.items():
                    f = self._labels(site, ev, refs[site], m)
                    if f is not None:
                        out[(site, f.kind)] = f
        # Under label skew a site's local model leans to its own label mix and its loss follows that mix: the probe
        # and the loss test would read the skew as a fault, so they wait for a partition without it.
        skew = (None, K.LABEL_SKEW) in out
        probed = {s: e.probe / e.probe_rounds for s, e in self.sites.items() if e.probe_rounds}
        if len(probed) >= MIN_SITES and not skew:
            for site, v in probed.items():
                if any(key[0] == site for key in out):
                    continue  # the labels already name the cause; the probe adds nothing new
                f = self._probe(site, v, {s: w for s, w in probed.items() if s != site},
                                self.sites[site].probe_rounds)
                if f is not None:
                    out[(site, f.kind)] = f
        lossy = {s: e for s, e in self.sites.items() if e.loss_rounds >= 2}  # one round is too noisy to call
        if len(lossy) >= MIN_SITES and not skew:
            for site, ev in lossy.items():
                if any((site, kind) in out for kind in (K.LABEL_NOISE, K.LABEL_FLIP, K.CLASS_MISSING)):
                    continue  # the labels already explain a high loss
                f = self._loss(site, ev, [e.loss_mean() for s, e in lossy.items() if s != site])
                if f is not None:
                    out[(site, f.kind)] = f
        stepped = {s: statistics.median(e.steps) for s, e in self.sites.items() if e.steps}
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

    @staticmethod
    def _reference(others: list[SiteEvidence]) -> tuple[np.ndarray, np.ndarray] | None:
        """(the others' typical class shares, each other site's shares sorted per class), or None.

        Per class, the mean over sites without the highest and the lowest (with 4 or more), so that one faulty site
        among them does not shift the reference (a pooled sum would let a flipped site make a clean one look
        short), while small classes keep an unbiased estimate (a median of a few noisy small counts reads them far
        too low)."""
        each = np.sort(np.array([e.label_mean() / e.n_train for e in others]), axis=0)
        shares = np.clip((each[1:-1] if len(each) >= 4 else each).mean(axis=0), 0.0, None)
        return (shares / shares.sum(), each) if shares.sum() > 0 else None

    @staticmethod
    def _sampling_var(ev: SiteEvidence, p: np.ndarray) -> np.ndarray:
        """Per-cell variance of an honest site's mean label counts if it shared the shares p: multinomial sampling of
        its n examples plus the release noise (its mean over rounds)."""
        n = float(ev.n_train)
        return n * p * (1 - p) + ev.label_var / ev.label_rounds

    def _departure(self, ev: SiteEvidence, ref: tuple[np.ndarray, np.ndarray] | None, n_others: int) -> float:
        """χ² per degree of freedom of the site's label counts against the others' shares, with only the sampling
        variance as the honest spread (~1 when all sites share one label mix)."""
        if ref is None:
            return 0.0
        p, m = ref[0], ev.label_mean()
        var = self._sampling_var(ev, p) * (1 + 1 / n_others)
        return float(np.sum((m - ev.n_train * p) ** 2 / np.maximum(var, 1e-9)) / max(1, len(p) - 1))

    def _labels(self, site: str, ev: SiteEvidence, ref: tuple[np.ndarray, np.ndarray] | None,
                n_others: int) -> Finding | None:
        k = len(ev.labels)
        if ref is None:
            return None
        p, each = ref
        n = float(ev.n_train)
        m = ev.label_mean()
        e = n * p
        # Per-cell spread of an honest site: at least its sampling variance; more where the other sites' shares
        # spread more (label skew between sites, as in natural or Dirichlet partitions, is not a fault).
        # × (1 + 1/m): the reference is itself estimated from m noisy sites.
        spread = (1.4826 * np.median(np.abs(each - np.median(each, axis=0)), axis=0)) ** 2 * n ** 2
        var = np.maximum(self._sampling_var(ev, p), spread) * (1 + 1 / n_others)
        z = (e - m) / np.sqrt(var)
        share = lambda v: f"{v / n:.0%}"  # noqa: E731
        absent = [c for c in range(k) if p[c] >= MIN_SHARE and z[c] >= Z_LABELS and m[c] <= 0.25 * e[c]]
        if absent:
            a = max(absent, key=lambda c: z[c])
            # Where did class a go? Missing: the site's n examples spread over the other classes in proportion.
            # Flipped to b: the other classes as usual and b holding a's share too. The better fit wins; ties go to
            # the simpler "missing" (a flip must fit better by FLIP_MARGIN in χ²).
            rest = [c for c in range(k) if c != a]
            missing = np.zeros(k)
            missing[rest] = n * p[rest] / max(1e-9, p[rest].sum())
            chi_missing = float(np.sum((m - missing) ** 2 / var))
            fits = {}
            for b in rest:
                flipped = n * p
                flipped[b], flipped[a] = n * (p[a] + p[b]), 0.0
                fits[b] = float(np.sum((m - flipped) ** 2 / var))
            b = min(fits, key=fits.get)
            if fits[b] + FLIP_MARGIN <= chi_missing:
                return Finding(
                    K.LABEL_FLIP, "critical",
                    f"{site}: no training examples labelled {self._name(a)} ({share(m[a])}, others {p[a]:.0%}) and "
                    f"{share(m[b])} labelled {self._name(b)} (others {p[b]:.0%}): {self._name(a)} looks relabelled "
                    f"as {self._name(b)} (z = {z[a]:.1f}; χ² {fits[b]:.1f} as a flip vs {chi_missing:.1f} as a "
                    f"missing class, {ev.label_rounds} noised releases)", site, confidence=confidence(float(z[a])))
            return Finding(
                K.CLASS_MISSING, "warning",
                f"{site} holds no training examples of {self._name(a)} ({share(m[a])} vs {p[a]:.0%} at the other "
                f"{n_others} sites; z = {z[a]:.1f} over {ev.label_rounds} noised releases): the model learns "
                "nothing about that class there", site, confidence=confidence(float(z[a])))
        u = np.full(k, n / k)
        d = u - e
        norm2 = float(d @ d)
        if norm2 <= 0:
            return None
        rate = (k - 1) / k * float((m - e) @ d) / norm2
        rate_sd = (k - 1) / k * math.sqrt(float(d @ (var * d))) / norm2
        zr = rate / rate_sd if rate_sd > 0 else 0.0
        if rate >= MIN_NOISE_RATE and zr >= Z_ALARM:
            return Finding(
                K.LABEL_NOISE, "critical",
                f"{site}'s training labels are spread toward uniform ({', '.join(share(v) for v in m)} vs the others' "
                f"{', '.join(f'{v:.0%}' for v in p)}): about {min(rate, 1.0):.0%} of its labels look randomised "
                f"(z = {zr:.1f}, {ev.label_rounds} noised releases)", site, confidence=confidence(zr))
        return None

    def _probe(self, site: str, v: np.ndarray, others: dict[str, np.ndarray], rounds: int) -> Finding | None:
        """How the site's local model behaves on public texts, against the others' (FedDebug's idea: no site data,
        no ε). Only a shape that names a cause is reported: near-uniform where the others are confident (label
        noise), or confident in another class than the others (a flip)."""
        k = len(v)
        ref = np.median(np.stack(list(others.values())), axis=0)
        ref = ref / ref.sum()
        tv = 0.5 * float(np.abs(v - ref).sum())
        typical, spread = median_spread([0.5 * float(np.abs(w - ref).sum()) for w in others.values()])
        z = (tv - typical) / max(PROBE_MIN_MAD, spread)
        if tv < PROBE_TV or z < Z_ALARM:
            return None
        entropy = lambda p: float(-(p * np.log(np.clip(p, 1e-12, 1))).sum() / math.log(k))  # noqa: E731
        mix = ", ".join(f"{x:.0%}" for x in v)
        usual = ", ".join(f"{x:.0%}" for x in ref)
        if entropy(v) >= PROBE_UNIFORM and entropy(ref) <= 0.7:
            return Finding(
                K.LABEL_NOISE, "warning",
                f"{site}'s local model spreads its predictions on public texts almost evenly ({mix}) where the other "
                f"sites' models are confident ({usual}; distance {tv:.2f}, z = {z:.1f} over {rounds} rounds): it "
                "learned from labels that carry little signal (noisy labels)", site, confidence=confidence(z))
        a, b = int(np.argmax(ref)), int(np.argmax(v))
        if a != b and v[b] >= 0.6:
            return Finding(
                K.LABEL_FLIP, "warning",
                f"{site}'s local model predicts {self._name(b)} for {v[b]:.0%} of public texts where the other sites' "
                f"models predict {self._name(a)} ({mix} vs {usual}; z = {z:.1f} over {rounds} rounds): its labels "
                f"look flipped from {self._name(a)} to {self._name(b)}", site, confidence=confidence(z))
        return None

    def _loss(self, site: str, ev: SiteEvidence, others: list[float]) -> Finding | None:
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
