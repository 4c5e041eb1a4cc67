"""Every dashboard page under Streamlit's AppTest, against hand-made edge-case stores and a synthetic full run."""

import pytest
from streamlit.testing.v1 import AppTest

from common.config import PROJECT_ROOT
from common.rounds import Event, RoundRecord, SiteRoundRow
from common.run_store import RunWriter
from dashboard.bench import PAGES, make_store

APP = str(PROJECT_ROOT / "dashboard" / "streamlit_app.py")


def _open(monkeypatch, store, page=None):
    monkeypatch.setenv("FEDLENS_STORE", str(store))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    if page:
        at.switch_page(page).run()
        assert not at.exception, at.exception
    return at


def _texts(at):
    return " ".join(str(e.value) for kind in (at.info, at.warning, at.error, at.success, at.caption, at.title,
                                              at.markdown, at.subheader) for e in kind)


@pytest.mark.parametrize("page", [None, *PAGES])
def test_an_empty_store_says_how_to_start_on_every_page(monkeypatch, tmp_path, page):
    at = _open(monkeypatch, tmp_path / "none.db", page)
    assert "No runs in" in _texts(at) and "fedlens simulate" in _texts(at)


def test_a_run_at_round_zero_says_round_one_is_in_progress(monkeypatch, tmp_path):
    w = RunWriter(tmp_path / "s.db", "live")
    w.start(scenario="t", rounds_planned=5, model="m", config={"dp.enabled": True, "dp.target-epsilon": 8.0})
    at = _open(monkeypatch, tmp_path / "s.db")
    assert "Round 1 is in progress" in _texts(at)
    assert at.metric[0].value == "0 / 5"
    for page, says in (("views/errors.py", "No site has released an error summary yet"),
                       ("views/privacy.py", "No site has spent any ε yet"),
                       ("views/cross_site.py", "No evaluation has been committed yet"),
                       ("views/whatif.py", "kept no per-round updates"),
                       ("views/findings.py", "No findings yet")):
        assert says in _texts(at.switch_page(page).run()), page


def _failed_run(path):
    w = RunWriter(path, "r")
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
    return path


def test_a_failed_site_shows_its_reason_and_a_failed_run_its_error(monkeypatch, tmp_path):
    at = _open(monkeypatch, _failed_run(tmp_path / "s.db"))
    assert "The run failed: RuntimeError: boom" in _texts(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy (test set)"] == "0.700"
    assert metrics["Max ε spent / budget"] == "3.30 / 8"
    assert metrics["Worst site"] == "clinic-b"
    assert "clinic-b (failed: site clinic-b: data file x.csv does not exist)" in _texts(at)
    at.switch_page("views/sites.py").run()
    sites, failures = (at.dataframe[i].value.set_index("site") for i in (0, 5))
    assert list(sites.index) == ["clinic-a", "clinic-b"]
    assert sites.loc["clinic-b", "status"] == "failed" and sites.loc["clinic-b", "health"] == "✗ failed"
    assert "does not exist" in failures.loc["clinic-b", "reason"]


def test_a_collapsed_model_is_called_out(monkeypatch, tmp_path):
    w = RunWriter(tmp_path / "s.db", "r")
    w.start(scenario="t", rounds_planned=1, model="m", config={"dp.enabled": False})
    w.write_round(RoundRecord(1, 1.0, {"test_accuracy": 0.654, "test_macro_f1": 0.264, "test_max_prediction_share": 1.0}))
    at = _open(monkeypatch, tmp_path / "s.db")
    assert "collapsed onto the majority class" in _texts(at)
    assert {m.label: m.value for m in at.metric}["Max ε spent / budget"] == "no DP"
    assert "dp.enabled = false" in _texts(at.switch_page("views/privacy.py").run())


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("full") / "s.db", sites=6, rounds=4, failing=("site-002",))


def test_every_page_of_a_full_run_shows_its_numbers(monkeypatch, full_store):
    at = _open(monkeypatch, full_store)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Round"] == "4 / 4" and metrics["Open findings"] == "1" and metrics["Worst site"] == "site-002"
    assert at.sidebar.selectbox[0].value == "synthetic"  # the run id alone: a longer label was cut at 1280 px
    assert "completed · 4/4 rounds" in [c.value for c in at.sidebar.caption]
    # 6 sites of 30 validation examples, each release at σ = 4.8: the sites' global accuracy is noise (±0.4 at 2
    # std); it is said, not drawn. The test set's curve is exact and drawn.
    assert "Too noisy at these sites' sizes and ε to draw: accuracy from sites' validation" in _texts(at)

    at.switch_page("views/sites.py").run()
    from dashboard.data import MAX_COLUMNS, SITE_GROUPS, SITE_OVERVIEW

    tables = [d.value for d in at.dataframe]
    # The overview and one table per group, none wider than what reads at 1280 px, together every column.
    assert [list(t.columns) for t in tables[:6]] == [list(SITE_OVERVIEW), *map(list, SITE_GROUPS.values())]
    assert all(len(t.columns) <= MAX_COLUMNS for t in tables)
    overview, quality, errors, updates, privacy, failures = (t.set_index("site") for t in tables[:6])
    assert len(overview) == 6 and overview.loc["site-002", "health"] == "✗ failed"
    assert (overview.drop("site-002")["latest round"] == 4).all() and overview.loc["site-002", "latest round"] == 4
    assert (privacy.drop("site-002")["ε training"] > 0).all() and errors["ECE"].notna().sum() == 6
    assert updates.drop("site-002")["update cosine"].tolist() == [0.004] * 5  # round 4's
    # site-002 failed in round 4: its newest values are round 3's, and each group says so.
    assert quality.loc["site-002", "metrics round"] == 3 and updates.loc["site-002", "update round"] == 3
    assert quality.drop("site-002")["metrics round"].tolist() == [4] * 5
    assert "data file missing" in failures.loc["site-002", "reason"]
    one = tables[6].set_index("value")  # the detail of the first site
    assert one.loc["accuracy", "round"] == 4 and one.loc["update cosine", "round"] == 4
    # Every value of a site is in one of the tables (the detail lists them all).
    assert set(one.index) <= set().union(*(t.columns for t in tables[:6]))

    at.switch_page("views/findings.py").run()
    assert "site-002" in [h.value for h in at.subheader]
    assert "site-002 failed in train in round 4: data file missing" in _texts(at)
    # What a quiet page rules out, per site, at its size and release noise (server/findings/limits.py).
    rules_out = [m.value for m in at.markdown if m.value.startswith("**site-000**:")]
    assert len(rules_out) == 1 and ("cannot be seen" in rules_out[0] or "rules out nothing" in rules_out[0])

    at.switch_page("views/errors.py").run()
    assert {"Per-class F1", "Label issues (given → confidently)", "Confusion matrices (validation, rows = given label)"} \
        <= {h.value for h in at.subheader}
    assert "Noised values" in _texts(at) and "Round 4: 5 site(s)" in _texts(at)
    # A site's shares are noised, and the page says by how much: a validation share √3 · 9.6 / 30 at one std (a
    # confusion row or column of 3 cells: ±111 % at 2 std), a train share 9.6 / 120 (one count: ±16 %).
    assert "Each share is noised: ±16% to ±111% at 2 std" in _texts(at)

    at.switch_page("views/privacy.py").run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Most spent"] == "8.00 / 8" and metrics["Sites over 90 % of budget"] == "5"
    assert "add/remove one example" in _texts(at)  # the neighbour relation, stated on the page
    lifetime = next(d.value for d in at.dataframe if "lifetime ε" in d.value.columns)
    assert lifetime["lifetime ε"].max() == 9.5 and (lifetime["cap"] == 10.0).all()
    assert lifetime["left to cap"].min() == 0.5 and lifetime["this run"].max() == 8.0
    ledger_rows = at.dataframe[-1].value
    assert len(ledger_rows) == 6 * 4 * 2 - 2  # a DP-SGD segment and a summary per site and round; site-002 failed once

    at.switch_page("views/cross_site.py").run()
    assert "server test set column is exact" in _texts(at)
    # A collapsed model's accuracy is the majority share: the colour starts there; 6 sites x 4 rounds less the failed
    # one are 23 site cells, each ± 1.1 at 2 std (30 validation examples, σ 4.8): said, not drawn.
    assert "Red at or below 0." in _texts(at) and "too noisy at their sites' sizes and ε: 23 site cell(s)" in _texts(at)

    at.switch_page("views/runs.py").run()
    assert at.dataframe[0].value["run_id"].tolist() == ["synthetic"]


def test_two_runs_can_be_compared(monkeypatch, tmp_path):
    store = make_store(tmp_path / "s.db", sites=3, rounds=2, run_id="run-a")
    make_store(store, sites=3, rounds=3, run_id="run-b", seed=1)
    at = _open(monkeypatch, store, "views/runs.py")
    assert sorted(at.dataframe[0].value["run_id"]) == ["run-a", "run-b"]
    at.multiselect(key="compare").select("run-a").select("run-b").run()
    assert not at.exception
    compared = at.dataframe[1].value
    assert sorted(compared["run"]) == ["run-a", "run-b"] and sorted(compared["rounds"]) == [2, 3]


def test_an_unknown_run_in_the_address_says_so_and_shows_the_newest(monkeypatch, tmp_path):
    store = make_store(tmp_path / "s.db", sites=2, rounds=1, run_id="only")
    monkeypatch.setenv("FEDLENS_STORE", str(store))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = "nope"
    at.run()
    assert not at.exception
    assert "Run 'nope' (from the address) is not in this store" in " ".join(w.value for w in at.sidebar.warning)
    assert "run `only`" in _texts(at)


def test_the_local_models_matrix_shows_when_the_run_evaluated_across_sites(monkeypatch, tmp_path):
    from dashboard.bench import make_store

    store = make_store(tmp_path / "x.db", sites=3, rounds=2, cross_site=True)
    at = _open(monkeypatch, store, "views/cross_site.py")
    assert "Local models × sites" in [h.value for h in at.subheader]
    assert "Round 2, noised: each count carries noise of std 16.6 examples" in _texts(at)  # 4.8 · 2 · √3
    from dashboard import data

    frame, _ = data.local_cross_site(data.summaries(str(store), "synthetic", 2))
    assert len(frame) == 9 and frame[frame["model"] == "site-002's local model"]["value"].tolist() == [0.1] * 3
    off = _open(monkeypatch, make_store(tmp_path / "y.db", sites=3, rounds=2), "views/cross_site.py")
    assert "Off for this run" in _texts(off)


def test_a_collapse_finding_says_where_it_stands_at_the_newest_round(monkeypatch, tmp_path):
    from common.rounds import Finding, FindingKind

    w = RunWriter(tmp_path / "s.db", "r")
    w.start(scenario="t", rounds_planned=3, model="m", config={"dp.enabled": False})
    w.write_round(RoundRecord(1, 1.0, {"test_accuracy": 0.64, "test_max_prediction_share": 1.0}, findings=[
        Finding(FindingKind.MAJORITY_COLLAPSE, "critical", "predicts one class for 100% of the test set")]))
    w.write_round(RoundRecord(2, 1.0, {"test_accuracy": 0.66, "test_max_prediction_share": 0.96}))
    at = _open(monkeypatch, tmp_path / "s.db", "views/findings.py")
    assert "predicts one class for 100% of the test set" in _texts(at)  # the sentence keeps round 1's numbers
    assert "Now, at round 2: 96% of the test predictions are one class (still collapsed)." in _texts(at)
