"""`fedlens diagnose`: this version's findings over a stored run's rounds, to compare with what the run recorded.

The findings engine (server/findings/) never reads the run store; here a stored run becomes its typed rounds and
its own config (class names, loss clip) for `rediagnose`. Nothing is written and no site is contacted.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from common.config import AppConfig, default_run_config
from common.rounds import Finding
from common.run_store import load_round_records, load_run
from server.findings import rediagnose


def rediagnose_store(store: str | Path, run_id: str | None = None) -> tuple[dict[str, Any], list[tuple[int, Finding]]]:
    """(the stored run, the findings this version draws from its rounds), with the run's own labels and loss clip.

    Args:
        store: the run store file.
        run_id: the run (default: the newest).

    Returns:
        The run as `load_run` gives it, and (round, finding) in the order this version would have recorded them.

    Raises:
        FileNotFoundError, LookupError: as `load_run` (no such store, no such run).
        ValueError: the run's own data.labels or dp.loss-clip are invalid by this version's checks.
    """
    run = load_run(store, run_id)
    cfg = run_config(run["config"])
    return run, rediagnose(load_round_records(store, run["run_id"]), loss_clip=cfg.dp.loss_clip,
                           class_names=cfg.data.labels)


def run_config(stored: dict[str, Any]) -> AppConfig:
    """A stored run's config tree (the resolved flat run config it started with; pyproject defaults fill the rest).

    A store written by an older version may hold keys this version dropped (train.class-weighting) or values its
    checks now refuse: then only the keys this version knows are read, and failing that only the two the diagnosis
    uses (data.labels, dp.loss-clip) over today's defaults.

    Raises:
        ValueError: even data.labels and dp.loss-clip alone do not pass this version's checks.
    """
    known = default_run_config()
    for flat in (stored, {k: v for k, v in stored.items() if k in known}):
        with contextlib.suppress(ValueError):
            return AppConfig.from_run_config(flat)
    return AppConfig.from_run_config({k: stored[k] for k in ("data.labels", "dp.loss-clip") if k in stored})
