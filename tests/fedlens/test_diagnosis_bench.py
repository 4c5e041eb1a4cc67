"""The diagnosis benchmark: its drawn grid, and its scoring (right kind only, statistical and direct apart, clean
runs at site and run level, Wilson intervals), on made-up runs."""

import pytest

from fedlens.diagnosis_bench import ROUND_S, grid, scenario_toml, score, wilson


def _finding(site, kind, rnd, confidence=1.0, severity="warning"):
    return {"site": site, "kind": kind, "round": rnd, "confidence": confidence, "severity": severity, "message": ""}


def test_scores_credit_only_the_right_kind_and_keep_statistical_and_direct_apart():
    runs = [
        {"scenario": "a", "num_classes": 2, "sizes": {"s1": 2200},
         "faults": [{"site": "s1", "kind": "label_noise", "rate": 0.4},
                    {"site": "s2", "kind": "crash", "round": 2}],
         "findings": [_finding("s1", "data_shift", 1, 0.6), _finding("s1", "label_noise", 2, 0.9),
                      _finding("s2", "site_failed", 2), _finding(None, "majority_collapse", 1)],
         "rounds": [{"seconds": 10.0, "diagnostics_seconds": 0.1}], "ledger": []},
        {"scenario": "b", "num_classes": 2, "sizes": {"s3": 2200},
         "faults": [{"site": "s3", "kind": "label_flip", "share": 0.5}, {"site": "s4", "kind": "overfit"}],
         # s3 flagged for the wrong cause only; s4 missed; s0 a false alarm of a direct kind
         "findings": [_finding("s3", "data_shift", 3), _finding("s0", "divergence", 2)],
         "rounds": [{"seconds": 10.0, "diagnostics_seconds": 0.1}], "ledger": []},
        {"scenario": "c", "num_classes": 2, "faults": [{"site": "s2", "kind": "label_skew"}],  # clean: skew is no fault
         "findings": [_finding("s2", "label_skew", 2, severity="info"), _finding("s0", "budget_exhausted", 4)],
         "rounds": [], "ledger": []},
        {"scenario": "d", "num_classes": 2, "faults": [],
         "findings": [_finding(None, "global_overfitting", 4)], "rounds": [], "ledger": []},
        {"scenario": "e", "num_classes": 2, "faults": [], "findings": [_finding("s0", "label_flip", 3)],
         "rounds": [], "ledger": []},
    ]
    out = score(runs)
    st, di = out["statistical"], out["direct"]
    # Statistical: s1 found; s3 flagged for the wrong kind (an alarm, not a find); s0 in run e a false alarm.
    assert st["counts"] == {"found": 1, "false_alarms": 2, "missed": 1}
    assert st["precision"] == pytest.approx(1 / 3) and st["recall"] == pytest.approx(1 / 2)
    assert st["root_cause_accuracy"] == pytest.approx(1 / 2)  # s1's top finding names it, s3's does not
    assert st["rounds_to_detect"] == 2 and st["precision_ci"] == wilson(1, 3)
    # Direct: the crash found, the overfit missed, the divergence at s0 a false alarm.
    assert di["counts"] == {"found": 1, "false_alarms": 1, "missed": 1}
    assert out["clean_runs"] == 3
    cs = out["clean_silent_rate"]
    assert cs["site"] == pytest.approx(2 / 3) and cs["run"] == pytest.approx(2 / 3) and cs["both"] == pytest.approx(1 / 3)
    assert out["diagnostics_share"] == pytest.approx(0.01)
    assert out["statistical_by_band"]["≥1000 rows, rate ≥0.3"] == {"found": 1, "sites": 2, "recall": 0.5,
                                                                   "recall_ci": wilson(1, 2)}
    assert out["per_kind"]["overfit"]["found"] == 0 and out["per_kind"]["crash"]["found"] == 1
    assert "d: run global_overfitting" in out["false_alarms"]


def test_class_conditional_noise_on_two_classes_is_a_partial_flip():
    run = {"scenario": "a", "num_classes": 2, "rounds": [], "ledger": [],
           "faults": [{"site": "s1", "kind": "label_noise", "rate": 0.4, "classes": [1]}],
           "findings": [_finding("s1", "label_flip", 2)]}
    assert score([run])["statistical"]["recall"] == 1.0
    assert score([{**run, "num_classes": 3}])["statistical"]["recall"] == 0.0


def test_wilson_intervals_pin_numbers():
    assert wilson(0, 0) is None
    assert wilson(10, 10) == [0.722, 1.0] and wilson(0, 10) == [0.0, 0.278] and wilson(5, 10) == [0.237, 0.763]


def test_the_grid_draws_its_faults_from_the_stated_ranges_and_is_a_valid_set_of_scenarios(tmp_path):
    from common.config import AppConfig, load_overrides, parse_faults, resolve_run_config

    runs = grid(3)
    assert len(runs) == 24 and grid(3) == runs and grid(4) != runs  # seeded: a new seed is a fresh draw
    clean = [r for r in runs if not [f for f in r["faults"] if f["kind"] != "label_skew"]]
    assert len(clean) == 10 and sum(r["config"].get("data.dirichlet-alpha") == 0.3 for r in clean) == 3
    assert {r["config"]["data.source"] for r in runs} == {"movies", "drugreview"}
    assert {r["config"]["data.partitioner"] for r in runs} == {"iid", "natural", "dirichlet"}
    assert len({r["config"]["data.seed"] for r in runs}) >= 3
    for r in runs:
        for f in r["faults"]:
            if f["kind"] == "label_noise":
                assert 0.1 <= f["rate"] <= 0.5
            elif f["kind"] == "label_flip":
                assert 0.3 <= f["share"] <= 1.0
            elif f["kind"] == "lr_blowup":
                assert 3 <= f["factor"] <= 50
            elif f["kind"] == "straggler":  # 2-10 rounds' time more each round
                assert 2 * ROUND_S <= f["seconds"] <= 10 * ROUND_S and "factor" not in f
        path = tmp_path / f"{r['name']}.toml"
        path.write_text(scenario_toml(r))
        cfg = AppConfig.from_run_config(resolve_run_config(load_overrides(path)))  # a valid scenario
        assert [f.kind for f in parse_faults(cfg.faults)] == [f["kind"] for f in r["faults"]]
    assert len(grid(3, full=True)) == 3 * 10 + 3 * 18


def test_rescore_scores_kept_stores_with_the_current_rules_and_says_so(tmp_path):
    from common.rounds import Finding, RoundRecord, SiteRoundRow
    from common.run_store import RunWriter
    from fedlens.diagnosis_bench import rescore

    with pytest.raises(ValueError, match="no run stores"):
        rescore(tmp_path)
    w = RunWriter(tmp_path / "crash.db", "r")
    w.start(scenario="crash", rounds_planned=1, model="m", config={})
    w.record_faults([("c", "crash", {"round": 1})])
    sites = [SiteRoundRow(s, "train", "ok", num_examples=96, steps=2, sample_rate=1.0, seconds=5.0,
                          update_norm=3.0) for s in ("a", "b")]
    sites.append(SiteRoundRow("c", "train", "failed", reason="injected crash at round 1"))
    rec = RoundRecord(1, 6.0, {}, sites)
    rec.findings = [Finding("dropout", "warning", "stale", "a")]  # what an older rule recorded: a false alarm
    w.write_round(rec)
    w.finish("completed")
    w.close()
    out = rescore(tmp_path, progress=lambda m: None)
    # Re-derived from the stored rows: the crashed site is found, the stale false alarm is not there.
    assert out["direct"]["precision"] == 1.0 and out["direct"]["recall"] == 1.0 and out["rescored"] is True
    assert out["runs"][0]["findings"] == ["c:site_failed@1"]


def test_a_run_level_finding_that_holds_on_the_servers_validation_part_is_true_not_a_false_alarm():
    from fedlens.diagnosis_bench import holds_on_validation

    def rnd(i, test, val):  # (loss, accuracy, confidence) on the test and the validation part
        return {"round": i, "train_loss": 1.0 - 0.1 * i, "test_loss": test[0], "test_accuracy": test[1],
                "test_confidence": test[2], "server_val_loss": val[0], "server_val_accuracy": val[1],
                "server_val_confidence": val[2]}

    # A drug-review clean run: the model gets worse and overconfident on both parts.
    worse = [rnd(1, (0.92, 0.62, 0.71), (0.90, 0.63, 0.71)), rnd(2, (1.06, 0.60, 0.76), (1.00, 0.60, 0.76)),
             rnd(3, (1.17, 0.57, 0.73), (1.10, 0.55, 0.74))]
    # Only the test sample moves: on the validation part the loss falls and confidence meets accuracy.
    sample = [{**r, "server_val_loss": 0.9 - 0.05 * i, "server_val_accuracy": 0.7, "server_val_confidence": 0.72}
              for i, r in enumerate(worse)]
    over, miscal = _finding(None, "global_overfitting", 3), _finding(None, "miscalibration", 3)
    assert holds_on_validation(over, worse) and holds_on_validation(miscal, worse)
    assert not holds_on_validation(over, sample) and not holds_on_validation(miscal, sample)
    assert not holds_on_validation(_finding(None, "miscalibration", 1), worse)  # not yet there by round 1
    # Underconfident on the validation part does not confirm overconfidence on the test part.
    under = [{**r, "server_val_confidence": r["server_val_accuracy"] - 0.15} for r in worse]
    assert not holds_on_validation(miscal, under)
    assert not holds_on_validation(_finding(None, "underfitting", 3), worse)  # the sites' loss: nothing to check
    assert not holds_on_validation(miscal, [{k: v for k, v in r.items() if "val" not in k} for r in worse])
    runs = [{"scenario": n, "num_classes": 3, "faults": [], "rounds": rounds, "ledger": [], "findings": [over, miscal]}
            for n, rounds in (("true", worse), ("sample", sample))]
    out = score(runs)
    cs = out["clean_silent_rate"]
    assert cs["both"] == 0.0 and cs["both_confirmed_only"] == 0.5  # the raw count keeps both; the check spares one
    assert "true: run miscalibration (holds on the server's validation part too)" in out["false_alarms"]
