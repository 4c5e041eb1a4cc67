"""A site's saved state across a resume: a new Flower run (fresh context.state) of the same fedlens run keeps the
ledger, re-sends a reply for an instruction it already answered without charging again, and trains on for new
rounds from the restored ledger."""

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

    # The ledger went on from round 2: three DP-SGD rounds in all, as in a run that was never interrupted.
    straight = _context(run_config, tmp_path / "other", flower_run=3)
    s1 = _send(straight, arrays, 1, MessageType.TRAIN, run_id="run-b")
    s2 = _send(straight, s1.arrays, 2, MessageType.TRAIN, run_id="run-b")
    s3 = _send(straight, s2.arrays, 3, MessageType.TRAIN, run_id="run-b")
    assert r3.epsilon == pytest.approx(s3.epsilon, rel=1e-12)
    assert s2.epsilon < s3.epsilon


def test_another_fedlens_run_starts_its_own_ledger(tiny_cfg, tmp_path):
    run_config = {**TINY, "num-server-rounds": 3, "dp.noise-multiplier": 1.0}
    arrays = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0))
    ctx = _context(run_config, tmp_path, flower_run=1)
    a = _send(ctx, arrays, 1, MessageType.TRAIN, run_id="run-a")
    b = _send(_context(run_config, tmp_path, flower_run=2), arrays, 1, MessageType.TRAIN, run_id="run-b")
    assert a.epsilon == pytest.approx(b.epsilon)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-a.json", "run-a.train.reply", "run-b.json",
                                                          "run-b.train.reply"]
