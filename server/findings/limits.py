"""Step 4 → findings, the Findings page: what a quiet diagnosis rules out: the detection limits of the statistical
findings, by site size and release noise.

Measured by `fedlens bench limits` (fedlens/detection_limits.py: synthetic releases through this engine, 40 trials
a cell, 4 rounds; docs/PERFORMANCE.md "Detection limits"): for each kind, the smallest fault rate found with
probability ≥ 0.9 at one site of n rows (train + validation), against the summary σ each ε gives over 4 rounds at
dp.diagnostics-share 0.25. None: not found that often even at the largest rate measured (0.5 for label noise,
1.0 for the others). Re-measure after a rule change and
paste the table here; tests/server/findings/test_limits.py checks one cell against a fresh measurement.

The reading is conservative where a run differs from the table: a site is read at the largest tabulated size not
above its own and at the smallest tabulated σ not below its effective one (its σ × √(4 / its releases): independent
release noise averages down over releases; the sampling spread does not, and the table already holds it at 4).
"""

from __future__ import annotations

from common.rounds import FindingKind as K

SIZES = (150, 500, 1000, 2000, 5000)  # rows a site holds (train + validation)
N = None
# release σ -> (the ε it comes from over 4 rounds, {kind: limit at each of SIZES}); measured 2026-12-02 at Δ = 2
# with the label rules of c277e7a (docs/bench/limits-2026-12-02-c277e7a.json); re-measured with those of 5315855
# and ee48f00, every cell the same (docs/bench/limits-2026-12-02-ee48f00.json)
MEASURED: dict[float, tuple[float, dict[str, tuple[float | None, ...]]]] = {
    29.13: (1.0, {K.LABEL_NOISE: (N, N, N, N, 0.4), K.LABEL_FLIP: (N, N, N, N, 0.7),
                  K.DATA_SHIFT: (N, N, N, N, N), K.DOMAIN_DIFFERENCE: (N, N, N, N, 0.7)}),
    8.09: (4.0, {K.LABEL_NOISE: (N, N, 0.5, 0.3, 0.15), K.LABEL_FLIP: (N, N, 1.0, 0.7, 0.4),
                 K.DATA_SHIFT: (N, N, N, 1.0, 0.7), K.DOMAIN_DIFFERENCE: (N, N, 1.0, 0.4, 0.2)}),
    4.30: (8.0, {K.LABEL_NOISE: (N, N, 0.4, 0.2, 0.15), K.LABEL_FLIP: (N, N, 0.7, 0.4, 0.3),
                 K.DATA_SHIFT: (N, N, 1.0, 0.7, 0.5), K.DOMAIN_DIFFERENCE: (N, 1.0, 0.4, 0.2, 0.15)}),
    2.32: (16.0, {K.LABEL_NOISE: (N, 0.4, 0.3, 0.15, 0.15), K.LABEL_FLIP: (N, 1.0, 0.5, 0.4, 0.4),
                  K.DATA_SHIFT: (N, N, 1.0, 0.7, 0.5), K.DOMAIN_DIFFERENCE: (N, 0.5, 0.3, 0.15, 0.15)}),
}
MAX_RATE = {K.LABEL_NOISE: 0.5}  # the largest rate measured (beyond half the labels, noise is a relabelling)
WHAT = {K.LABEL_NOISE: "label noise (a share of the labels replaced by a random other one)",
        K.LABEL_FLIP: "a flip (a share of one class relabelled as another)",
        K.DATA_SHIFT: "a data shift (a share of the texts the model reads as corrupted or foreign)",
        K.DOMAIN_DIFFERENCE: "texts of another domain the model reads as well as its own (a share of them as far "
                             "from the site's as drug reviews are from movie snippets)"}


ROUNDS = 4  # releases per site in the measurement


def effective_sigma(release_sigma: float, releases: int) -> float:
    """The σ that, over ROUNDS releases, averages to the same noise as `releases` releases at `release_sigma`
    (independent noise averages down as 1/√releases)."""
    return release_sigma * (ROUNDS / max(releases, 1)) ** 0.5


def limits(n: int | None, release_sigma: float | None, releases: int = ROUNDS) -> dict[str, float | None] | None:
    """Each kind's detection limit at a site of `n` rows after `releases` summaries at `release_sigma` (0 = exact:
    read at the least noisy tabulated σ); None when the site is smaller or noisier than anything measured."""
    if not n or release_sigma is None:
        return None
    sigma = effective_sigma(release_sigma, releases)
    sizes = [i for i, s in enumerate(SIZES) if s <= n]
    sigmas = sorted(s for s in MEASURED if s >= sigma - 1e-3)
    if not sizes or not sigmas:
        return None
    _, table = MEASURED[sigmas[0]]
    return {kind: row[sizes[-1]] for kind, row in table.items()}


def sentence(n: int | None, release_sigma: float | None, releases: int = ROUNDS) -> str:
    """What a quiet page rules out at this site, in words."""
    found = limits(n, release_sigma, releases)
    if found is None:
        return (f"at {n or '?'} rows and {releases} summaries at σ {release_sigma or 0:.1f} this site is smaller or "
                "noisier than anything measured: a quiet page rules out nothing here")
    parts = [f"{WHAT[k]} below {v:.0%}" if v is not None else
             f"{WHAT[k]} at any share up to {MAX_RATE.get(k, 1.0):.0%}" for k, v in found.items()]
    return (f"at {n} rows and {releases} summaries at σ {release_sigma:.1f}, these cannot be seen (found in fewer "
            f"than 9 runs of 10): {'; '.join(parts)}")
