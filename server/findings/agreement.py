"""Step 4 → findings from per-class agreement: how the model every site received labels a site's own texts, against
the labels those texts carry.

Each site releases two confusions per round, rows = given label, columns = prediction of a model everyone holds:
its validation split at the round's global model, its train split at the model it received (first use). Read
*per given label*, a confusion does not depend on the site's label mix: a site that only holds more of one class
reads, row by row, like the others (the label mix is then a difference, not a fault). Wrong labels do not: a
relabelled example keeps the text of its true class, and the model predicts that class.

For site s at each (round, split), with the other sites' row-normalised rates R (cell-wise median, so one faulty
site among them cannot move it) and the site's own row totals n_i, the expected counts are n_i·R_ij; the departure
D = C − n·R is summed over rounds. Its diagonal gives the **excess disagreement** x (the share of the site's examples
on which the model disagrees with the label beyond what the others show); at a label-noise rate r,
x ≈ r·(a − b), a the model's agreement and b its agreement with a wrong label, so r̂ = x / (a − b). Its noise is
known (cell std, public); the sampling spread is multinomial; honest sites' heterogeneity is read off the others'
own x. The off-diagonal pattern says which labels went wrong: one cell (given b, predicted a) is a flip a → b,
two transposed cells a swap, a spread is noise. A release is read only where its model tells the classes apart
(`separates`, at the median of the other sites): at the initial model, or one that predicts one class for every
text, every label reads alike and a site's label mix alone would depart.

Label-free, the same confusions' column sums and the validation confidence histogram (the calibration block, both
rows) show what the model makes of the *inputs*: with wrong labels its confidence is the others'; with corrupted or
foreign texts it drops. That separates label faults from data shifts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.findings.evidence import SiteEvidence, scale_against


@dataclass(frozen=True)
class Agreement:
    """One site's per-class agreement against the others', accumulated over its releases."""

    excess: float  # x: share of its examples the model disagrees with beyond the others' rate
    scale: float  # x's standard error (noise, sampling, the others' spread, the reference's error)
    rate: float  # r̂ = x / (a − b): the estimated share of wrong labels
    pattern: np.ndarray  # [K, K] mean departure per example (rows given, columns predicted), diagonal zeroed
    entries: int  # (round, split) releases that went in
    # Label-free: the drop of its mean confidence below the others' median, and that drop's z-score.
    confidence_drop: float = 0.0
    confidence_z: float = 0.0
    # The confident disagreements alone (validation, Cleanlab's confident joint): their share above the others'
    # median, and its z-score. Honest sites differ less here than in plain agreement (a harder domain adds
    # unsure errors, wrong labels confident ones).
    confident_excess: float = 0.0
    confident_z: float = 0.0
    # Disagreement at equal confidence (validation calibration block): per confidence bin, the share of
    # predictions that disagree with the label against the others' share in that bin. A site whose texts are only
    # harder fills the low bins, and reads as the others bin by bin; wrong labels add disagreement in every bin.
    calibrated_excess: float = 0.0
    calibrated_z: float = 0.0
    # The disagreement its confidence does not explain: excess − confidence drop. For a calibrated model harder
    # texts lower agreement and confidence alike (measured on the natural movie partition, the honest sites'
    # spread halves), while wrong labels lower agreement alone. The label tests read this.
    unexplained: float = 0.0
    unexplained_z: float = 0.0

    @property
    def z(self) -> float:
        return self.excess / self.scale if self.scale > 0 else 0.0


def _rates(c: np.ndarray) -> np.ndarray:
    """Row-normalised rates of a noised confusion (clamped at 0); NaN rows where a site holds (almost) none."""
    c = np.clip(c, 0.0, None)
    rows = c.sum(axis=1, keepdims=True)
    return np.divide(c, rows, out=np.full(c.shape, np.nan), where=rows >= 1.0)


def _entry(c: np.ndarray, var: float, n: float, ref: np.ndarray) -> tuple[float, float, float, float, np.ndarray]:
    """One release against the reference rates: (x, its noise variance, its sampling variance, a − b, pattern)."""
    k = len(c)
    rows = np.clip(c.sum(axis=1), 0.0, None)
    ok = ~np.isnan(ref).any(axis=1)
    r = np.where(ok[:, None], np.nan_to_num(ref), 0.0)
    d = np.where(ok[:, None], c - rows[:, None] * r, 0.0)
    diag = np.diag(r)
    x = -float(np.trace(d)) / n
    # D_ii = (1 − R_ii)·C_ii − R_ii·Σ_{j≠i} C_ij: independent cells of variance `var`.
    noise = var * float(np.sum(ok * ((1 - diag) ** 2 + (k - 1) * diag ** 2))) / n ** 2
    sampling = float(np.sum(ok * rows * diag * (1 - diag))) / n ** 2
    a = float(np.sum(rows * diag)) / max(rows.sum(), 1.0)
    # A wrong label i on a text of class j is agreed with at the rate R_ji: b averages that over j ≠ i.
    wrong = np.array([np.mean([r[j, i] for j in range(k) if j != i]) if k > 1 else 0.0 for i in range(k)])
    b = float(np.sum(rows * wrong)) / max(rows.sum(), 1.0)
    pattern = d / n
    np.fill_diagonal(pattern, 0.0)
    return x, noise, sampling, a - b, pattern


def agreements(sites: dict[str, SiteEvidence]) -> dict[str, Agreement]:
    """Every site's Agreement, each against the other sites' releases of the same (round, split)."""
    keys = sorted({key for ev in sites.values() for key in ev.confusions})
    raw: dict[str, list[tuple[float, float, float, float, np.ndarray]]] = {s: [] for s in sites}
    for key in keys:
        held = {s: ev.confusions[key] for s, ev in sites.items() if key in ev.confusions}
        if len(held) < 3:
            continue
        rates = {s: _rates(c) for s, (c, _, _) in held.items()}
        seps = {s: separation(c) for s, (c, _, _) in held.items()}
        for s, (c, var, n) in held.items():
            # Judged on the others alone: a site's own wrong labels must not switch off its reading.
            if n <= 0 or not _separated([v for t, v in seps.items() if t != s]):
                continue
            with np.errstate(all="ignore"), _quiet():
                ref = np.nanmedian(np.stack([rates[o] for o in held if o != s]), axis=0)
            ref = ref / ref.sum(axis=1, keepdims=True)
            raw[s].append(_entry(c, var, n, ref))
    out: dict[str, Agreement] = {}
    means = {s: _pooled(v)[0] for s, v in raw.items() if v}
    conf_means = {s: (float(np.mean([m for m, _ in ev.confidence])),
                      sum(var for _, var in ev.confidence) / len(ev.confidence) ** 2)
                  for s, ev in sites.items() if ev.confidence}
    conf = _against_others({s: ev.confidence for s, ev in sites.items()}, sign=-1.0)
    issues = _against_others({s: ev.issues for s, ev in sites.items()}, sign=1.0)
    calibrated = _against_others(_calibrated(sites), sign=1.0)
    for s, v in raw.items():
        if not v or len(means) < 3:
            continue
        x_s, own, gap, pattern = _pooled(v)
        typical, scale = scale_against([m for o, m in means.items() if o != s], own)
        x = x_s - typical
        drop, drop_z = conf.get(s, (0.0, 0.0))
        sure, sure_z = issues.get(s, (0.0, 0.0))
        u, u_z = _unexplained(s, means, conf_means, own)
        cal, cal_z = calibrated.get(s, (0.0, 0.0))
        out[s] = Agreement(excess=x, scale=scale, rate=x / gap if gap > 0.05 else 0.0, pattern=pattern,
                           entries=len(v), confidence_drop=drop, confidence_z=drop_z, confident_excess=sure,
                           confident_z=sure_z, calibrated_excess=cal, calibrated_z=cal_z, unexplained=u,
                           unexplained_z=u_z)
    return out


def _unexplained(site: str, agree: dict[str, float], conf: dict[str, tuple[float, float]],
                 own_agree: float) -> tuple[float, float]:
    """(the site's disagreement beyond the others' that its confidence does not explain, its z-score): per site
    u = −agreement − confidence (both relative to nothing: the others' median is taken of u itself)."""
    if site not in conf:
        return 0.0, 0.0
    u = {s: agree[s] + conf[s][0] for s in agree if s in conf}  # x is disagreement: add the confidence back
    others = [v for s, v in u.items() if s != site]
    if len(others) < 2:
        return 0.0, 0.0
    typical, scale = scale_against(others, math.sqrt(own_agree ** 2 + conf[site][1]))
    d = u[site] - typical
    return d, d / scale if scale > 0 else 0.0


# Agreement with a text's label beyond agreement with a wrong one (a − b), balanced over the classes, that the median
# site's release must reach for its per-class reading to say anything about labels: the excess disagreement of wrong
# labels is r·(a − b), so at a model near chance every label reads alike. At 0.2: a binary model right 60 % of the
# time per class, a 3-class one 47 %. Below it sat every round-1 train split (the initial model), a model that
# predicted one class for every text (a Dirichlet run whose largest site held one class, where a site holding the
# other read as relabelled), and one an averaged-in overfitting update held at 52–58 % test accuracy.
MIN_SEPARATION = 0.2
MIN_SHARE = 0.05  # of a release's examples: a label it holds less of is not read for its separation


def separation(c: np.ndarray) -> float | None:
    """a − b of one release (rows given, columns predicted), balanced over the labels it holds at least MIN_SHARE
    of (a label it holds none of is a row of release noise); None with fewer than two such labels."""
    c = np.clip(c, 0.0, None)
    rows = c.sum(axis=1)
    r = _rates(c)
    ok = ~np.isnan(r).any(axis=1) & (rows >= MIN_SHARE * max(float(rows.sum()), 1.0))
    if ok.sum() < 2:
        return None
    k = len(r)
    a = float(np.mean(np.diag(r)[ok]))
    b = float(np.mean([r[j, i] for i in range(k) for j in range(k) if j != i and ok[i] and ok[j]]))
    return a - b


def separates(confusions: list[np.ndarray]) -> bool:
    """The model behind these releases (one per site) tells the classes apart: the median site's separation is
    ≥ MIN_SEPARATION (noised counts: post-processing). The median, not the pool: a large site with wrong labels
    must not make the model look blind at the others."""
    return _separated([separation(c) for c in confusions])


def _separated(separations: list[float | None]) -> bool:
    values = [v for v in separations if v is not None]
    return bool(values) and float(np.median(values)) >= MIN_SEPARATION


def _pooled(v: list[tuple[float, float, float, float, np.ndarray]]) -> tuple[float, float, float, np.ndarray]:
    """(x, its standard error, a − b, pattern) over a site's releases, each weighted by its inverse variance.
    The release noise is independent between releases and averages down; the sampling spread is not (the same
    examples every round), so it is kept at its weighted mean."""
    w = np.array([1.0 / max(e[1] + e[2], 1e-12) for e in v])
    w = w / w.sum()
    x = float(np.sum(w * [e[0] for e in v]))
    se = math.sqrt(float(np.sum(w ** 2 * [e[1] for e in v])) + float(np.sum(w * [e[2] for e in v])))
    gap = float(np.sum(w * [e[3] for e in v]))
    pattern = np.tensordot(w, np.stack([e[4] for e in v]), axes=1)
    return x, se, gap, pattern


def _calibrated(sites: dict[str, SiteEvidence]) -> dict[str, list[tuple[float, float]]]:
    """Per site and round: (its disagreements beyond the others' per-bin rate, as a share of its examples, that
    share's noise variance). Bins where the others hold fewer than MIN_BIN examples are left out."""
    out: dict[str, list[tuple[float, float]]] = {s: [] for s in sites}
    rounds = sorted({r for ev in sites.values() for r in ev.calibration})
    for r in rounds:
        held = {s: ev.calibration[r] for s, ev in sites.items() if r in ev.calibration}
        if len(held) < 3:
            continue
        seps = {s: separation(ev.confusions[(r, "val")][0]) for s, ev in sites.items() if (r, "val") in ev.confusions}
        for s, (cal, var) in held.items():
            if seps and not _separated([v for o, v in seps.items() if o != s]):
                continue
            others = np.stack([np.clip(c, 0.0, None) for o, (c, _) in held.items() if o != s])
            total = others.sum(axis=(0, 1))
            live = total >= MIN_BIN
            w = np.divide(others[:, 1].sum(axis=0), total, out=np.zeros(len(total)), where=live)
            n = float(max(cal.sum(), 1.0))
            # Σ_b wrong_b − w_b·(right_b + wrong_b) = Σ_b (1 − w_b)·wrong_b − w_b·right_b: independent cells.
            d = float(np.sum(live * ((1 - w) * cal[1] - w * cal[0])))
            out[s].append((d / n, var * float(np.sum(live * ((1 - w) ** 2 + w ** 2))) / n ** 2))
    return out


MIN_BIN = 30.0  # examples the other sites must hold in a confidence bin for its rate to be a reference


def _against_others(readings: dict[str, list[tuple[float, float]]], *, sign: float) -> dict[str, tuple[float, float]]:
    """(sign × (the site's mean reading − the others' median), its z-score) per site, from per-round (value,
    noise variance) readings: the others' spread, at least the site's own noise, and the reference's error."""
    means = {s: (float(np.mean([m for m, _ in r])), sum(v for _, v in r) / len(r) ** 2)
             for s, r in readings.items() if r}
    out = {}
    for s, (m, var) in means.items():
        others = [v for o, (v, _) in means.items() if o != s]
        if len(others) < 2:
            continue
        typical, scale = scale_against(others, math.sqrt(var))
        d = sign * (m - typical)
        out[s] = (d, d / scale if scale > 0 else 0.0)
    return out


class _quiet:
    """nanmedian warns on a column no other site holds; that row is dropped (NaN) on purpose."""

    def __enter__(self):  # noqa: ANN204
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self._w.__exit__(*exc)


# Which labels went wrong, from the pattern's positive off-diagonal mass.
FLIP_SHARE = 0.7  # one cell holding this share of the excess: a flip (given b, predicted a: a relabelled as b)
# On two classes uniform noise fills both cells in proportion to the classes' shares, so one holds up to ~0.75 of
# the excess at a 75/25 mix; a flip fills one cell only. Between the two:
FLIP_SHARE_TWO = 0.9
SWAP_SHARE = 0.8  # two transposed cells holding this share (and each ≥ a quarter): a swap


def kind_of(pattern: np.ndarray) -> tuple[str, int, int]:
    """("flip" | "swap" | "noise", a, b) from the off-diagonal departure (rows given, columns predicted): a flip
    a → b shows as texts of class a carrying label b, i.e. the cell (b, a)."""
    p = np.clip(pattern, 0.0, None)
    total = float(p.sum())
    if total <= 0:
        return "noise", 0, 0
    given, pred = np.unravel_index(int(np.argmax(p)), p.shape)
    a, b = int(pred), int(given)  # texts of class a (predicted a) labelled b
    top = p[b, a] / total
    back = p[a, b] / total
    k = len(p)
    if k > 2 and top + back >= SWAP_SHARE and back >= 0.25 * (top + back):
        return "swap", a, b
    if top >= (FLIP_SHARE_TWO if k == 2 else FLIP_SHARE):
        return "flip", a, b
    return "noise", a, b
