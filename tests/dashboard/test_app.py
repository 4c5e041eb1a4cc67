"""The dashboard script under Streamlit's AppTest, against hand-made edge-case stores."""

from streamlit.testing.v1 import AppTest

from common.config import PROJECT_ROOT
from common.run_store import Event, RoundRecord, RunWriter, SiteRoundRow

APP = str(PROJECT_ROOT / "dashboard" / "streamlit_app.py")


def _open(monkeypatch, store):
    monkeypatch.setenv("FEDLENS_STORE", str(store))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def _texts(at):
    return " ".join(str(e.value) for kind in (at.info, at.warning, at.error, at.caption, at.title, at.markdown)
                    for e in kind)


def test_empty_store_says_how_to_start(monkeypatch, tmp_path):
    at = _open(monkeypatch, tmp_path / "none.db")
    assert "No runs in" in _texts(at) and "fedlens simulate" in _texts(at)


def test_a_run_at_round_zero_says_round_one_is_in_progress(monkeypatch, tmp_path):
    w = RunWriter(tmp_path / "s.db", "live")
    w.start(scenario="t", rounds_planned=5, model="m", config={"dp.enabled": True, "dp.target-epsilon": 8.0})
    at = _open(monkeypatch, tmp_path / "s.db")
    assert "Round 1 is in progress" in _texts(at)
    assert at.metric[0].value == "0 / 5"


def test_a_failed_site_shows_its_reason_and_a_failed_run_its_error(monkeypatch, tmp_path):
    w = RunWriter(tmp_path / "s.db", "r")
    w.start(scenario="t", rounds_planned=2, model="m", config={"dp.enabled": True, "dp.target-epsilon": 8.0})
    w.add_site("clinic-a", n_train=100, n_val=20)
    w.add_site("clinic-b", n_train=80, n_val=20)
    w.write_round(RoundRecord(1, 3.0, {"accuracy": 0.6, "macro_f1": 0.4, "loss": 0.9, "test_accuracy": 0.7,
                                       "test_macro_f1": 0.5, "test_loss": 0.8, "test_max_prediction_share": 0.6},
                              [SiteRoundRow("clinic-a", "train", "ok", num_examples=100, epsilon=3.1, update_norm=2.0),
                               SiteRoundRow("clinic-a", "evaluate", "ok", accuracy=0.6, macro_f1=0.4, loss=0.9,
                                            epsilon=3.3),
                               SiteRoundRow("clinic-b", "train", "failed", reason="site clinic-b: data file x.csv does not exist")],
                              [Event("site-failed", "clinic-b failed in train: data file x.csv does not exist", "clinic-b")]))
    w.finish("failed", error="RuntimeError: boom")
    at = _open(monkeypatch, tmp_path / "s.db")
    assert "The run failed: RuntimeError: boom" in _texts(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy (test set)"] == "0.700"
    assert metrics["Max ε spent / budget"] == "3.30 / 8"
    assert metrics["Sites failing"] == "1 / 2"
    sites = at.dataframe[0].value
    assert list(sites["site"]) == ["clinic-a", "clinic-b"]
    assert sites.set_index("site").loc["clinic-b", "status"] == "failed"
    assert "does not exist" in sites.set_index("site").loc["clinic-b", "reason"]


def test_a_collapsed_model_is_called_out(monkeypatch, tmp_path):
    w = RunWriter(tmp_path / "s.db", "r")
    w.start(scenario="t", rounds_planned=1, model="m", config={"dp.enabled": False})
    w.write_round(RoundRecord(1, 1.0, {"test_accuracy": 0.654, "test_macro_f1": 0.264, "test_max_prediction_share": 1.0}))
    at = _open(monkeypatch, tmp_path / "s.db")
    assert "collapsed onto the majority class" in _texts(at)
    assert {m.label: m.value for m in at.metric}["Max ε spent / budget"] == "no DP"
