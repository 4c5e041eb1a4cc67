"""Fault injection for simulations: a scenario declares faults at named sites; each site applies its own
(client/data.py for data faults, client/client_app.py for the rest).

The run config key `faults` holds a JSON list of {"site", "kind", ...parameters}. The server records it as the run's
ground truth (run store table `faults`); no diagnosis code reads it. Kinds and their parameters (docs/scenarios.md):

  data       label_noise (rate), label_flip (from, to), class_missing (class), text_corruption (rate),
             domain_shift (rate): that share of the site's rows replaced by reviews of conditions it does not hold
  training   lr_blowup (factor), overfit (epochs, examples)
  behaviour  free_rider (mode: "echo" | "random"), crash (round), straggler (seconds),
             bad_update (mode: "nan" | "inf" | "shape" | "scale" | "examples"; from round): a broken or hostile reply
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from common.datasets import GROUP, LABEL, TEXT

KINDS: dict[str, dict[str, Any]] = {  # kind -> parameters with their defaults
    "label_noise": {"rate": 0.5},
    "label_flip": {"from": 2, "to": 0},
    "class_missing": {"class": 0},
    "text_corruption": {"rate": 0.3},
    "domain_shift": {"rate": 1.0},
    "lr_blowup": {"factor": 50.0},
    "overfit": {"epochs": 20, "examples": 16},
    "free_rider": {"mode": "echo"},
    "crash": {"round": 2},
    "straggler": {"seconds": 30.0},
    "bad_update": {"mode": "nan", "round": 1},
}
BAD_UPDATE_MODES = ("nan", "inf", "shape", "scale", "examples")


@dataclass(frozen=True)
class Fault:
    site: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.params.get(key, KINDS[self.kind][key])


def parse(text: str) -> list[Fault]:
    """The faults of a run config.

    Raises:
        ValueError: not a JSON list of objects, an unknown kind or parameter (names the entry and what is allowed).
    """
    if not text:
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"faults must be a JSON list of {{'site', 'kind', ...}} objects: {e}") from e
    if not isinstance(items, list):
        raise ValueError(f"faults must be a JSON list, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "site" not in item or "kind" not in item:
            raise ValueError(f"faults[{i}] must be an object with 'site' and 'kind', got {item!r}")
        kind = item["kind"]
        if kind not in KINDS:
            raise ValueError(f"faults[{i}]: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
        params = {k: v for k, v in item.items() if k not in ("site", "kind")}
        unknown = sorted(set(params) - set(KINDS[kind]))
        if unknown:
            raise ValueError(f"faults[{i}] ({kind}): unknown parameter(s) {', '.join(unknown)}; "
                             f"{kind} takes {', '.join(KINDS[kind])}")
        if kind == "bad_update" and params.get("mode", "nan") not in BAD_UPDATE_MODES:
            raise ValueError(f"faults[{i}] (bad_update): mode must be one of {', '.join(BAD_UPDATE_MODES)}, "
                             f"got {params['mode']!r}")
        out.append(Fault(str(item["site"]), kind, params))
    return out


def at_site(faults: list[Fault], site: str) -> dict[str, Fault]:
    return {f.kind: f for f in faults if f.site == site}


def corrupt_rows(rows: pd.DataFrame, faults: dict[str, Fault], *, num_classes: int, seed: int,
                 elsewhere: pd.DataFrame | None = None) -> pd.DataFrame:
    """The site's rows with its data faults applied (before the train/validation split: the site's data is bad).
    `elsewhere`: rows a domain shift draws from (the embedded set); those of the site's own conditions are skipped."""
    rng = np.random.default_rng(seed)
    rows = rows.copy()
    if "domain_shift" in faults and elsewhere is not None:
        pool = elsewhere[~elsewhere[GROUP].isin(set(rows[GROUP]))] if GROUP in rows else elsewhere
        hit = np.flatnonzero(rng.random(len(rows)) < float(faults["domain_shift"]["rate"]))
        if len(pool) and len(hit):
            picked = pool.iloc[rng.choice(len(pool), size=len(hit), replace=len(pool) < len(hit))]
            rows.iloc[hit, [rows.columns.get_loc(c) for c in (TEXT, LABEL)]] = picked[[TEXT, LABEL]].to_numpy()
            if GROUP in rows:
                rows.iloc[hit, rows.columns.get_loc(GROUP)] = picked[GROUP].to_numpy()
    if "class_missing" in faults:
        rows = rows[rows[LABEL] != int(faults["class_missing"]["class"])].reset_index(drop=True)
    if "label_flip" in faults:
        f = faults["label_flip"]
        rows.loc[rows[LABEL] == int(f["from"]), LABEL] = int(f["to"])
    if "label_noise" in faults:
        hit = rng.random(len(rows)) < float(faults["label_noise"]["rate"])
        # A random *other* label: the given label is always wrong where noise hits.
        shift = rng.integers(1, num_classes, size=len(rows))
        rows.loc[hit, LABEL] = (rows.loc[hit, LABEL].to_numpy() + shift[hit]) % num_classes
    if "text_corruption" in faults:
        rate = float(faults["text_corruption"]["rate"])
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        rows[TEXT] = [_garble(t, rate, rng, letters) for t in rows[TEXT]]
    return rows


def _garble(text: str, rate: float, rng: np.random.Generator, letters: np.ndarray) -> str:
    chars = np.array(list(text))
    if not len(chars):
        return text
    hit = rng.random(len(chars)) < rate
    chars[hit] = rng.choice(letters, size=int(hit.sum()))
    return "".join(chars)
