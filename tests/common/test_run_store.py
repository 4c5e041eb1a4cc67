"""The run store: one transaction per round, consistent reads, clear errors for unknown runs."""

import sqlite3

import pytest

from common.rounds import Event, RoundRecord, SiteRoundRow
from common.run_store import RunWriter, list_runs, load_run


def _writer(tmp_path, run_id="r1"):
    w = RunWriter(tmp_path / "s.db", run_id)
    w.start(scenario="t", rounds_planned=3, model="m", config={"dp.enabled": True})
    return w


def test_a_round_is_written_whole(tmp_path):
    w = _writer(tmp_path)
    w.add_site("a", n_train=10, n_val=2)
    w.write_round(RoundRecord(1, 1.5, {"accuracy": 0.5, "test_accuracy": 0.6},
                              [SiteRoundRow("a", "train", "ok", num_examples=10, epsilon=1.0),
                               SiteRoundRow("a", "evaluate", "ok", accuracy=0.5)],
                              [Event("site-failed", "b failed", "b")]))
    w.finish("completed")
    run = load_run(tmp_path / "s.db")
    assert run["status"] == "completed" and run["config"] == {"dp.enabled": True}
    assert [(r["round"], r["sites_ok"], r["test_accuracy"]) for r in run["rounds"]] == [(1, 1, 0.6)]
    assert len(run["site_rounds"]) == 2 and run["events"][0]["round"] == 1
    assert list_runs(tmp_path / "s.db")[0]["rounds_completed"] == 1


def test_a_failing_round_leaves_nothing_behind(tmp_path):
    w = _writer(tmp_path)
    # The second site row violates the phase CHECK: the whole round must roll back, round row included.
    bad = RoundRecord(1, 1.0, {"accuracy": 0.5}, [SiteRoundRow("a", "train", "ok"), SiteRoundRow("a", "bogus", "ok")],
                      [Event("x", "y")])
    with pytest.raises(sqlite3.IntegrityError):
        w.write_round(bad)
    run = load_run(tmp_path / "s.db", "r1")
    assert run["rounds"] == [] and run["site_rounds"] == [] and run["events"] == []
    w.write_round(RoundRecord(1, 1.0, {}, [SiteRoundRow("a", "train", "ok")]))  # the round can then be written
    assert len(load_run(tmp_path / "s.db", "r1")["rounds"]) == 1


def test_readers_see_committed_rounds_while_the_writer_is_open(tmp_path):
    w = _writer(tmp_path)
    w.write_round(RoundRecord(1, 1.0, {}, []))
    assert len(load_run(tmp_path / "s.db", "r1")["rounds"]) == 1  # read-only connection, writer still open
    assert load_run(tmp_path / "s.db", "r1")["status"] == "running"


def test_unknown_run_and_missing_store_say_what_is_there(tmp_path):
    _writer(tmp_path, "known")
    with pytest.raises(LookupError, match="run 'nope' is not in .*; known runs: known"):
        load_run(tmp_path / "s.db", "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "none.db")
