"""Step 4 at the server, for step 2: the class prior of the sites' loss, from what they released (never from a site's exact counts).

Logit adjustment needs the label distribution the global model is trained towards. The sites' exact counts must not
enter the loss (client/train.balanced_loss), so the server estimates it from releases that are already paid for:
each site's census (once) and the train-label block of each of its noised summaries. A site's train labels do not
change between rounds, so every release is another noisy look at the same counts. They are combined per site with
inverse-variance weights and pooled over sites. All of it is post-processing: no ε.
"""

from __future__ import annotations

import numpy as np

from server.aggregate import caps

EXACT_STD = 1e-6  # a release claiming less noise than this is taken as exact (a run without DP)


class LabelCounts:
    """Per site, the inverse-variance mean of its released train-label counts; pooled, the prior.

    `max_ratio` (server.max-weight-ratio) bounds what one site can do to the prior, as it bounds its FedAvg weight:
    in the pooled counts a site's total counts at most `max_ratio` × the median of the other sites' totals (0: no
    cap). Without it, one site releasing 10⁹ "exact" examples of one class set every site's loss prior.
    """

    def __init__(self, max_ratio: float = 0.0) -> None:
        self.max_ratio = max_ratio
        self.weighted: dict[str, np.ndarray] = {}  # site -> Σ counts / var
        self.precision: dict[str, float] = {}  # site -> Σ 1 / var

    def add(self, site: str, counts: np.ndarray, std: float) -> None:
        """One release of `site`'s train-label counts, each cell with noise std `std` (0: exact, a non-DP run).
        A release that is not finite is ignored (the reply's checks refuse one before it gets here)."""
        counts = np.asarray(counts, dtype=np.float64)
        if not np.all(np.isfinite(counts)) or not np.isfinite(std):
            return
        if std <= EXACT_STD:  # exact counts replace any noisy estimate
            self.weighted[site], self.precision[site] = counts * 1e12, 1e12
            return
        w = 1.0 / std ** 2
        self.weighted[site] = self.weighted.get(site, np.zeros_like(counts)) + counts * w
        self.precision[site] = self.precision.get(site, 0.0) + w

    def pooled(self) -> np.ndarray | None:
        """Estimated train examples per label over all sites that released any (None before the first); a site
        whose total (negative noised cells as 0) is beyond `max_ratio` × the others' median is scaled down to it."""
        if not self.weighted:
            return None
        each = {s: self.weighted[s] / self.precision[s] for s in self.weighted}
        totals = {s: float(np.clip(v, 0.0, None).sum()) for s, v in each.items()}
        for s, cap in caps(totals, self.max_ratio).items():
            each[s] = each[s] * (cap / totals[s])
        return sum(each.values())

    def prior(self) -> list[float] | None:
        """The smoothed label distribution (negative noised cells count as 0; a class with none is rare, not
        impossible), as client/train.prior_from_counts computes it."""
        pooled = self.pooled()
        return None if pooled is None else fixed_prior(pooled)

    def to_state(self) -> dict:
        return {s: {"weighted": self.weighted[s].tolist(), "precision": self.precision[s]} for s in self.weighted}

    @classmethod
    def from_state(cls, state: dict | None, max_ratio: float = 0.0) -> LabelCounts:
        out = cls(max_ratio)
        for site, v in (state or {}).items():
            out.weighted[site], out.precision[site] = np.asarray(v["weighted"]), float(v["precision"])
        return out


def fixed_prior(counts: np.ndarray) -> list[float]:
    """The smoothed prior of counts (released, or the server's own labelled data): negative noised cells count as
    0, and a class with none is rare, not impossible."""
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    return ((c + 1.0) / (c.sum() + len(c))).tolist()
