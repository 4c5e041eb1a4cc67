"""Step 5: the run store, one SQLite file. This module owns the schema and every SQL statement.

The server is the only writer; it commits each round (global metrics, every site's train and evaluate rows, and the
events of that round) in one transaction, so a reader never sees half a round and a crash never leaves one.
WAL mode lets the dashboard read while the server writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from common.rounds import Event, FindingKind, RoundRecord, SiteRoundRow, SiteSummary

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    scenario TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    started_at REAL NOT NULL,
    finished_at REAL,
    rounds_planned INTEGER NOT NULL,
    model TEXT NOT NULL,
    config_json TEXT NOT NULL,
    model_path TEXT,
    error TEXT,
    parent_run TEXT,
    parent_round INTEGER
);
CREATE TABLE IF NOT EXISTS sites (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    site TEXT NOT NULL,
    n_train INTEGER,
    n_val INTEGER,
    joined_at REAL NOT NULL,
    PRIMARY KEY (run_id, site)
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    completed_at REAL NOT NULL,
    seconds REAL NOT NULL,
    sites_ok INTEGER NOT NULL,
    sites_failed INTEGER NOT NULL,
    accuracy REAL, macro_f1 REAL, loss REAL, train_loss REAL,
    test_accuracy REAL, test_macro_f1 REAL, test_loss REAL, test_max_prediction_share REAL,
    test_ece REAL, test_confidence REAL,
    train_wall REAL, evaluate_wall REAL, diagnostics_seconds REAL,
    server_val_accuracy REAL, server_val_macro_f1 REAL, server_val_loss REAL, server_val_confidence REAL,
    test_examples REAL, server_val_examples REAL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS site_rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    phase TEXT NOT NULL CHECK (phase IN ('train', 'evaluate')),
    status TEXT NOT NULL CHECK (status IN ('ok', 'refused', 'failed')),
    reason TEXT,
    num_examples INTEGER,
    epsilon REAL,
    epsilon_budget REAL,
    delta REAL,
    noise_multiplier REAL,
    sample_rate REAL,
    steps INTEGER,
    seconds REAL,
    update_norm REAL,
    accuracy REAL, macro_f1 REAL, loss REAL, train_loss REAL, max_prediction_share REAL,
    confusion_json TEXT,
    epsilon_training REAL, epsilon_diagnostics REAL,
    ece REAL, label_issues REAL, clip_fraction REAL, grad_norm REAL, noise_to_signal REAL,
    summary_json TEXT,
    signal_to_noise REAL, epsilon_lifetime REAL, epsilon_cap REAL, signal_to_noise_std REAL,
    diagnostics_seconds REAL,
    started_at REAL, ended_at REAL,
    aggregation_score REAL,
    probe_json TEXT,
    update_cosine REAL, update_cosine_median REAL,
    noise_scale REAL,
    PRIMARY KEY (run_id, round, site, phase)
);
CREATE TABLE IF NOT EXISTS ledger (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    site TEXT NOT NULL,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('dpsgd', 'summary', 'census')),
    mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    sensitivity REAL NOT NULL,
    PRIMARY KEY (run_id, site, round, kind)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER,
    site TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS findings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER,
    site TEXT,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS faults (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    params_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS site_rounds_by_site ON site_rounds (run_id, site, round);
"""

SITE_ROUND_COLUMNS = ("site", "phase", "status", "reason", "num_examples", "epsilon", "epsilon_budget", "delta",
                      "noise_multiplier", "sample_rate", "steps", "seconds", "update_norm", "accuracy", "macro_f1",
                      "loss", "train_loss", "max_prediction_share", "confusion_json", "epsilon_training",
                      "epsilon_diagnostics", "ece", "label_issues", "clip_fraction", "grad_norm", "signal_to_noise",
                      "signal_to_noise_std", "epsilon_lifetime", "epsilon_cap", "summary_json", "diagnostics_seconds", "started_at", "ended_at", "aggregation_score", "probe_json",
                      "update_cosine", "update_cosine_median", "noise_scale")
# Columns added after schema version 1: an older store gets them (NULL) when a writer opens it.
ADDED_COLUMNS = {"site_rounds": ("epsilon_training REAL", "epsilon_diagnostics REAL", "ece REAL", "label_issues REAL",
                                 "clip_fraction REAL", "grad_norm REAL", "noise_to_signal REAL",
                                 "summary_json TEXT", "diagnostics_seconds REAL", "started_at REAL",
                                 "ended_at REAL", "aggregation_score REAL", "probe_json TEXT",
                                 "update_cosine REAL", "update_cosine_median REAL", "signal_to_noise REAL",
                                 "epsilon_lifetime REAL", "epsilon_cap REAL", "signal_to_noise_std REAL",
                                 "noise_scale REAL"),
                 "rounds": ("train_wall REAL", "evaluate_wall REAL", "diagnostics_seconds REAL", "test_ece REAL",
                            "test_confidence REAL", "server_val_accuracy REAL", "server_val_macro_f1 REAL",
                            "server_val_loss REAL", "server_val_confidence REAL", "test_examples REAL",
                            "server_val_examples REAL"),
                 "findings": ("confidence REAL",), "runs": ("parent_run TEXT", "parent_round INTEGER")}
LEDGER_COLUMNS = ("site", "round", "kind", "mechanism", "noise_multiplier", "sample_rate", "steps", "sensitivity")
ROUND_METRICS = ("accuracy", "macro_f1", "loss", "train_loss", "test_accuracy", "test_macro_f1", "test_loss",
                 "test_max_prediction_share", "test_ece", "test_confidence",
                 # where the round's wall time went: each phase's wall, and the server's own diagnostics work
                 "train_wall", "evaluate_wall", "diagnostics_seconds",
                 # the server's validation part (tuning; the test part is for reporting only)
                 "server_val_accuracy", "server_val_macro_f1", "server_val_loss", "server_val_confidence",
                 # the parts' sizes: how far their accuracy moves by sampling alone
                 "test_examples", "server_val_examples")


def summary_to_json(summary: SiteSummary | None) -> str | None:
    """A released summary as its column holds it: one flat object (the derived numbers at the top level)."""
    if summary is None:
        return None
    return json.dumps({"round_trained": summary.round_trained, "noise_multiplier": summary.noise_multiplier,
                       "noise_std": summary.noise_std, "n_train": summary.n_train, **summary.derived,
                       "cross_site": summary.cross_site, "released": summary.released}, allow_nan=True)


def summary_from_json(text: str | None) -> SiteSummary | None:
    if not text:
        return None
    d = json.loads(text)
    return SiteSummary(round_trained=int(d.pop("round_trained", 0) or 0),
                       noise_multiplier=float(d.pop("noise_multiplier", 0.0) or 0.0),
                       noise_std=d.pop("noise_std", None) or {}, n_train=int(d.pop("n_train", 0) or 0),
                       cross_site=d.pop("cross_site", None), released=d.pop("released", None) or {}, derived=d)


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _loads_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# Typed fields of a SiteRoundRow and the JSON column each is stored in.
JSON_FIELDS = {"confusion_json": ("confusion", _json_or_none, _loads_or_none),
               "summary_json": ("summary", summary_to_json, summary_from_json),
               "probe_json": ("probe", _json_or_none, _loads_or_none)}


def _column_value(row: SiteRoundRow, column: str) -> Any:
    if column in JSON_FIELDS:
        name, dump, _ = JSON_FIELDS[column]
        return dump(getattr(row, name))
    return getattr(row, column)


def _site_row(values: dict[str, Any]) -> SiteRoundRow:
    for column, (name, _, load) in JSON_FIELDS.items():
        if column in values:
            values[name] = load(values.pop(column))
    return SiteRoundRow(**values)


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode. Read-only connections are what the dashboard and reports use."""
    path = Path(path)
    if readonly:
        if not path.is_file():
            raise FileNotFoundError(f"run store {path} does not exist; run `fedlens simulate` first or pass --store")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL + FULL: each commit (one per round) is fsynced, so a completed round survives a power cut too, not
        # only a kill -9 (NORMAL). The server commits a few times per round; the fsync costs nothing measurable.
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.row_factory = sqlite3.Row
    return conn


def _allow_census_entries(conn: sqlite3.Connection) -> None:
    """Stores made before the census have a ledger whose kind CHECK lacks it; SQLite cannot alter a CHECK, so the
    table is rebuilt (inside the caller's transaction)."""
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'ledger'").fetchone()[0]
    if "'census'" in sql:
        return
    conn.execute("ALTER TABLE ledger RENAME TO ledger_old")
    conn.execute(SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS ledger"):SCHEMA.index("CREATE TABLE IF NOT EXISTS events")])
    conn.execute("INSERT INTO ledger SELECT * FROM ledger_old")
    conn.execute("DROP TABLE ledger_old")


class RunWriter:
    """The server's handle on one run in the store."""

    def __init__(self, path: str | Path, run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.conn = connect(self.path)
        with self.conn:
            self.conn.executescript(SCHEMA)
            for table, columns in ADDED_COLUMNS.items():
                have = {r["name"] for r in self.conn.execute(f"PRAGMA table_info({table})")}
                for col in columns:
                    if col.split()[0] not in have:
                        self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {col}")
            _allow_census_entries(self.conn)
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def start(self, *, scenario: str, rounds_planned: int, model: str, config: dict[str, Any],
              parent: tuple[str, int] | None = None) -> None:
        """A new run; `parent` = (run, round) when it replays another run from that round's checkpoint."""
        with self.conn:
            self.conn.execute(
                "INSERT INTO runs (run_id, scenario, status, started_at, rounds_planned, model, config_json, "
                "parent_run, parent_round) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (self.run_id, scenario, time.time(), rounds_planned, model, json.dumps(config, sort_keys=True),
                 *(parent or (None, None))))

    def prior(self) -> dict[str, Any] | None:
        """This run as the store has it (status, config, last completed round, sites), or None if it is new."""
        row = self.conn.execute("SELECT status, config_json, rounds_planned FROM runs WHERE run_id = ?",
                                (self.run_id,)).fetchone()
        if row is None:
            return None
        last = self.conn.execute("SELECT MAX(round) FROM rounds WHERE run_id = ?", (self.run_id,)).fetchone()[0]
        sites = [r[0] for r in self.conn.execute("SELECT site FROM sites WHERE run_id = ?", (self.run_id,))]
        return {"status": row["status"], "config": json.loads(row["config_json"] or "{}"),
                "rounds_planned": row["rounds_planned"], "last_round": int(last or 0), "sites": sites}

    def resume(self, last_round: int) -> None:
        """Reopen an interrupted run: running again, with an event saying where it picks up."""
        with self.conn:
            self.conn.execute("UPDATE runs SET status = 'running', finished_at = NULL, error = NULL WHERE run_id = ?",
                              (self.run_id,))
            self._event(Event("run-resumed", f"resumed after round {last_round} from its checkpoint"), last_round)

    def record_faults(self, faults: list[tuple[str, str, dict[str, Any]]]) -> None:
        """The injected faults of a simulated run (site, kind, parameters): its ground truth, for scoring only."""
        with self.conn:
            self.conn.executemany("INSERT INTO faults (run_id, site, kind, params_json) VALUES (?, ?, ?, ?)",
                                  [(self.run_id, s, k, json.dumps(p, sort_keys=True)) for s, k, p in faults])

    def add_site(self, site: str, *, n_train: int | None, n_val: int | None) -> None:
        with self.conn:
            self.conn.execute("INSERT OR IGNORE INTO sites VALUES (?, ?, ?, ?, ?)",
                              (self.run_id, site, n_train, n_val, time.time()))

    def event(self, ev: Event, round_: int | None = None) -> None:
        with self.conn:
            self._event(ev, round_)

    def _event(self, ev: Event, round_: int | None) -> None:
        self.conn.execute("INSERT INTO events (run_id, round, site, kind, message, at) VALUES (?, ?, ?, ?, ?, ?)",
                          (self.run_id, round_, ev.site, ev.kind, ev.message, time.time()))

    def write_round(self, rec: RoundRecord) -> None:
        """Commit the whole round at once (or nothing of it)."""
        ok = sum(1 for s in rec.sites if s.phase == "train" and s.status == "ok")
        failed = sum(1 for s in rec.sites if s.phase == "train" and s.status != "ok")
        with self.conn:  # one transaction: BEGIN ... COMMIT, rolled back on any exception
            self.conn.execute(
                f"INSERT INTO rounds (run_id, round, completed_at, seconds, sites_ok, sites_failed, "
                f"{', '.join(ROUND_METRICS)}) VALUES (?, ?, ?, ?, ?, ?, {', '.join('?' * len(ROUND_METRICS))})",
                (self.run_id, rec.round, time.time(), rec.seconds, ok, failed,
                 *(rec.metrics.get(k) for k in ROUND_METRICS)))
            for s in rec.sites:
                self.conn.execute(
                    f"INSERT INTO site_rounds (run_id, round, {', '.join(SITE_ROUND_COLUMNS)}) "
                    f"VALUES (?, ?, {', '.join('?' * len(SITE_ROUND_COLUMNS))})",
                    (self.run_id, rec.round, *(_column_value(s, c) for c in SITE_ROUND_COLUMNS)))
            for e in rec.ledger:
                self.conn.execute(
                    f"INSERT OR REPLACE INTO ledger (run_id, {', '.join(LEDGER_COLUMNS)}) "
                    f"VALUES (?, {', '.join('?' * len(LEDGER_COLUMNS))})",
                    (self.run_id, *(getattr(e, c) for c in LEDGER_COLUMNS)))
            for ev in rec.events:
                self._event(ev, rec.round)
            for f in rec.findings:
                self.conn.execute("INSERT INTO findings (run_id, round, site, kind, severity, message, confidence) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?)", (self.run_id, rec.round, f.site, f.kind,
                                                                   f.severity, f.message, f.confidence))

    def finish(self, status: str, *, model_path: str | None = None, error: str | None = None) -> None:
        with self.conn:
            self.conn.execute("UPDATE runs SET status = ?, finished_at = ?, model_path = ?, error = ? WHERE run_id = ?",
                              (status, time.time(), model_path, error, self.run_id))

    def close(self) -> None:
        self.conn.close()


# --- readers (the report and the dashboard) ----------------------------------------------------------------------

def _rows(conn: sqlite3.Connection, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sql, args).fetchall()]


def list_runs(path: str | Path) -> list[dict[str, Any]]:
    """Every run, newest first, with how many rounds it completed and how many sites it has."""
    conn = connect(path, readonly=True)
    try:
        if not _has_schema(conn):
            return []
        parent = ("r.parent_run, r.parent_round" if "parent_run" in _columns(conn, "runs")
                  else "NULL AS parent_run, NULL AS parent_round")
        return _rows(conn, f"""
            SELECT r.run_id, r.scenario, r.status, r.started_at, r.finished_at, r.rounds_planned, r.model, {parent},
                   (SELECT COUNT(*) FROM rounds x WHERE x.run_id = r.run_id) AS rounds_completed,
                   (SELECT COUNT(*) FROM sites s WHERE s.run_id = r.run_id) AS sites
            FROM runs r ORDER BY r.started_at DESC""")
    finally:
        conn.close()


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r["name"] for r in conn.execute(f"PRAGMA table_info({table})")]


def load_faults(path: str | Path, run_id: str) -> list[dict[str, Any]]:
    """The ground truth of a simulated run. Only benchmarks that score diagnoses read it; the diagnosis never does."""
    conn = connect(path, readonly=True)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='faults'").fetchone() is None:
            return []
        return [{"site": r["site"], "kind": r["kind"], **json.loads(r["params_json"])}
                for r in _rows(conn, "SELECT site, kind, params_json FROM faults WHERE run_id = ? ORDER BY site, kind",
                               (run_id,))]
    finally:
        conn.close()


def load_summaries(path: str | Path, run_id: str, round_: int | None = None) -> dict[str, dict[str, Any]]:
    """site -> the summary it released in `round_` (its newest one when None), with its round."""
    conn = connect(path, readonly=True)
    try:
        if "summary_json" not in _columns(conn, "site_rounds"):
            return {}
        if round_ is None:
            rows = _rows(conn, """
                SELECT site, round, summary_json FROM site_rounds s WHERE run_id = ? AND summary_json IS NOT NULL
                AND round = (SELECT MAX(round) FROM site_rounds t WHERE t.run_id = s.run_id AND t.site = s.site
                             AND t.summary_json IS NOT NULL) ORDER BY site""", (run_id,))
        else:
            rows = _rows(conn, "SELECT site, round, summary_json FROM site_rounds WHERE run_id = ? AND round = ? "
                               "AND summary_json IS NOT NULL ORDER BY site", (run_id, round_))
        return {r["site"]: {"round": r["round"], **json.loads(r["summary_json"])} for r in rows}
    finally:
        conn.close()


def load_round_records(path: str | Path, run_id: str) -> list[RoundRecord]:
    """A run's committed rounds as the server built them (metrics and per-site rows, summaries included; no events,
    ledger or findings): what `fedlens diagnose` feeds to the current diagnosis code."""
    conn = connect(path, readonly=True)
    try:
        conn.execute("BEGIN")
        have = set(_columns(conn, "site_rounds"))
        cols = [c for c in SITE_ROUND_COLUMNS if c in have]
        rows: dict[int, list[SiteRoundRow]] = {}
        for r in _rows(conn, f"SELECT round, {', '.join(cols)} FROM site_rounds WHERE run_id = ? "
                             "ORDER BY round, site, phase", (run_id,)):
            rows.setdefault(r.pop("round"), []).append(_site_row(r))
        metrics = [c for c in ROUND_METRICS if c in set(_columns(conn, "rounds"))]
        out = [RoundRecord(r["round"], r["seconds"], {k: r[k] for k in metrics}, rows.get(r["round"], []))
               for r in _rows(conn, f"SELECT round, seconds, {', '.join(metrics)} FROM rounds WHERE run_id = ? "
                                    "ORDER BY round", (run_id,))]
        conn.execute("COMMIT")
        return out
    finally:
        conn.close()


def _has_schema(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone() is not None


def load_run(path: str | Path, run_id: str | None = None) -> dict[str, Any]:
    """One run (the newest when run_id is None) with its rounds, per-site rows, sites, events and findings.

    All of it is read in one read transaction, so it is a consistent snapshot even while the server writes.

    Raises:
        LookupError: the store holds no run, or no run with this id (the message lists the known ones).
    """
    conn = connect(path, readonly=True)
    try:
        conn.execute("BEGIN")
        if not _has_schema(conn):
            raise LookupError(f"run store {path} holds no runs yet")
        if run_id is None:
            row = conn.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
            if row is None:
                raise LookupError(f"run store {path} holds no runs yet")
            run_id = row["run_id"]
        runs = _rows(conn, "SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not runs:
            known = [r["run_id"] for r in _rows(conn, "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 10")]
            raise LookupError(f"run {run_id!r} is not in {path}; known runs: {', '.join(known) or 'none'}")
        run = runs[0]
        run["config"] = json.loads(run.pop("config_json"))
        run["rounds"] = _rows(conn, "SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))
        # Summaries stay out (they are most of the store's bytes): has_summary says which rows have one, and
        # load_summaries reads them for the round a reader shows.
        cols = [c for c in _columns(conn, "site_rounds") if c != "summary_json"]
        run["site_rounds"] = _rows(conn, f"SELECT {', '.join(cols)}, summary_json IS NOT NULL AS has_summary "
                                         "FROM site_rounds WHERE run_id = ? ORDER BY round, site, phase"
                                   if "summary_json" in _columns(conn, "site_rounds") else
                                   "SELECT *, 0 AS has_summary FROM site_rounds WHERE run_id = ? "
                                   "ORDER BY round, site, phase", (run_id,))
        run["sites"] = _rows(conn, "SELECT site, n_train, n_val, joined_at FROM sites WHERE run_id = ? ORDER BY site",
                             (run_id,))
        run["events"] = _rows(conn, "SELECT round, site, kind, message, at FROM events WHERE run_id = ? ORDER BY id",
                              (run_id,))
        confidence = "confidence" if "confidence" in _columns(conn, "findings") else "1.0 AS confidence"
        run["findings"] = _rows(conn, f"SELECT round, site, kind, severity, {confidence}, message FROM findings "
                                      "WHERE run_id = ? ORDER BY id", (run_id,))
        for f in run["findings"]:
            f["kind"] = str(FindingKind.read(f["kind"]))  # older stores' names read as today's
        has_ledger = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='ledger'").fetchone()
        run["ledger"] = _rows(conn, f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE run_id = ? "
                                    "ORDER BY site, round, kind", (run_id,)) if has_ledger else []
        conn.execute("COMMIT")
        return run
    finally:
        conn.close()
