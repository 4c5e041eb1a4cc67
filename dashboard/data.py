"""Step 6's data layer: the run store -> pandas DataFrames for the pages (cached briefly so live runs stay fresh)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from common import run_store, run_views

TTL_SECONDS = 2  # a new round shows within a couple of seconds; the store is cheap to read
SITES_VAL, SITES_TRAIN = "sites' validation (noised)", "sites' train (noised)"  # the global curves' noised sources


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def runs(store: str) -> pd.DataFrame:
    """One row per run, newest first. Empty when the store does not exist yet or holds no run."""
    if not Path(store).is_file():
        return pd.DataFrame()
    frame = pd.DataFrame(run_store.list_runs(store))
    if not frame.empty:
        frame["started"] = pd.to_datetime(frame["started_at"], unit="s").dt.strftime("%Y-%m-%d %H:%M")
    return frame


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def run(store: str, run_id: str) -> dict:
    """One run as a consistent snapshot: run fields + DataFrames of rounds, site rows, sites, events, findings,
    ledger; `site_views` (list[SiteView]) and `cfg` (its AppConfig)."""
    raw = run_store.load_run(store, run_id)
    # Every list (rounds, site_rounds, sites, events, findings, ledger) becomes a DataFrame; the per-site views and
    # the config tree are derived from the same snapshot, as `fedlens report` derives them (common/run_views.py).
    snap = {k: pd.DataFrame(v) if isinstance(v, list) else v for k, v in raw.items()}
    snap["site_views"] = run_views.site_views(raw)
    snap["cfg"] = run_views.run_config(raw)
    snap["diagnostics_share"] = run_views.diagnostics_share(raw)
    return snap


def global_curves(rounds: pd.DataFrame) -> pd.DataFrame:
    """Long format (round, metric, source, value) for the global charts."""
    if rounds.empty:
        return pd.DataFrame(columns=["round", "metric", "source", "value"])
    parts = []
    for col, metric, source in [("test_accuracy", "accuracy", "server test set"),
                                ("test_macro_f1", "macro-F1", "server test set"),
                                ("test_loss", "loss", "server test set"),
                                ("accuracy", "accuracy", SITES_VAL),
                                ("macro_f1", "macro-F1", SITES_VAL),
                                ("loss", "loss", SITES_VAL),
                                ("train_loss", "loss", SITES_TRAIN)]:
        if col in rounds and rounds[col].notna().any():
            parts.append(pd.DataFrame({"round": rounds["round"], "metric": metric, "source": source,
                                       "value": rounds[col]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["round", "metric", "source", "value"])


def noise_bands(snapshot: dict) -> pd.DataFrame:
    """(round, metric, source, std): the known noise std of the sites' noised global accuracy and losses per round.

    Public: each release's σ (its evaluate row), the block's Δ and weight (common/diagnostics.noise_std) and the
    sites' released sizes. The global accuracy is Σ diagonal counts / Σ n_val over the sites' summed confusions,
    so its noise std is √(Σ_sites K·s_conf²) / Σ n_val; the validation loss L·√(Σ s_val_loss²) / Σ n_val; the train
    loss the same over the train sizes of the sites that released one. First order: the clamping and projection
    onto public totals in `derive` are left out (they shrink the noise, so the band is a little wide)."""
    from common import diagnostics as dg

    rows, cfg = snapshot["site_rounds"], snapshot["cfg"]
    cols = ["round", "metric", "source", "std"]
    if rows.empty or "noise_multiplier" not in rows or not cfg.dp.enabled:
        return pd.DataFrame(columns=cols)
    k, clip = len(cfg.data.labels), float(cfg.dp.loss_clip)
    sizes = {r["site"]: r["n_train"] for r in snapshot["sites"].to_dict("records")} if not snapshot["sites"].empty \
        else {}
    ev = rows[(rows["phase"] == "evaluate") & (rows["status"] == "ok") & (rows["noise_multiplier"] > 0)]
    out = []
    for rnd, group in ev.groupby("round"):
        models = int(((rows["round"] == rnd) & (rows["phase"] == "train") & (rows["status"] == "ok")).sum()) \
            if cfg.server.cross_site_eval else 0
        stds = [dg.noise_std(float(sigma), models) for sigma in group["noise_multiplier"]]
        n_val = float(group["num_examples"].fillna(0).sum())
        n_train = float(sum(sizes.get(site) or 0 for site in group["site"]))
        if n_val > 0:
            out.append((rnd, "accuracy", SITES_VAL, (sum(k * s["confusion"] ** 2 for s in stds)) ** 0.5 / n_val))
            out.append((rnd, "loss", SITES_VAL, clip * sum(s["val_loss_sum"] ** 2 for s in stds) ** 0.5 / n_val))
        if n_train > 0:
            out.append((rnd, "loss", SITES_TRAIN, clip * sum(s["train_loss_sum"] ** 2 for s in stds) ** 0.5 / n_train))
    return pd.DataFrame(out, columns=cols)


def majority_share(summaries_: dict[str, dict]) -> float | None:
    """The share of the most common class in the sites' validation splits (the rows of their summed, noised
    confusion matrices): the accuracy of a model that always predicts it. None without summaries."""
    totals: list[float] | None = None
    for s in summaries_.values():
        if s.get("confusion"):
            rows = [float(sum(r)) for r in s["confusion"]]
            totals = rows if totals is None else [a + b for a, b in zip(totals, rows, strict=False)]
    return max(totals) / sum(totals) if totals and sum(totals) > 0 else None


# The Sites page shows site_table in groups of at most MAX_COLUMNS columns, each readable at 1280 px (the whole row is
# ~25 columns): an overview first, then one tab per question, each with the round its values come from.
SITE_OVERVIEW = ("site", "health", "status", "latest round", "train examples", "accuracy", "macro-F1", "ε spent")
SITE_GROUPS = {
    "Quality": ("site", "accuracy", "macro-F1", "val loss", "train loss", "metrics round"),
    "Errors & DP health": ("site", "ECE", "label issues", "clipped", "signal / noise", "summary round"),
    "Updates": ("site", "update norm", "update cosine", "σ (DP-SGD)", "update round"),
    "Privacy": ("site", "ε spent", "ε budget", "ε training", "ε diagnostics", "lifetime ε", "lifetime cap"),
    "Failures": ("site", "status", "latest round", "reason", "failure"),
}
MAX_COLUMNS = 8


def site_table(snapshot: dict) -> pd.DataFrame:
    """One row per site: size, status, latest metrics, ε spent vs budget and lifetime, DP health, its update, and
    the round each group of values comes from (a site's newest summary may be older than its newest round)."""
    cfg = snapshot["cfg"]
    budget = float(cfg.dp.target_epsilon) if cfg.dp.enabled else None
    out = []
    # Sites that joined, then those that answered without joining (not one seen only in a failure event).
    for v in (v for v in snapshot["site_views"] if v.registered or v.answered):
        m = v.metrics or {}
        out.append({
            "site": v.site,
            "status": v.status,
            "latest round": v.rounds.get("status"),
            "train examples": int(v.n_train) if v.n_train is not None else None,
            "ε spent": _float(v.epsilon),
            "ε training": _float(v.epsilon_training),
            "ε diagnostics": _float(v.epsilon_diagnostics),
            "ε budget": budget,
            "lifetime ε": _float(v.epsilon_lifetime),
            "lifetime cap": _float(v.epsilon_cap),
            "σ (DP-SGD)": _float(v.noise_multiplier),
            "accuracy": m.get("accuracy"),
            "macro-F1": m.get("macro_f1"),
            "val loss": m.get("loss"),
            "train loss": m.get("train_loss"),
            "metrics round": v.rounds.get("metrics"),
            "ECE": v.ece,
            "label issues": v.label_issues,
            "clipped": v.clip_fraction,
            "signal / noise": v.signal_to_noise,
            "summary round": max((v.rounds[k] for k in ("ece", "label_issues", "clip_fraction", "signal_to_noise")
                                  if k in v.rounds), default=None),
            "update norm": v.update_norm,
            "update cosine": v.update_cosine,
            "update round": v.rounds.get("update_norm", v.rounds.get("update_cosine")),
            "reason": v.reason,
            "failure": v.failure,
        })
    return pd.DataFrame(out)


def _float(v: float | None) -> float | None:
    return float(v) if v is not None else None


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def summaries(store: str, run_id: str, round_: int | None = None) -> dict[str, dict]:
    """site -> its released summary (derived numbers) of `round_`, or its newest one when round_ is None."""
    return run_store.load_summaries(store, run_id, round_)


def _class_names(labels: list[str], k: int) -> list[str]:
    # A run configured with other labels than its summaries carry (an old store) falls back to class indices.
    return labels if len(labels) == k else [str(i) for i in range(k)]


def per_class_frame(summaries_: dict[str, dict], labels: list[str], key: str = "f1") -> pd.DataFrame:
    """(site, class, value) of one per-class number (precision / recall / f1) of each site's summary."""
    rows = []
    for site, s in summaries_.items():
        values = s["per_class"][key]
        names = _class_names(labels, len(values))
        rows += [{"site": site, "class": names[i], "value": v} for i, v in enumerate(values)]
    return pd.DataFrame(rows, columns=["site", "class", "value"])


def confusion_long(summaries_: dict[str, dict], labels: list[str], block: str = "confusion") -> pd.DataFrame:
    """(site, given, predicted, count) of every site's confusion matrix (or label-issue matrix)."""
    rows = []
    for site, s in summaries_.items():
        matrix = s[block] if block == "confusion" else s["label_issues"]["matrix"]
        k = len(matrix)
        names = _class_names(labels, k)
        rows += [{"site": site, "given": names[i], "predicted": names[j], "count": matrix[i][j]}
                 for i in range(k) for j in range(k)]
    return pd.DataFrame(rows, columns=["site", "given", "predicted", "count"])


def histograms_long(summaries_: dict[str, dict], labels: list[str]) -> pd.DataFrame:
    """(site, class, which, share, std) of validation labels, predictions and train labels, as shares of each site;
    `std`: a share's noise std over the site's n public examples (0 without DP): √K·s / n for the validation labels
    and predictions (a row or column of the confusion: K noised cells of std s), s / n for the train labels (one
    noised count each, of its block's std)."""
    rows = []
    for site, s in summaries_.items():
        noise = s.get("noise_std") or {}
        for which, key, block, cells in (("validation labels", "label_histogram", "confusion", True),
                                         ("predictions", "prediction_histogram", "confusion", True),
                                         ("train labels", "train_label_histogram", "train_labels", False)):
            counts = s[key]
            total = sum(counts) or 1.0
            names = _class_names(labels, len(counts))
            std = (len(counts) ** 0.5 if cells else 1.0) * float(noise.get(block, 0.0) or 0.0) / total
            rows += [{"site": site, "class": names[i], "which": which, "share": c / total, "std": std}
                     for i, c in enumerate(counts)]
    return pd.DataFrame(rows, columns=["site", "class", "which", "share", "std"])


def calibration_long(summaries_: dict[str, dict]) -> pd.DataFrame:
    """(site, confidence, accuracy, count) per confidence bin of every site (reliability diagram)."""
    rows = []
    for site, s in summaries_.items():
        cal = s["calibration"]
        n = len(cal["accuracy"])
        rows += [{"site": site, "confidence": (i + 0.5) / n, "accuracy": cal["accuracy"][i], "count": cal["count"][i]}
                 for i in range(n) if cal["count"][i] and cal["count"][i] > 0]
    return pd.DataFrame(rows, columns=["site", "confidence", "accuracy", "count"])


def privacy_frame(site_rounds: pd.DataFrame) -> pd.DataFrame:
    """(round, site, part, epsilon): cumulative ε per site after each round, total / training / diagnostics of this
    run, and "lifetime" (everything released from the site's data, all runs, at its own δ) with the site's own cap
    as `cap` on every row of the site (NaN where the store has none)."""
    cols = [c for c in ("epsilon", "epsilon_training", "epsilon_diagnostics", "epsilon_lifetime") if c in site_rounds]
    if site_rounds.empty or not cols:
        return pd.DataFrame(columns=["round", "site", "part", "epsilon", "cap"])
    per = site_rounds.groupby(["round", "site"])[cols].max().reset_index()
    per = per.rename(columns={"epsilon": "total", "epsilon_training": "training",
                              "epsilon_diagnostics": "diagnostics", "epsilon_lifetime": "lifetime"})
    parts = [c for c in ("total", "training", "diagnostics", "lifetime") if c in per]
    out = per.melt(id_vars=["round", "site"], value_vars=parts, var_name="part", value_name="epsilon").dropna()
    caps = (site_rounds.dropna(subset=["epsilon_cap"]).sort_values("round").groupby("site")["epsilon_cap"].last()
            if "epsilon_cap" in site_rounds else pd.Series(dtype=float))
    return out.assign(cap=out["site"].map(caps))


def lifetime_frame(site_rounds: pd.DataFrame) -> pd.DataFrame:
    """Per site: its lifetime ε on its data (all runs, at its own δ), its own cap, what this run spent (at the
    run's δ) and what is left to the cap; from each site's newest report."""
    cols = ["site", "lifetime ε", "cap", "this run", "left to cap"]
    if site_rounds.empty or "epsilon_lifetime" not in site_rounds or not site_rounds["epsilon_lifetime"].notna().any():
        return pd.DataFrame(columns=cols)
    rows = site_rounds.dropna(subset=["epsilon_lifetime"]).sort_values("round")
    out = rows.groupby("site").agg(lifetime=("epsilon_lifetime", "max"), cap=("epsilon_cap", "last"),
                                   run=("epsilon", "max")).reset_index()
    out["left"] = out["cap"] - out["lifetime"]
    out.columns = cols
    return out


def cross_site(site_rounds: pd.DataFrame, rounds: pd.DataFrame, metric: str, *, num_classes: int = 0,
               dp: bool = False) -> pd.DataFrame:
    """(model, round, data, value, std): the global model of each round (rows) on each site's validation data
    (noised) and on the server's test set (exact, std 0). With DP, a site cell's accuracy carries the noise std
    √K·s / n_val of its release (s: its confusion cells' noise std; other metrics: NaN, not linear in the counts)."""
    from common import diagnostics as dg

    rows = []
    if not site_rounds.empty and metric in site_rounds:
        ev = site_rounds[(site_rounds["phase"] == "evaluate") & (site_rounds["status"] == "ok")]
        for r in ev.itertuples():
            sigma, n = getattr(r, "noise_multiplier", None), getattr(r, "num_examples", None)
            std = (num_classes ** 0.5 * dg.noise_std(float(sigma))["confusion"] / float(n)
                   if dp and metric == "accuracy" and num_classes and pd.notna(sigma) and sigma and n else None)
            rows.append({"model": f"round {r.round}", "round": int(r.round), "data": r.site,
                         "value": getattr(r, metric), "std": std})
    test_col = f"test_{metric}"
    if not rounds.empty and test_col in rounds:
        rows += [{"model": f"round {r.round}", "round": int(r.round), "data": "server test set",
                  "value": getattr(r, test_col), "std": 0.0} for r in rounds.itertuples()
                 if pd.notna(getattr(r, test_col))]
    return pd.DataFrame(rows, columns=["model", "round", "data", "value", "std"])


def local_cross_site(summaries_: dict[str, dict]) -> tuple[pd.DataFrame, float | None]:
    """((model, data, value) for each site's local model (rows) on each site's validation data (columns), noised
    accuracy; the noise std per count), from one round's summaries of a run with server.cross-site-eval."""
    rows, std = [], None
    for site, s in summaries_.items():
        cross = s.get("cross_site")
        if not cross:
            continue
        std = cross.get("noise_std")
        rows += [{"model": f"{m}'s local model", "data": site, "value": v}
                 for m, v in zip(cross["models"], cross["accuracy"], strict=False)]
    return pd.DataFrame(rows, columns=["model", "data", "value"]), std
