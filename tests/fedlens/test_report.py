"""fedlens/report.py on hand-made stores: the per-site part of the JSON contract (docs/report-schema.md), pinned.

The end-to-end report of a real run is pinned in tests/e2e/test_smoke.py (slow)."""

import json

import pytest

from common.config import default_run_config
from common.rounds import Event, Finding, FindingKind, RoundRecord, SiteRoundRow
from common.run_store import RunWriter
from fedlens.report import SCHEMA_VERSION, build_report, dumps, format_text

CONFIG = {**default_run_config(), "dp.target-epsilon": 8.0, "dp.target-delta": 1e-5, "dp.diagnostics-share": 0.25}


@pytest.fixture
def store(tmp_path):
    # Prepare: "a" trains, then fails; "b" is refused, then fine; "waiting" joined and never answered; "ghost" failed
    # to start (an event only); "ghost2" failed to start and then in round 1 (an event and a row, never joined).
    path = tmp_path / "s.db"
    w = RunWriter(path, "edge")
    w.start(scenario="t", rounds_planned=3, model="m", config=CONFIG)
    for site, n_train in (("a", 100), ("b", 80), ("waiting", None)):
        w.add_site(site, n_train=n_train, n_val=20 if n_train else None)
    w.event(Event("site-failed", "ghost failed to start: boom", "ghost"))
    w.event(Event("site-failed", "ghost2 failed to start: bang", "ghost2"))
    w.write_round(RoundRecord(1, 3.0, {"accuracy": 0.6, "macro_f1": 0.4, "loss": 0.9}, [
        SiteRoundRow("a", "train", "ok", num_examples=100, epsilon=3.1, update_norm=2.0, noise_multiplier=1.1,
                     epsilon_training=2.0),
        SiteRoundRow("a", "evaluate", "ok", accuracy=0.6, macro_f1=0.4, loss=0.9, train_loss=0.8, epsilon=3.3,
                     epsilon_lifetime=float("inf"), epsilon_cap=10.0),
        SiteRoundRow("b", "train", "refused", reason="budget would be exceeded by 0.3"),
        SiteRoundRow("ghost2", "train", "failed", reason="no data")],
        [Event("site-failed", "ghost2 failed in train: no data", "ghost2")]))
    w.write_round(RoundRecord(2, 3.0, {"accuracy": 0.6, "macro_f1": 0.4, "loss": 0.9}, [
        SiteRoundRow("a", "train", "failed", reason="timeout", noise_multiplier=1.2),
        SiteRoundRow("b", "train", "ok", epsilon=1.0),
        SiteRoundRow("b", "evaluate", "ok", accuracy=0.7, loss=0.5, epsilon=1.2, epsilon_lifetime=5.0,
                     epsilon_cap=16.0)],
        # An older store's name for the straggler finding: the report shows today's (schema 5).
        findings=[Finding("dropout", "warning", "b took 90 s", "b", 0.8),  # type: ignore[arg-type]
                  Finding(FindingKind.SITE_FAILED, "critical", "a failed in train in round 2: timeout", "a")]))
    w.finish("failed", error="RuntimeError: boom")
    w.close()
    return path


def test_every_site_the_run_knows_is_reported_with_its_latest_status(store):
    # Execute
    rep = build_report(store)
    sites = {s["site"]: s for s in rep["sites"]}

    # Assert
    assert rep["schema_version"] == SCHEMA_VERSION == 5
    assert [s["site"] for s in rep["sites"]] == ["a", "b", "waiting", "ghost", "ghost2"]
    a, b = sites["a"], sites["b"]
    assert (a["status"], a["last_reason"], a["rounds_trained"], a["noise_multiplier"]) == ("failed", "timeout", 1, 1.2)
    assert (a["epsilon"], a["epsilon_training"], a["epsilon_diagnostics"]) == (3.3, 2.0, 0.0)  # DP on: none is 0
    assert (a["epsilon_budget"], a["delta"], a["examples"], a["validation_examples"]) == (8.0, 1e-5, 100, 20)
    assert a["metrics"] == {"accuracy": 0.6, "macro_f1": 0.4, "loss": 0.9, "train_loss": 0.8}
    assert (a["epsilon_lifetime"], a["epsilon_cap"]) == (None, 10.0)  # ∞ (a run without DP) reads null
    assert (b["status"], b["last_reason"], b["rounds_trained"]) == ("ok", "budget would be exceeded by 0.3", 1)
    assert b["metrics"] == {"accuracy": 0.7, "macro_f1": None, "loss": 0.5, "train_loss": None}
    assert (b["epsilon"], b["epsilon_lifetime"], b["epsilon_cap"]) == (1.2, 5.0, 16.0)
    # Joined, no row yet: ok, nothing spent.
    assert (sites["waiting"]["status"], sites["waiting"]["epsilon"], sites["waiting"]["metrics"]["accuracy"]) \
        == ("ok", 0.0, None)
    # Never joined: failed, with its first failure.
    for name, first in (("ghost", "ghost failed to start: boom"), ("ghost2", "ghost2 failed to start: bang")):
        assert (sites[name]["status"], sites[name]["last_reason"], sites[name]["examples"]) == ("failed", first, None)
        assert sites[name]["ledger"] == [] and sites[name]["epsilon"] is None
    assert [(f["kind"], f["site"]) for f in rep["findings"]] == [("straggler", "b"), ("site_failed", "a")]
    assert {e["kind"] for e in rep["events"]} == {"site-failed"}  # event kinds keep their hyphens
    assert (rep["dp"], rep["diagnostics_share"], rep["neighbouring_relation"]) == (True, 0.25, "add_remove")


def test_the_report_is_valid_json_and_a_text_table(store):
    rep = build_report(store)
    assert json.loads(dumps(rep))["sites"][0]["epsilon_lifetime"] is None
    text = format_text(rep)
    assert "ghost2" in text and "round 2: [warning, straggler, confidence 0.80] b took 90 s" in text


def test_a_run_without_dp_reports_no_epsilon(tmp_path):
    # Prepare
    w = RunWriter(tmp_path / "s.db", "nodp")
    w.start(scenario="t", rounds_planned=1, model="m", config={**CONFIG, "dp.enabled": False})
    w.add_site("a", n_train=10, n_val=5)
    w.write_round(RoundRecord(1, 1.0, {"test_accuracy": 0.65}, [SiteRoundRow("a", "train", "ok"),
                                                                SiteRoundRow("a", "evaluate", "ok", accuracy=0.5)]))
    w.close()

    # Execute
    rep = build_report(tmp_path / "s.db")

    # Assert
    [a] = rep["sites"]
    assert (rep["dp"], rep["diagnostics_share"], rep["neighbouring_relation"]) == (False, None, None)
    assert (a["epsilon"], a["epsilon_budget"], a["delta"], a["epsilon_training"]) == (None, None, None, None)
    assert (a["status"], a["rounds_trained"], a["metrics"]["accuracy"]) == ("ok", 1, 0.5)
