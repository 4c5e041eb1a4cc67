"""Flower glue at a site, its memory: its state on its own disk (its lifetime privacy ledger) and what a resumed run
needs to neither forget nor double-count what the site spent.

Where: node config `state-dir` (`fedlens site` always sets it), else `$FEDLENS_SITE_STATE/<site>` (`fedlens
simulate` points it next to the run store), else `~/.fedlens/sites/<site>`. Never anything the run config says:
the coordinator must not be able to hand a site a fresh ledger.

**The lifetime ledger** (`lifetime.json`, `Lifetime`) holds every DP release the site ever made, in every run, run
id, replay and resume, on any version of its data (each entry with its data's fingerprint), and the census of each
dataset. A new run id starts a new run's *share*, never a new ledger: a site refused for its cap stays refused.
Every spend is written (atomically, fsynced, under a lock) before the release it pays for is computed.

**Run state**: Flower keeps `context.state` for one Flower run only; a fedlens run that resumes after a server crash
is a new Flower run. The `persist` mod

- restores the site's planned rounds, σ and last training health for the fedlens run id an instruction names, and
  saves them after every message;
- keeps the last train and evaluate reply with a digest of the instruction it answered. A resumed run sends the
  same instruction again (the same checkpoint, round and thresholds); the site re-sends the same reply, which
  releases nothing new, instead of training again and charging its ledger twice.

The files stay at the site: `<folder>/lifetime.json`, and per run `<folder>/runs/<digest of the run id>.json` and
`.<train|evaluate>.reply`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict

from client.census import Census
from client.privacy import CENSUS, LedgerEntry, from_state
from common import records

STATE_DIR = "state-dir"  # node-config key
STATE_ENV = "FEDLENS_SITE_STATE"  # the folder holding one sub-folder per site (simulation)
FEATURES_ENV = "FEDLENS_FEATURE_CACHE"  # where sites keep head mode's features instead (one sub-folder per site)
# Simulation on one machine only: every simulated site's features in that one folder (the texts are all on this
# machine anyway), so that a benchmark's many partitions of one data set compute each row once.
SHARED_FEATURES_ENV = "FEDLENS_FEATURE_CACHE_SHARED"


def site_folder(node_config: dict, site: str) -> Path:
    """Where this site keeps its state (module docstring): its own, whatever the run config says."""
    configured = str(node_config.get(STATE_DIR, "") or "")
    if configured:
        return Path(configured)
    root = os.environ.get(STATE_ENV) or str(Path.home() / ".fedlens" / "sites")
    return Path(root) / _safe(site)


def features_folder(node_config: dict, site: str) -> Path:
    """Where this site keeps head mode's cached features: its state folder, or $FEDLENS_FEATURE_CACHE/<site> (a
    benchmark keeps them across the many short-lived worlds it simulates, each with fresh ledgers)."""
    root = os.environ.get(FEATURES_ENV)
    if root and os.environ.get(SHARED_FEATURES_ENV) == "1":
        return Path(root)
    return Path(root) / _safe(site) if root else site_folder(node_config, site)


class Lifetime:
    """A site's lifetime privacy ledger: every charged release, with the run that made it and the fingerprint of
    the data it was computed on, and the census of each dataset.

    One ledger per site, not per dataset: a site's data changes (new rows, another label column, another partition
    or split in a simulation), but most rows, most people, stay. A cap keyed by the data's fingerprint would restart
    at 0 whenever anything about the data changed, the coordinator's choice included. So the lifetime ε composes
    every entry ever made; the census is kept per fingerprint, because it counts one dataset.

    Reads and writes happen under an exclusive lock on the folder (two runs may reach one site at once): `spend`
    re-reads the file, checks, appends and writes (atomically, fsynced) in one critical section, before the release
    is even computed. A release that then fails stays charged, the safe side.
    """

    FILE, LOCK = "lifetime.json", "lifetime.lock"

    def __init__(self, folder: Path, site: str, fingerprint: str) -> None:
        self.folder, self.path = folder, folder / self.FILE
        self.site, self.fingerprint = site, fingerprint
        self.censuses: dict[str, Census] = {}
        self.entries: list[tuple[str, str, LedgerEntry]] = []  # (run id, data fingerprint, entry)
        self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            self.censuses, self.entries = {}, self._legacy()
            return
        saved = json.loads(self.path.read_text())
        self.censuses = {fp: Census.from_dict(c) for fp, c in saved.get("censuses", {}).items()}
        self.entries = [(e.pop("run_id"), e.pop("fingerprint"), LedgerEntry(**e)) for e in saved["entries"]]

    def _legacy(self) -> list[tuple[str, str, LedgerEntry]]:
        """Ledgers of fedlens before the lifetime ledger (`<run id>.json` with a "ledger" record, one per run) count
        too: a site that upgrades must not start again from 0."""
        out = []
        for old in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                cols = json.loads(old.read_text()).get("ledger")
            except (ValueError, AttributeError):
                continue
            if isinstance(cols, dict):
                out += [(old.stem, "before-lifetime-ledger", e) for e in from_state(cols)]
        return out

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The ledger as it is on disk now, held exclusively until the block ends."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / self.LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._read()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @property
    def census(self) -> Census | None:
        """This dataset's census, if it has been released."""
        return self.censuses.get(self.fingerprint)

    def all(self) -> list[LedgerEntry]:
        return [e for _, _, e in self.entries]

    def of_run(self, run_id: str) -> list[LedgerEntry]:
        return [e for r, _, e in self.entries if r == run_id]

    def census_run(self) -> str:
        """The run that paid for this dataset's census ("" when none has been released)."""
        return next((r for r, fp, e in self.entries if e.kind == CENSUS and fp == self.fingerprint), "")

    def charge(self, run_id: str, entry: LedgerEntry, census: Census | None = None) -> None:
        """Record a release (and the census it is, if so) on disk. Call inside `locked()`."""
        self.entries.append((run_id, self.fingerprint, entry))
        if census is not None:
            self.censuses[self.fingerprint] = census
        _write_atomic(self.path, json.dumps({
            "site": self.site, "censuses": {fp: c.to_dict() for fp, c in self.censuses.items()},
            "entries": [{"run_id": r, "fingerprint": fp, **dataclasses.asdict(e)} for r, fp, e in self.entries]},
            indent=1).encode())


def digest(content: RecordDict) -> str:
    """A stable digest of an instruction: every array's bytes and every config value, in key order."""
    h = hashlib.sha256()
    for name in sorted(content.array_records):
        for key, arr in sorted(content.array_records[name].items()):
            h.update(f"{name}/{key}/{arr.dtype}/{arr.shape}".encode())
            h.update(arr.data)
    for name in sorted(content.config_records):
        h.update(json.dumps({k: v for k, v in content.config_records[name].items()}, sort_keys=True,
                            default=repr).encode())
    return h.hexdigest()


def _run_file(folder: Path, run_id: str, suffix: str) -> Path:
    """A run's own file, in `runs/` under a digest of its id: no run id (the coordinator's choice) can name the
    lifetime ledger or another run's file."""
    out = folder / "runs" / f"{hashlib.sha256(run_id.encode()).hexdigest()[:24]}.{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself must survive a power loss
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore(context: Context, folder: Path, run_id: str) -> None:
    if (records.read_state(context.state, records.RUN_MARK) or {}).get("run-id") == run_id:
        return  # already this run's state (the SuperNode kept it between messages)
    for name in records.SAVED:
        if name in context.state:
            del context.state[name]
    path = _run_file(folder, run_id, "json")
    if path.is_file():
        for name, values in json.loads(path.read_text()).items():
            records.write_state(context.state, name, values)
    records.write_state(context.state, records.RUN_MARK, {"run-id": run_id})


def _save(context: Context, folder: Path, run_id: str) -> None:
    saved = {name: values for name in records.SAVED if (values := records.read_state(context.state, name)) is not None}
    _write_atomic(_run_file(folder, run_id, "json"), json.dumps(saved).encode())


def persist(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: the site's run state and last replies on its own disk (module docstring)."""
    run_id = records.unpack_run_id(msg.content) if not msg.has_error() else ""
    if not run_id:
        return call_next(msg, context)
    node_config = dict(context.node_config)
    root = site_folder(node_config, site_name(node_config))
    root.mkdir(parents=True, exist_ok=True)
    _restore(context, root, run_id)
    phase = msg.metadata.message_type
    cached = _run_file(root, run_id, f"{_safe(phase)}.reply")
    key = digest(msg.content) if phase in (MessageType.TRAIN, MessageType.EVALUATE) else ""
    if key and cached.is_file():
        from flwr.common.serde import recorddict_from_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

        blob = cached.read_bytes()
        if blob[:64].decode() == key:
            proto = ProtoRecordDict()
            proto.ParseFromString(blob[64:])
            return Message(content=recorddict_from_proto(proto), reply_to=msg)
    reply = call_next(msg, context)
    # The lifetime ledger was written by the handler; then the run state, then the reply: a crash between them
    # makes a resumed round train and charge again (over-counting, the safe side), never re-send a reply whose
    # charge was lost.
    _save(context, root, run_id)
    if key and not reply.has_error():
        from flwr.common.serde import recorddict_to_proto

        _write_atomic(cached, key.encode() + recorddict_to_proto(reply.content).SerializeToString())
    return reply


def site_name(node_config: dict) -> str:
    """A site's stable name (node ids are random): node config site-name, else site-<partition-id>."""
    return str(node_config.get("site-name") or f"site-{int(node_config.get('partition-id', 0))}")
