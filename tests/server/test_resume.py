"""Where a run picks up again: a new run starts, an interrupted one resumes after its last committed round with
the saved thresholds, and a completed run, a changed config or a missing checkpoint is refused with the reason."""

from collections import OrderedDict

import numpy as np
import pytest

from common.checkpoints import Checkpoints
from common.config import AppConfig
from common.rounds import RoundRecord
from common.run_store import RunWriter, load_round_records, load_run
from server.server_app import resume_point
from tests.conftest import TINY
from tests.server.test_strategy import GLOBAL, FakeGrid, make_strategy, site, task_identity  # noqa: F401


def _interrupted(tmp_path, *, keep=5):
    cfg = AppConfig.from_run_config({**TINY, "store.path": str(tmp_path / "s.db"), "store.run-id": "r"})
    writer = RunWriter(cfg.store.path, "r")
    ckpt = Checkpoints(cfg.store.path, "r", keep=keep)
    writer.start(scenario="t", rounds_planned=2, model="m", config=cfg.raw)
    w = OrderedDict(x=np.ones(2, np.float32))
    ckpt.save(1, w, {}, {"thresholds": [0.4, 0.5, 0.6]})
    writer.write_round(RoundRecord(round=1, seconds=1.0))
    ckpt.save(2, w, {})  # round 2 was under way, never committed
    return cfg, writer, ckpt


def test_a_new_run_starts_and_an_interrupted_one_resumes_after_its_last_committed_round(tmp_path):
    cfg = AppConfig.from_run_config({**TINY, "store.path": str(tmp_path / "s.db")})
    assert resume_point(cfg, RunWriter(cfg.store.path, "new"), Checkpoints(cfg.store.path, "new", keep=5)) is None
    cfg, writer, ckpt = _interrupted(tmp_path)
    assert resume_point(cfg, writer, ckpt) == (1, {"thresholds": [0.4, 0.5, 0.6]})
    run = load_run(cfg.store.path, "r")
    assert run["status"] == "running" and [e["kind"] for e in run["events"]] == ["run-resumed"]


def test_resuming_is_refused_when_it_could_not_be_exact(tmp_path):
    cfg, writer, ckpt = _interrupted(tmp_path)
    changed = AppConfig.from_run_config({**cfg.raw, "dp.target-epsilon": 4.0, "store.path": cfg.store.path})
    with pytest.raises(ValueError, match=r"cannot resume with a different config; changed: dp.target-epsilon "
                                         r"\(8.0 -> 4.0\)"):
        resume_point(changed, writer, ckpt)
    with pytest.raises(ValueError, match="cannot resume after round 1: round 1 has no checkpoint"):
        resume_point(cfg, writer, Checkpoints(tmp_path / "elsewhere" / "s.db", "r", keep=5))  # no weights there
    writer.finish("completed")
    with pytest.raises(ValueError, match="run r already completed"):
        resume_point(cfg, writer, ckpt)


def test_a_resumed_round_loop_keeps_its_findings_and_baselines(tmp_path):
    # A site that fails every round and a training loss that rises: one site_failed finding at round 1, and an
    # underfitting trend whose baseline is round 1's loss. Resumed after round 2, the loop must neither record them
    # again nor judge round 3 against a fresh baseline.
    from flwr.app import Error

    def crashy(m):
        from common import records

        if m.metadata.message_type == "query":
            return records.pack_hello(records.SiteInfo("crashy", 10, 5))
        return Error(code=2, reason="site crashy: disk full")

    behaviour = {1: site("a"), 2: site("b"), 3: site("c"), 4: crashy}

    def findings(path):
        return [(f["round"], f["site"], f["kind"]) for f in load_run(path, "r")["findings"]]

    whole = RunWriter(tmp_path / "whole.db", "r")
    whole.start(scenario="t", rounds_planned=3, model="m", config={})
    make_strategy(whole).run(FakeGrid(behaviour), GLOBAL, 3)

    cut = RunWriter(tmp_path / "cut.db", "r")
    cut.start(scenario="t", rounds_planned=3, model="m", config={})
    first = make_strategy(cut)
    weights = first.run(FakeGrid(behaviour), GLOBAL, 2)
    resumed = make_strategy(cut)
    resumed.restore(["a", "b", "c"], first.thresholds, first.label_counts.to_state(),
                    load_round_records(tmp_path / "cut.db", "r"))
    resumed.run(FakeGrid(behaviour), weights, 3, start_round=3)
    assert findings(tmp_path / "cut.db") == findings(tmp_path / "whole.db")
    assert [k for _, s, k in findings(tmp_path / "cut.db") if s == "crashy"] == ["site_failed"]
    # The trend baselines are the stored rounds' metrics (round 1's training loss first), not round 3 alone.
    assert [h["train_loss"] for h in resumed.findings.history][:1] == [pytest.approx(0.6)]
    assert len(resumed.findings.history) == 3
