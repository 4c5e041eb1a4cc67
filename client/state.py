"""A site's state on its own disk, so that a resumed run neither forgets nor double-counts what the site spent.

Flower keeps `context.state` for one Flower run only. A fedlens run that resumes after a server crash is a new
Flower run, so without this a site would start a fresh privacy ledger and could overspend its ε. With node config
`state-dir` set (`fedlens site` always sets it), the `persist` mod

- restores the site's ledger, planned rounds and σ for the fedlens run id an instruction names, and saves them after
  every message (an atomic, fsynced file write, before the reply leaves);
- keeps the last train and evaluate reply with a digest of the instruction it answered. A resumed run sends the
  same instruction again (the same checkpoint, round and thresholds); the site re-sends the same reply, which
  releases nothing new, instead of training again and charging its ledger twice.

The files stay at the site: `<state-dir>/<run id>.json` and `<run id>.<train|evaluate>.reply`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from common import records

STATE_DIR = "state-dir"  # node-config key
SAVED = (records.LEDGER, "plan", "dp", "health")  # the context.state records that make up a site's run state
RUN_MARK = "fedlens-run"  # in context.state: which fedlens run the restored records belong to


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
    """ClientApp mod: the site's run state and last replies on its own disk (node config `state-dir`)."""
    folder = str(context.node_config.get(STATE_DIR, "") or "")
    run_id = records.unpack_run_id(msg.content) if not msg.has_error() else ""
    if not folder or not run_id:
        return call_next(msg, context)
    root = Path(folder)
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
    # The ledger first, then the reply: a crash between the two makes a resumed round train and charge again
    # (over-counting, the safe side), never re-send a reply whose charge was lost.
    _save(context, root, run_id)
    if key and not reply.has_error():
        from flwr.common.serde import recorddict_to_proto

        _write_atomic(cached, key.encode() + recorddict_to_proto(reply.content).SerializeToString())
    return reply
