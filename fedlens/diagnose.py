"""`fedlens diagnose`: this version's findings over a stored run's rounds, to compare with what the run recorded.

The findings engine (server/findings/) never reads the run store; here a stored run becomes its typed rounds and
its own config (class names, loss clip) for `rediagnose`. Nothing is written and no site is contacted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.rounds import Finding
from common.run_store import load_round_records, load_run
from common.run_views import run_config
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
    """
    run = load_run(store, run_id)
    cfg = run_config(run)
    return run, rediagnose(load_round_records(store, run["run_id"]), loss_clip=cfg.dp.loss_clip,
                           class_names=cfg.data.labels)
