"""A site's saved state across a resume: a new Flower run (fresh context.state) of the same fedlens run keeps the
ledger, re-sends a reply for an instruction it already answered without charging again, and trains on for new
rounds from the restored ledger."""

import json
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from client import client_app
from common import records
from common.model import build_model, trainable_state
from tests.conftest import TINY


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 42, 1


def _context(run_config, state_dir, flower_run):
    return Context(run_id=flower_run, node_id=100, node_config={"partition-id": 0, "num-partitions": 3,
                                                                "state-dir": str(state_dir)},
                   state=RecordDict(), run_config=run_config)


def _send(ctx, arrays, rnd, message_type, run_id="run-a"):
    msg = Message(content=records.pack_instruction(arrays, rnd, 3, run_id=run_id), message_type=message_type,
                  dst_node_id=1)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    return records.unpack_train_reply(client_app.app(msg, ctx).content)


def test_a_resumed_run_resends_the_answered_round_and_charges_each_round_once(tiny_cfg, tmp_path):
    run_config = {**TINY, "num-server-rounds": 3, "dp.noise-multiplier": 1.0}
    arrays = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0))

    # An uninterrupted site: rounds 1 and 2.
    first = _context(run_config, tmp_path / "site", flower_run=1)
    r1 = _send(first, arrays, 1, MessageType.TRAIN)
    r2 = _send(first, r1.arrays, 2, MessageType.TRAIN)
    assert r2.epsilon > r1.epsilon > 0

    # The server crashed after sending round 2; the resumed run is a new Flower run with a fresh context.
    resumed = _context(run_config, tmp_path / "site", flower_run=2)
    again = _send(resumed, r1.arrays, 2, MessageType.TRAIN)
    assert again.epsilon == r2.epsilon  # the same reply: nothing new released, nothing charged
    for k in r2.arrays:
        np.testing.assert_array_equal(again.arrays[k], r2.arrays[k])
    r3 = _send(resumed, again.arrays, 3, MessageType.TRAIN)

    # The ledger went on from round 2: the census and three DP-SGD rounds in all, as in a run never interrupted.
    from client.privacy import CENSUS, DPSGD, LedgerEntry, epsilon

    assert r3.sample_rate == r1.sample_rate and r3.steps == r1.steps  # the schedule follows the kept census
    straight = [LedgerEntry(0, CENSUS, "gaussian", 10.0, 1.0, 1, 1.0)] + [
        LedgerEntry(r, DPSGD, "subsampled-gaussian", 1.0, r1.sample_rate, r1.steps, 1.0) for r in (1, 2, 3)]
    assert r3.epsilon == pytest.approx(epsilon(straight, 1e-5), rel=1e-12)
    assert r2.epsilon == pytest.approx(epsilon(straight[:3], 1e-5), rel=1e-12)


def test_a_new_run_id_cannot_reset_a_sites_ledger(tiny_cfg, tmp_path):
    # The attack the review reproduced: a site refused for its budget, asked again under fresh run ids (a new run,
    # a replay), trained on. Now every run on the same data charges one lifetime ledger, and the site's own cap
    # (its policy, not the run config) stops it whatever the run id.
    (tmp_path / "policy.toml").write_text("epsilon-cap = 6.0\n")
    run_config = {**TINY, "num-server-rounds": 8, "dp.noise-multiplier": 1.0, "dp.target-epsilon": 50.0}
    arrays = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0))
    ctx = _context(run_config, tmp_path, flower_run=1)
    replies = [_send(ctx, arrays, rnd, MessageType.TRAIN, run_id="run-a") for rnd in range(1, 9)]
    refused = [r for r in replies if r.site.status == records.STATUS_REFUSED]
    assert refused and "lifetime ε on this data" in refused[0].site.reason and "cap 6" in refused[0].site.reason
    spent = max(r.epsilon_lifetime for r in replies)
    assert spent <= 6.0 and replies[0].epsilon_cap == 6.0
    for i, run_id in enumerate(("run-b", "replay-of-a", "run-a")):
        again = _send(_context(run_config, tmp_path, flower_run=2 + i), arrays, 1, MessageType.TRAIN, run_id=run_id)
        assert again.site.status == records.STATUS_REFUSED and "lifetime ε" in again.site.reason
        assert again.epsilon_lifetime == pytest.approx(spent)  # nothing more was spent
    # One file per site, every entry with its run and its data's fingerprint, and the census of that data.

    saved = json.loads((tmp_path / "lifetime.json").read_text())
    assert len(saved["censuses"]) == 1 and {e["run_id"] for e in saved["entries"]} == {"run-a"}
    # Other data at the same site (here: another partitioning the run config chose) does not start a fresh cap:
    # most rows, most people, are in both. It gets its own census, and stays refused.
    other = _send(_context({**run_config, "data.partitioner": "iid"}, tmp_path, flower_run=9), arrays, 1,
                  MessageType.TRAIN, run_id="run-c")
    assert other.site.status == records.STATUS_REFUSED and "lifetime ε" in other.site.reason


def test_a_site_upgrading_from_per_run_ledgers_keeps_what_it_spent(tmp_path):
    from client.privacy import DPSGD, LedgerEntry, to_state
    from client.state import Lifetime

    old = [LedgerEntry(1, DPSGD, "subsampled-gaussian", 2.0, 0.1, 10, 1.0)]  # a small spend: the cap (16) allows more
    (tmp_path / "run-2025.json").write_text(json.dumps({"ledger": to_state(old), "plan": {"rounds": 5}}))
    lifetime = Lifetime(tmp_path, "site-0", "f" * 64)
    assert lifetime.all() == old and lifetime.of_run("run-2025") == old
    # A run named like the ledger file cannot overwrite it: run state lives under a digest of the run id.
    run_config = {**TINY, "dp.noise-multiplier": 1.0}
    ctx = Context(run_id=5, node_id=100, node_config={"partition-id": 0, "num-partitions": 3,
                                                      "state-dir": str(tmp_path)}, state=RecordDict(),
                  run_config=run_config)
    from common.config import AppConfig

    cfg = AppConfig.from_run_config(TINY)
    arrays = trainable_state(build_model(cfg.model, cfg.data.labels, seed=0))
    reply = _send(ctx, arrays, 1, MessageType.TRAIN, run_id="lifetime")
    assert reply.site.status == records.STATUS_OK
    saved = json.loads((tmp_path / "lifetime.json").read_text())
    assert {e["run_id"] for e in saved["entries"]} == {"run-2025", "lifetime"}
    assert sum(e["run_id"] == "run-2025" for e in saved["entries"]) == 1  # imported once, not once per re-read


def test_cached_features_live_with_the_site_unless_a_simulation_shares_one_folder(tmp_path, monkeypatch):
    from client.state import features_folder

    monkeypatch.delenv("FEDLENS_FEATURE_CACHE", raising=False)
    monkeypatch.delenv("FEDLENS_FEATURE_CACHE_SHARED", raising=False)
    assert features_folder({"state-dir": str(tmp_path / "own")}, "a") == tmp_path / "own"
    monkeypatch.setenv("FEDLENS_FEATURE_CACHE", str(tmp_path / "cache"))
    assert features_folder({}, "a b") == tmp_path / "cache" / "a_b"
    monkeypatch.setenv("FEDLENS_FEATURE_CACHE_SHARED", "1")  # simulated sites on one machine (benchmarks)
    assert features_folder({}, "a") == features_folder({}, "b") == tmp_path / "cache"
