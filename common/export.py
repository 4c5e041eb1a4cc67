"""Step 5 → operators' tools: a stored run, copied into MLflow or TensorBoard, on request or after every round.

`fedlens export --to mlflow|tensorboard` copies runs of a store; `store.export = "mlflow"` (or "tensorboard", or
both, comma-separated) makes the ServerApp do the same after each committed round, so the run is followed live in
the tools a team already watches. What is copied is what the store holds and the dashboard shows, nothing else:
the run's config, every round's global metrics, every site's metrics and ε per round, its findings and events.

Each target is brought *up to date*: the rounds it already holds are not written again, so a live export, a resumed
run and a later `fedlens export` of the same run leave one copy of each round. The last round a target holds is
read back from the target itself (the `round/seconds` series, written last in each round), not from a side file.

- MLflow: one MLflow run per fedlens run, found again by its tag `fedlens.run_id`, in the experiment `fedlens`.
  A target that is a folder becomes MLflow's own local database there (`sqlite:///<folder>/mlflow.db`, artifacts in
  `<folder>/artifacts`: MLflow 3 keeps its plain-file store for old users only); any other MLflow tracking URI is
  used as it is. Metrics are steps = rounds; findings and events are `findings.json` / `events.json` artifacts.
- TensorBoard: one log directory per fedlens run (`<folder>/<run id>`), scalars by round, findings and events as
  text by round (an event stored for a round after that round was exported, e.g. a later export failure, is not
  added to it: the store and MLflow's `events.json` have them all). A round half-written when a process died is
  purged when it is written again (`purge_step`).

The live export runs beside the round loop, in one background thread: a slow or unreachable target (a remote
MLflow server retrying) delays the copy, never the next round; a round that finds the previous copy still busy
leaves it to the next sync, which writes every round the target lacks.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from common.config import EXPORT_TARGETS, RUN_ID
from common.run_store import ROUND_METRICS, load_run

EXPERIMENT = "fedlens"
RUN_TAG = "fedlens.run_id"
LAST = "round/seconds"  # written last in each round: the round a target holds in full
# Per-site columns that are bookkeeping, not measurements (wall-clock stamps, JSON blobs, constants of the run).
_NOT_SERIES = {"site", "phase", "status", "reason", "confusion_json", "summary_json", "probe_json", "started_at",
               "ended_at", "has_summary", "run_id", "round"}
_MLFLOW_PARAM_MAX = 6000  # MLflow refuses longer parameter values; the whole config is also an artifact
_MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch


class ExportError(RuntimeError):
    """A target cannot be written (its library is missing, or its location is not usable)."""


# target -> (the module its export imports, what to install); `fedlens[export]` brings both.
LIBRARIES = {"mlflow": ("mlflow.tracking", "mlflow (or mlflow-skinny)"),
             "tensorboard": ("tensorboard", "tensorboard")}


def require(target: str) -> None:
    """Raise ExportError, saying what to install, when `target`'s library is missing."""
    import importlib

    module, what = LIBRARIES[target]
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ExportError(f"exporting to {target} needs {what}: pip install 'fedlens[export]'") from e


def default_location(store: str | Path, target: str) -> Path:
    """Where a target goes when none is given: beside the store (runs/fedlens.db -> runs/mlflow, runs/tensorboard)."""
    return Path(store).resolve().parent / target


def round_series(run: dict[str, Any], round_: int) -> dict[str, float]:
    """Every number of one stored round, by series name: the round's global metrics (`global/<metric>`), its time
    and sites (`round/...`), each site's measurements per phase (`site/<site>/<train|evaluate>/<column>`, ε among
    them, with `ok` = 1 or 0) and the findings recorded in it (`findings/<kind>`, `findings/count`).

    Missing and non-finite values are left out (the targets hold numbers); `round/seconds` is always there."""
    row = next(r for r in run["rounds"] if r["round"] == round_)
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)

    for k in ROUND_METRICS:
        put(f"global/{k}", row.get(k))
    put("round/sites_ok", row["sites_ok"])
    put("round/sites_failed", row["sites_failed"])
    for s in run["site_rounds"]:
        if s["round"] != round_:
            continue
        prefix = f"site/{s['site']}/{s['phase']}"
        put(f"{prefix}/ok", s["status"] == "ok")
        for col, value in s.items():
            if col not in _NOT_SERIES:
                put(f"{prefix}/{col}", value)
    found = [f for f in run["findings"] if f["round"] == round_]
    put("findings/count", len(found))
    for f in found:
        name = f"findings/{f['kind']}"
        out[name] = out.get(name, 0.0) + 1.0
    out[LAST] = float(row["seconds"])
    return out


def _markdown(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join([" | ".join(columns), " | ".join("---" for _ in columns),
                      *(" | ".join(cell(r.get(c)) for c in columns) for r in rows)])


class Target(Protocol):
    def last_round(self) -> int: ...
    def write(self, run: dict[str, Any], rounds: list[int]) -> None: ...
    def close(self) -> None: ...


class MlflowTarget:
    """One fedlens run as one MLflow run (created on first use, found again by its tag after that)."""

    def __init__(self, location: str | Path, run: dict[str, Any]) -> None:
        require("mlflow")
        from mlflow.tracking import MlflowClient
        uri = str(location)
        artifacts = None
        if "://" not in uri:  # a folder: MLflow's local database in it
            folder = Path(uri).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            EXPERIMENT, artifact_location=artifacts)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run['run_id']}'",
                                        max_results=1)
        if found:
            self.mlflow_run = found[0].info.run_id
        else:
            tags = {RUN_TAG: run["run_id"], "fedlens.scenario": run["scenario"], "fedlens.model": run["model"]}
            if run.get("parent_run"):
                tags["fedlens.parent"] = f"{run['parent_run']} round {run['parent_round']}"
            self.mlflow_run = self.client.create_run(exp_id, start_time=int(run["started_at"] * 1000), tags=tags,
                                                     run_name=run["run_id"]).info.run_id
        self._params(run["config"])  # every time: a first export cut short after the run was created has none

    def _params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in sorted(config.items()) if len(str(v)) <= _MLFLOW_PARAM_MAX]
        for i in range(0, len(params), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.mlflow_run, params=params[i:i + 100])
        self.client.log_dict(self.mlflow_run, config, "config.json")

    def last_round(self) -> int:
        history = self.client.get_metric_history(self.mlflow_run, LAST)
        return max((int(m.step) for m in history), default=0)

    def write(self, run: dict[str, Any], rounds: list[int]) -> None:
        from mlflow.entities import Metric

        for rnd in rounds:
            row = next(r for r in run["rounds"] if r["round"] == rnd)
            stamp = int(row["completed_at"] * 1000)
            series = round_series(run, rnd)
            last = series.pop(LAST)
            metrics = [Metric(k, v, stamp, rnd) for k, v in series.items()] + [Metric(LAST, last, stamp, rnd)]
            for i in range(0, len(metrics), _MLFLOW_BATCH):  # LAST is in the final batch: a round counts once whole
                self.client.log_batch(self.mlflow_run, metrics=metrics[i:i + _MLFLOW_BATCH])
        # Small, and rewritten whole: the run's findings and events so far.
        self.client.log_dict(self.mlflow_run, run["findings"], "findings.json")
        self.client.log_dict(self.mlflow_run, run["events"], "events.json")
        status = {"completed": "FINISHED", "failed": "FAILED"}.get(run["status"])
        if status is not None:
            self.client.set_terminated(self.mlflow_run, status,
                                       end_time=int((run["finished_at"] or time.time()) * 1000))
        elif self.client.get_run(self.mlflow_run).info.status != "RUNNING":  # a resumed run runs again
            self.client.update_run(self.mlflow_run, status="RUNNING")

    def close(self) -> None:
        pass


class TensorBoardTarget:
    """One fedlens run as one TensorBoard log directory, `<folder>/<run id>`."""

    def __init__(self, location: str | Path, run: dict[str, Any]) -> None:
        require("tensorboard")
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from torch.utils.tensorboard import SummaryWriter
        base = Path(location).resolve()
        self.logdir = (base / run["run_id"]).resolve()
        if self.logdir.parent != base:  # a run id is one folder name (common.config.RUN_ID): never a path
            raise ExportError(f"run id {run['run_id']!r} cannot name a folder in {base}")
        self._last, has_config, existed = 0, False, self.logdir.exists()
        if existed:
            acc = EventAccumulator(str(self.logdir), size_guidance={"scalars": 0, "tensors": 0})
            acc.Reload()
            tags = acc.Tags()
            if LAST in tags["scalars"]:
                self._last = max(e.step for e in acc.Scalars(LAST))
            has_config = "config/text_summary" in tags["tensors"]
        # Anything at a step after the last whole round (a round cut short, round 1 included) is dropped when it is
        # written again.
        self.writer = SummaryWriter(str(self.logdir), purge_step=self._last + 1 if existed else None)
        if not has_config:
            self.writer.add_text("config", "```json\n" + json.dumps(run["config"], indent=1, sort_keys=True) + "\n```",
                                 0)

    def last_round(self) -> int:
        return self._last

    def write(self, run: dict[str, Any], rounds: list[int]) -> None:
        for rnd in rounds:
            row = next(r for r in run["rounds"] if r["round"] == rnd)
            series = round_series(run, rnd)
            last = series.pop(LAST)
            for k, v in series.items():
                self.writer.add_scalar(k, v, rnd, walltime=row["completed_at"])
            for name, rows, cols in (
                    ("findings", [f for f in run["findings"] if f["round"] == rnd],
                     ("site", "kind", "severity", "confidence", "message")),
                    ("events", [e for e in run["events"] if e["round"] == rnd], ("site", "kind", "message"))):
                if rows:
                    self.writer.add_text(name, _markdown(rows, cols), rnd, walltime=row["completed_at"])
            self.writer.add_scalar(LAST, last, rnd, walltime=row["completed_at"])
            self._last = rnd
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_target(target: str, location: str | Path, run: dict[str, Any]) -> Target:
    assert target in EXPORT_TARGETS, target
    return {"mlflow": MlflowTarget, "tensorboard": TensorBoardTarget}[target](location, run)


def export_run(store: str | Path, run_id: str | None, target: str, location: str | Path) -> dict[str, Any]:
    """Bring `target` at `location` up to date with one stored run (the newest when run_id is None).

    Returns what was done: {"run_id", "target", "location", "rounds_written", "last_round"}."""
    run = load_run(store, run_id)
    if RUN_ID.fullmatch(run["run_id"]) is None:
        raise ExportError(f"run {run['run_id']!r}: its id is not a plain name (letters, digits, '.', '_', '-'), so "
                          "it cannot name an export; export the others with --run")
    try:
        t = open_target(target, location, run)
        try:
            have = t.last_round()
            todo = [r["round"] for r in run["rounds"] if r["round"] > have]
            t.write(run, todo)
        finally:
            t.close()
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's own error (a locked database, a refused URI), named
        raise ExportError(f"run {run['run_id']}: {target} at {location}: {type(e).__name__}: {e}") from e
    return {"run_id": run["run_id"], "target": target, "location": str(location), "rounds_written": len(todo),
            "last_round": max([have, *todo])}


class LiveExport:
    """The ServerApp's live export (`store.export`): after each committed round, every target is brought up to date.

    A target that fails is logged and tried again after the next round: an export never stops or slows a run down
    by more than its own writes. Each target is opened on first use (so a missing library is found at the start,
    by `check`)."""

    def __init__(self, store: str | Path, run_id: str, targets: tuple[str, ...], folder: str = "") -> None:
        self.store, self.run_id = store, run_id
        # An MLflow tracking URI in store.export-dir is used as it is (the config allows it for MLflow alone).
        self.locations = {t: (folder if "://" in folder else Path(folder) / t) if folder else default_location(store, t)
                          for t in targets}
        self._open: dict[str, Target] = {}
        self._worker: threading.Thread | None = None
        self._problems: list[str] = []
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise ExportError now if a target's library is missing (before any round is trained)."""
        for target in self.locations:
            require(target)

    def sync(self) -> list[str]:
        """Bring every target up to date; returns the failures of this call as 'target: reason' (empty if none)."""
        if not self.locations:
            return []
        try:
            run = load_run(self.store, self.run_id)
        except Exception as e:  # noqa: BLE001 - an export must never end the run it follows
            return [f"{target}: the run store could not be read: {type(e).__name__}: {e}" for target in self.locations]
        failed = []
        for target, location in self.locations.items():
            try:
                t = self._open.get(target) or self._open.setdefault(target, open_target(target, location, run))
                have = t.last_round()
                t.write(run, [r["round"] for r in run["rounds"] if r["round"] > have])
            except Exception as e:  # noqa: BLE001 - an export must never end the run it follows
                broken = self._open.pop(target, None)
                if broken is not None:
                    try:
                        broken.close()
                    except Exception:  # noqa: BLE001, S110 - it is reopened on the next round
                        pass
                failed.append(f"{target} ({location}): {type(e).__name__}: {e}")
        return failed

    def submit(self) -> list[str]:
        """After a committed round: start a sync in the background unless the last one is still busy; returns the
        failures of syncs that ended since the last call (the caller records them; this thread never writes the
        store)."""
        if self.locations and (self._worker is None or not self._worker.is_alive()):
            self._worker = threading.Thread(target=self._sync_in_background, name="fedlens-export", daemon=True)
            self._worker.start()
        with self._lock:
            problems, self._problems = self._problems, []
        return problems

    def _sync_in_background(self) -> None:
        problems = self.sync()
        with self._lock:
            self._problems.extend(problems)

    def finish(self, timeout: float = 60.0) -> list[str]:
        """At the run's end: wait for a busy sync, then run the last one (the run's final status), each for at most
        `timeout` seconds; returns every failure not yet returned."""
        if self.locations:
            if self._worker is not None:
                self._worker.join(timeout)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._sync_in_background, name="fedlens-export", daemon=True)
                self._worker.start()
                self._worker.join(timeout)
            if self._worker.is_alive():
                with self._lock:
                    self._problems.append(f"still writing after {timeout:g} s at the run's end: the targets may lack "
                                          "its last rounds (`fedlens export` brings them up to date)")
        with self._lock:
            problems, self._problems = self._problems, []
        return problems

    def close(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return  # a sync still writing: the daemon thread ends with the process
        for t in self._open.values():
            try:
                t.close()
            except Exception:  # noqa: BLE001, S110 - closing a failed target must not hide the run's own outcome
                pass
        self._open.clear()
