"""Step 4: aggregation. One function per rule (FedAvg, coordinate-wise median, trimmed mean, Multi-Krum, as Flower
keeps one strategy per file), the checks an update must pass first, and the geometry of the round's updates.

Plain NumPy on {name: array} dicts: the round loop (server/strategy.py) and What-if (server/whatif.py) call the same
functions, so What-if re-aggregates a round with the rule the run used.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

Arrays = OrderedDict[str, np.ndarray]
Updates = dict[str, tuple[Arrays, float]]  # site -> (its weights, its weight in the average: examples × multiplier)
RULES = ("fedavg", "median", "trimmed-mean", "krum")
MIN_ROBUST_SITES = 3  # with fewer updates every rule falls back to FedAvg (a median of two is their mean)


def fedavg(updates: Updates) -> Arrays:
    """The example-weighted mean of each array (float64 accumulation, float32 out)."""
    total = sum(n for _, n in updates.values())
    if not updates or total <= 0:
        raise ValueError(f"cannot average {len(updates)} update(s) with {total} examples in total")
    first = next(iter(updates.values()))[0]
    out: Arrays = OrderedDict()
    for key in first:
        acc = np.zeros(first[key].shape, dtype=np.float64)
        for arrays, n in updates.values():
            acc += arrays[key].astype(np.float64) * (n / total)
        out[key] = acc.astype(np.float32)
    return out


def median(updates: Updates) -> tuple[Arrays, dict[str, float]]:
    """Coordinate-wise median, unweighted (Flower's FedMedian); a site's score is the share of its values that sat
    in the middle (rank (n − 1) // 2 .. n − 1 − that)."""
    return _coordinate_wise(updates, lambda stacked: np.median(stacked, axis=0), cut=(len(updates) - 1) // 2)


def trimmed_mean(updates: Updates, *, trim_fraction: float = 0.2) -> tuple[Arrays, dict[str, float]]:
    """Coordinate-wise mean without the int(trim_fraction · n) lowest and highest values (Flower's FedTrimmedAvg,
    unweighted); a site's score is the share of its values the mean kept."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"server.trim-fraction must be in [0, 0.5), got {trim_fraction}")
    cut = int(trim_fraction * len(updates))

    def rule(stacked: np.ndarray) -> np.ndarray:
        n = stacked.shape[0]
        # Partitioning at the two cut points puts the kept values between them, in any order (as scipy does).
        part = np.partition(stacked, (cut, n - cut - 1), axis=0)
        return np.mean(part[cut:n - cut], axis=0)

    return _coordinate_wise(updates, rule, cut=cut)


def krum(updates: Updates, *, byzantine: int = 1) -> tuple[Arrays, dict[str, float]]:
    """Multi-Krum (as Flower's MultiKrum): each site's score is the sum of squared distances to its n − f − 2
    nearest updates; the n − f best are averaged by examples."""
    sites = list(updates)
    flat = np.stack([_flat(updates[s][0]) for s in sites])
    sq = np.square(flat).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0.0)
    near = max(1, len(sites) - byzantine - 2)
    scores = {s: float(np.sort(dist[i])[1:near + 1].sum()) for i, s in enumerate(sites)}
    return fedavg({s: updates[s] for s in krum_selection(scores, byzantine=byzantine)}), scores


def krum_selection(scores: dict[str, float], *, byzantine: int) -> list[str]:
    """The n − f sites with the lowest Krum scores: the ones Multi-Krum averages."""
    return sorted(scores, key=scores.get)[:max(1, len(scores) - byzantine)]


def aggregate(updates: Updates, rule: str, *, trim_fraction: float = 0.2,
              byzantine: int = 1) -> tuple[Arrays, dict[str, float]]:
    """The new global weights under `rule` (server.aggregation), and each site's score under it ({} for FedAvg)."""
    if rule == "fedavg" or len(updates) < MIN_ROBUST_SITES:
        return fedavg(updates), {}
    if rule == "krum":
        return krum(updates, byzantine=byzantine)
    if rule == "median":
        return median(updates)
    if rule == "trimmed-mean":
        return trimmed_mean(updates, trim_fraction=trim_fraction)
    raise ValueError(f"server.aggregation must be one of {', '.join(RULES)}, got {rule!r}")


def _coordinate_wise(updates: Updates, rule, *, cut: int) -> tuple[Arrays, dict[str, float]]:  # noqa: ANN001
    """Apply a coordinate-wise rule to each array; score each site by the share of its values ranked inside
    [cut, n − cut)."""
    sites = list(updates)
    n = len(sites)
    out: Arrays = OrderedDict()
    kept = np.zeros(n)
    total = 0
    for key in updates[sites[0]][0]:
        stacked = np.stack([updates[s][0][key].astype(np.float64) for s in sites])
        out[key] = rule(stacked).astype(np.float32)
        rank = np.argsort(np.argsort(stacked, axis=0, kind="stable"), axis=0)
        kept += ((rank >= cut) & (rank < n - cut)).reshape(n, -1).sum(axis=1)
        total += stacked[0].size
    return out, {s: float(kept[i] / total) for i, s in enumerate(sites)}


# --- what an update must pass, and what the server reads off the round's updates ------------------------------

MIN_SITES_TO_CAP = 3  # a site's value is judged against the median of at least two others


def caps(values: dict[str, float], ratio: float) -> dict[str, float]:
    """site -> its bound, for each site whose value is beyond `ratio` × the median of the other sites' values
    (server.max-weight-ratio: a site's FedAvg weight, its label counts in the pooled prior). A site's counts are its
    own word; uncapped, one claiming 10⁹ would own the average. None with ratio 0 or fewer than MIN_SITES_TO_CAP."""
    if ratio <= 0 or len(values) < MIN_SITES_TO_CAP:
        return {}
    out = {}
    for site, v in values.items():
        cap = ratio * statistics.median(o for s, o in values.items() if s != site)
        if v > cap > 0:
            out[site] = cap
    return out


def check_update(arrays: Arrays, reference: Arrays) -> str:
    """Why an update cannot be aggregated ("" when it can): keys, shapes and finiteness against the global model."""
    if list(arrays) != list(reference):
        missing = sorted(set(reference) - set(arrays))[:3]
        extra = sorted(set(arrays) - set(reference))[:3]
        return f"weights do not match the global model (missing {missing}, unexpected {extra})"
    for key, ref in reference.items():
        a = arrays[key]
        if a.shape != ref.shape:
            return f"weight {key} has shape {a.shape}, expected {ref.shape}"
        if not np.all(np.isfinite(a)):
            return f"weight {key} contains NaN or Inf"
    return ""


def update_norm(arrays: Arrays, reference: Arrays) -> float:
    return float(math.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - reference[k]) ** 2)) for k in reference)))


def noise_scale(arrays: Arrays, reference: Arrays, *, noise_multiplier: float, max_grad_norm: float, steps: int,
                expected_batch: float) -> float | None:
    """The step size a site's update shows in its DP noise alone: ‖Σ_k Δw_k‖ of the final classification layer
    (rows k = classes, with its bias) × B / (σ·C·√(steps·K·(D+1))).

    For cross-entropy the gradient of the logits sums to 0 over the classes, and so does every example's clipped
    gradient of the final layer: along Σ_k there is no signal, only the noise DP-SGD adds (std σ·C / B per
    coordinate and step, B the public expected batch). Plain SGD moves that component by lr × the noise, so this
    reads the learning rate a site really used: the same at every honest site whatever its data or label mix (a
    skewed site's update is larger, not noisier), within ~1/√(2D) ≈ 4 %. None when it cannot be read (no DP, no
    steps, no recognisable final layer)."""
    if noise_multiplier <= 0 or steps <= 0 or expected_batch <= 0 or max_grad_norm <= 0:
        return None
    weights = [k for k in reference if "classifier" in k and k.endswith("weight") and reference[k].ndim == 2]
    if not weights:
        return None
    key = weights[-1]
    bias = key[: -len("weight")] + "bias"
    delta = arrays[key].astype(np.float64) - reference[key]
    summed = delta.sum(axis=0)
    coords = delta.shape[1]
    if bias in reference:
        summed = np.append(summed, float(np.sum(arrays[bias].astype(np.float64) - reference[bias])))
        coords += 1
    k = delta.shape[0]
    return float(np.linalg.norm(summed) * expected_batch / (noise_multiplier * max_grad_norm
                                                           * math.sqrt(steps * k * coords)))


def update_geometry(updates: dict[str, Arrays], reference: Arrays) -> dict[str, tuple[float, float]]:
    """Per site, the cosine of its update (weights − reference) to the mean and to the coordinate-wise median of the
    *other* sites' updates (leave-one-out: a site's own update inside the mean would pull its cosine to ~1/√n even
    when every update is pure noise). Needs 3 sites or more; {} otherwise.

    Under DP an honest update is mostly noise, so honest cosines sit near 0 (|cos| ≤ 0.005 measured on MiniLM
    LoRA at σ ≈ 1); what stands out is a site that agrees with nobody in a run where the others agree, or one
    pointing against them."""
    sites = list(updates)
    if len(sites) < MIN_ROBUST_SITES:
        return {}
    flat = np.stack([_flat(updates[s], reference) for s in sites]) - _flat(reference)
    total = flat.sum(axis=0)
    out = {}
    for i, site in enumerate(sites):
        others = np.delete(flat, i, axis=0)
        out[site] = (_cosine(flat[i], (total - flat[i]) / len(others)), _cosine(flat[i], np.median(others, axis=0)))
    return out


def _flat(arrays: Arrays, keys: Iterable[str] | None = None) -> np.ndarray:
    """All travelling values of a model as one float64 vector, in `keys`' order (default: its own)."""
    return np.concatenate([arrays[k].astype(np.float64).ravel() for k in (keys or arrays)])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
