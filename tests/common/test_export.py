"""Export to MLflow and TensorBoard: what the store holds is what each tool's own reader gets back, once per round."""

import json
import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import AppConfig
from common.export import LAST, ExportError, LiveExport, export_run, round_series
from common.rounds import Event, Finding, FindingKind, RoundRecord, SiteRoundRow
from common.run_store import RunWriter, load_run
from dashboard.bench import make_store


def _mlflow(location: Path, run_id: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{location / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedlens")
    (found,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`fedlens.run_id` = '{run_id}'")
    return client, found


def _history(client, run, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def _tensorboard(location: Path, run_id: str) -> EventAccumulator:
    acc = EventAccumulator(str(location / run_id), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _same(got, want):
    """The same rounds, and values equal to float32's precision (TensorBoard keeps float32)."""
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def _scalars(acc, key):
    return [(e.step, e.value) for e in acc.Scalars(key)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("export") / "s.db", sites=3, rounds=4, failing=("site-002",))


def test_mlflow_reads_back_every_round_site_epsilon_and_finding(store, tmp_path):
    done = export_run(store, None, "mlflow", tmp_path)
    assert (done["rounds_written"], done["last_round"]) == (4, 4)
    run = load_run(store)
    client, found = _mlflow(tmp_path, "synthetic")
    assert found.info.status == "FINISHED" and found.data.tags["fedlens.scenario"] == "synthetic"
    assert found.data.params["dp.target-epsilon"] == str(run["config"]["dp.target-epsilon"])
    _same(_history(client, found, "global/test_accuracy"), [(r["round"], r["test_accuracy"]) for r in run["rounds"]])
    # ε of each site by round, as the store has it; the site that failed in round 4 reads ok = 0 there
    eps = [(s["round"], s["epsilon"]) for s in run["site_rounds"] if s["site"] == "site-001" and s["phase"] == "train"]
    _same(_history(client, found, "site/site-001/train/epsilon"), eps)
    assert _history(client, found, "site/site-002/train/ok") == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.0)]
    assert _history(client, found, "findings/site_failed") == [(4, 1.0)]
    findings = json.loads(Path(client.download_artifacts(found.info.run_id, "findings.json", str(tmp_path))).read_text())
    assert [(f["round"], f["site"], f["kind"]) for f in findings] == [(4, "site-002", "site_failed")]

    # Again: nothing is written twice.
    assert export_run(store, None, "mlflow", tmp_path)["rounds_written"] == 0
    assert len(client.get_metric_history(found.info.run_id, "global/test_accuracy")) == 4


def test_tensorboard_reads_back_every_round_and_the_findings_as_text(store, tmp_path):
    export_run(store, None, "tensorboard", tmp_path)
    run = load_run(store)
    acc = _tensorboard(tmp_path, "synthetic")
    _same(_scalars(acc, "global/test_accuracy"), [(r["round"], r["test_accuracy"]) for r in run["rounds"]])
    lifetime = [(s["round"], s["epsilon_lifetime"]) for s in run["site_rounds"]
                if s["site"] == "site-000" and s["phase"] == "evaluate"]
    _same(_scalars(acc, "site/site-000/evaluate/epsilon_lifetime"), lifetime)
    (text,) = acc.Tensors("findings/text_summary")
    assert text.step == 4 and "site-002 | site_failed | critical" in text.tensor_proto.string_val[0].decode()
    assert export_run(store, None, "tensorboard", tmp_path)["rounds_written"] == 0
    assert len(_tensorboard(tmp_path, "synthetic").Scalars("global/test_accuracy")) == 4


def test_a_round_cut_short_in_tensorboard_is_replaced_not_doubled(store, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    export_run(store, None, "tensorboard", tmp_path)
    w = SummaryWriter(str(tmp_path / "synthetic"))  # a round 5 that died before its last series
    w.add_scalar("global/test_accuracy", 123.0, 5)
    w.close()
    conn = sqlite3.connect(store)
    try:  # ... and the store's real round 5, committed later
        conn.execute("INSERT INTO rounds (run_id, round, completed_at, seconds, sites_ok, sites_failed, test_accuracy)"
                     " VALUES ('synthetic', 5, 0, 1.0, 2, 1, 0.75)")
        conn.commit()
        assert export_run(store, None, "tensorboard", tmp_path)["rounds_written"] == 1
    finally:
        conn.execute("DELETE FROM rounds WHERE round = 5")
        conn.commit()
        conn.close()
    run = load_run(store)
    _same(_scalars(_tensorboard(tmp_path, "synthetic"), "global/test_accuracy"),
          [(r["round"], r["test_accuracy"]) for r in run["rounds"]] + [(5, 0.75)])


def test_a_first_round_cut_short_in_tensorboard_is_replaced_not_doubled(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    store = tmp_path / "s.db"
    w = RunWriter(store, "r")
    w.start(scenario="t", rounds_planned=2, model="m", config={"dp.enabled": True})
    w.write_round(_round(1, 0.5))
    early = SummaryWriter(str(tmp_path / "tb" / "r"))  # the server died while writing round 1
    early.add_text("config", "{}", 0)
    early.add_scalar("global/test_accuracy", 123.0, 1)
    early.close()
    export_run(store, None, "tensorboard", tmp_path / "tb")
    acc = _tensorboard(tmp_path / "tb", "r")
    _same(_scalars(acc, "global/test_accuracy"), [(1, 0.5)])
    assert len(acc.Tensors("config/text_summary")) == 1


def test_a_run_id_that_is_not_a_plain_name_is_not_exported(tmp_path):
    store = tmp_path / "s.db"
    w = RunWriter(store, "../escaped")  # an old store's id: today's config refuses it (store.run-id)
    w.start(scenario="t", rounds_planned=1, model="m", config={})
    w.write_round(_round(1, 0.5))
    for target in ("tensorboard", "mlflow"):
        with pytest.raises(ExportError, match="its id is not a plain name"):
            export_run(store, "../escaped", target, tmp_path / "out" / target)
    assert not (tmp_path / "out" / "escaped").exists()


def _round(rnd: int, acc: float) -> RoundRecord:
    return RoundRecord(rnd, 2.0, {"test_accuracy": acc},
                       [SiteRoundRow("a", "train", "ok", num_examples=10, epsilon=float(rnd)),
                        SiteRoundRow("a", "evaluate", "ok", accuracy=acc, epsilon=float(rnd) + 0.5)],
                       [Event("site-joined", "a joined", "a")] if rnd == 1 else [],
                       findings=[Finding(FindingKind.LABEL_NOISE, "warning", "a: label noise", "a")] if rnd == 2 else [])


def test_live_export_follows_a_run_through_a_restart_with_one_copy_of_each_round(tmp_path):
    store = tmp_path / "s.db"
    w = RunWriter(store, "live")
    w.start(scenario="t", rounds_planned=3, model="m", config={"dp.enabled": True})
    w.write_round(_round(1, 0.5))
    w.write_round(_round(2, 0.6))
    live = LiveExport(store, "live", ("mlflow", "tensorboard"), str(tmp_path / "out"))
    assert live.sync() == []
    client, found = _mlflow(tmp_path / "out" / "mlflow", "live")
    assert found.info.status == "RUNNING"
    live.close()  # the server dies; a new one resumes the run and opens its own export
    w.write_round(_round(3, 0.7))
    w.finish("completed")
    again = LiveExport(store, "live", ("mlflow", "tensorboard"), str(tmp_path / "out"))
    assert again.sync() == []
    again.close()
    client, found = _mlflow(tmp_path / "out" / "mlflow", "live")
    assert found.info.status == "FINISHED"
    want = [(1, 0.5), (2, 0.6), (3, 0.7)]
    _same(_history(client, found, "site/a/evaluate/accuracy"), want)
    _same(_scalars(_tensorboard(tmp_path / "out" / "tensorboard", "live"), "global/test_accuracy"), want)
    assert _history(client, found, "findings/label_noise") == [(2, 1.0)]


def test_a_target_that_cannot_be_written_is_an_event_of_the_round_and_never_raises(tmp_path):
    from server.server_app import _record

    store = tmp_path / "s.db"
    w = RunWriter(store, "r")
    w.start(scenario="t", rounds_planned=1, model="m", config={})
    w.write_round(_round(1, 0.5))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the export folder should be")
    live = LiveExport(store, "r", ("tensorboard", "mlflow"), str(blocker))
    problems = live.sync()
    assert [p.split(" ")[0] for p in problems] == ["tensorboard", "mlflow"]
    assert str(blocker) in problems[0]
    # As the ServerApp uses it: in the background after each round, its failures recorded as the round's events.
    live.submit()
    _record(w, live.finish(timeout=60), 1)
    live.close()
    events = [(e["round"], e["kind"], e["message"].split(" ")[0]) for e in load_run(store)["events"]]
    assert (1, "export-failed", "tensorboard") in events and (1, "export-failed", "mlflow") in events


def test_round_series_leaves_out_what_is_not_a_finite_number():
    run = {"rounds": [{"round": 1, "seconds": 2.0, "sites_ok": 1, "sites_failed": 0, "test_accuracy": float("nan")}],
           "site_rounds": [{"round": 1, "site": "a", "phase": "train", "status": "failed", "reason": "boom",
                            "epsilon": None, "update_norm": float("inf"), "steps": 3}],
           "findings": []}
    assert round_series(run, 1) == {"round/sites_ok": 1.0, "round/sites_failed": 0.0, "site/a/train/ok": 0.0,
                                     "site/a/train/steps": 3.0, "findings/count": 0.0, LAST: 2.0}


def test_a_run_id_and_an_export_folder_are_checked_with_the_config():
    with pytest.raises(ValueError, match=r"store.run-id must be empty \(a new id\) or up to 128 letters"):
        AppConfig.from_run_config({"store.run-id": "../x"})
    with pytest.raises(ValueError, match="store.export-dir must be a folder"):
        AppConfig.from_run_config({"store.export": "tensorboard", "store.export-dir": "http://mlflow:5000"})
    live = LiveExport("s.db", "r", ("mlflow",), "http://mlflow.example:5000")
    assert live.locations == {"mlflow": "http://mlflow.example:5000"}  # a tracking server, used as it is


def test_an_unknown_export_target_is_refused_by_name():
    with pytest.raises(ValueError, match=r"store.export: unknown export target\(s\) 'wandb'"):
        AppConfig.from_run_config({"store.export": "mlflow, wandb"})
    assert AppConfig.from_run_config({"store.export": "TensorBoard,mlflow"}).store.export_targets() == (
        "tensorboard", "mlflow")
