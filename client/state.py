"""A site's state on its own disk: its lifetime privacy ledger, and what a resumed run needs to neither forget nor
double-count what the site spent.

Where: node config `state-dir` (`fedlens site` always sets it), else `$FEDLENS_SITE_STATE/<site>` (`fedlens
simulate` points it next to the run store), else `~/.fedlens/sites/<site>`. Never anything the run config says:
the coordinator must not be able to hand a site a fresh ledger.

**The lifetime ledger** (`lifetime-<fingerprint>.json`) holds every DP release ever made from one dataset (keyed by
a fingerprint of its rows) in every run, run id, replay and resume, and the site's census. A new run id starts a new
run's *share*, never a new ledger: a site refused for its cap stays refused. It is written (atomically, fsynced)
before the reply that carries the release leaves.

**Run state**: Flower keeps `context.state` for one Flower run only; a fedlens run that resumes after a server crash
is a new Flower run. The `persist` mod

- restores the site's planned rounds, σ and last training health for the fedlens run id an instruction names, and
  saves them after every message;
- keeps the last train and evaluate reply with a digest of the instruction it answered. A resumed run sends the
  same instruction again (the same checkpoint, round and thresholds); the site re-sends the same reply, which
  releases nothing new, instead of training again and charging its ledger twice.

The files stay at the site: `<folder>/<run id>.json` and `<run id>.<train|evaluate>.reply`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.census import Census
from client.privacy import LedgerEntry
from common import records

STATE_DIR = "state-dir"  # node-config key
STATE_ENV = "FEDLENS_SITE_STATE"  # the folder holding one sub-folder per site (simulation)
SAVED = ("plan", "dp", "health")  # the context.state records that make up a site's run state
RUN_MARK = "fedlens-run"  # in context.state: which fedlens run the restored records belong to


def site_folder(node_config: dict, site: str) -> Path:
    """Where this site keeps its state (module docstring): its own, whatever the run config says."""
    configured = str(node_config.get(STATE_DIR, "") or "")
    if configured:
        return Path(configured)
    root = os.environ.get(STATE_ENV) or str(Path.home() / ".fedlens" / "sites")
    return Path(root) / _safe(site)


class Lifetime:
    """The lifetime ledger of one site's dataset: every charged release, each with the run that made it."""

    def __init__(self, folder: Path, site: str, fingerprint: str) -> None:
        self.path = folder / f"lifetime-{fingerprint[:16]}.json"
        self.site, self.fingerprint = site, fingerprint
        self.census: Census | None = None
        self.entries: list[tuple[str, LedgerEntry]] = []
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise ValueError(f"site {site}: {self.path} belongs to other data (fingerprint mismatch)")
            self.census = Census.from_dict(saved["census"]) if saved.get("census") else None
            self.entries = [(e.pop("run_id"), LedgerEntry(**e)) for e in saved["entries"]]

    def all(self) -> list[LedgerEntry]:
        return [e for _, e in self.entries]

    def of_run(self, run_id: str) -> list[LedgerEntry]:
        return [e for r, e in self.entries if r == run_id]

    def census_run(self) -> str:
        """The run that paid for the census ("" when none has been released)."""
        return next((r for r, e in self.entries if e.kind == "census"), "")

    def runs(self) -> list[str]:
        return list(dict.fromkeys(r for r, _ in self.entries))

    def charge(self, run_id: str, entry: LedgerEntry, census: Census | None = None) -> None:
        """Record a release (and the census it was, if so) on disk before it leaves the site."""
        self.entries.append((run_id, entry))
        if census is not None:
            self.census = census
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps({
            "site": self.site, "fingerprint": self.fingerprint,
            "census": self.census.to_dict() if self.census else None,
            "entries": [{"run_id": r, **dataclasses.asdict(e)} for r, e in self.entries]}, indent=1).encode())


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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _restore(context: Context, folder: Path, run_id: str) -> None:
    if context.state.config_records.get(RUN_MARK, {}).get("run-id") == run_id:
        return  # already this run's state (the SuperNode kept it between messages)
    for name in SAVED:
        if name in context.state:
            del context.state[name]
    path = folder / f"{_safe(run_id)}.json"
    if path.is_file():
        for name, values in json.loads(path.read_text()).items():
            context.state[name] = ConfigRecord(values)
    context.state[RUN_MARK] = ConfigRecord({"run-id": run_id})


def _save(context: Context, folder: Path, run_id: str) -> None:
    saved = {name: dict(context.state.config_records[name].items()) for name in SAVED
             if name in context.state.config_records}
    _write_atomic(folder / f"{_safe(run_id)}.json", json.dumps(saved).encode())


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
    cached = root / f"{_safe(run_id)}.{_safe(phase)}.reply"
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
