"""`fedlens diagnose`: this version's diagnosis over a stored run, compared with what the run recorded."""

import json

from typer.testing import CliRunner

from common.rounds import Finding, RoundRecord, SiteRoundRow
from common.run_store import RunWriter, load_round_records
from fedlens.cli import app


def _store(path):
    w = RunWriter(path, "r")
    w.start(scenario="t", rounds_planned=2, model="m", config={"data.labels": "neg,neu,pos", "dp.loss-clip": 3.0})
    for rnd in (1, 2):
        sites = [SiteRoundRow(s, "train", "ok", num_examples=96, steps=2, sample_rate=1.0, seconds=10.0,
                              update_norm=5.0 + 0.01 * i) for i, s in enumerate(("a", "b", "c"))]
        sites.append(SiteRoundRow("d", "train", "failed", reason="site d: data file /x.csv does not exist"))
        rec = RoundRecord(rnd, 12.0, {"test_accuracy": 0.65, "test_max_prediction_share": 1.0}, sites)
        # What an older version recorded, under the straggler finding's first name ("dropout", read back as
        # straggler): a finding the current rules no longer see (a made-up stale finding).
        rec.findings = [Finding("dropout", "warning", "b took long", "b")] if rnd == 1 else []
        w.write_round(rec)
    w.finish("completed")
    w.close()
    return path


def test_diagnose_reruns_the_current_rules_and_names_what_changed(tmp_path):
    store = _store(tmp_path / "s.db")
    records = load_round_records(store, "r")
    assert [r.round for r in records] == [1, 2] and {r.site for r in records[0].sites} == {"a", "b", "c", "d"}
    assert records[0].sites[0].num_examples == 96 and records[0].metrics["test_max_prediction_share"] == 1.0

    res = CliRunner().invoke(app, ["diagnose", "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    kinds = {(f["site"], f["kind"], f["round"]) for f in out["findings"]}
    # Recorded once, when they appear: the failing site and the collapsed model in round 1, not again in round 2.
    assert kinds == {("d", "site_failed", 1), (None, "majority_collapse", 1)}
    assert out["gone"] == [["b", "straggler"]] and [None, "majority_collapse"] in out["new"]
    text = CliRunner().invoke(app, ["diagnose", "--store", str(store)]).output
    assert "recorded, not found now: b:straggler" in text and "site d: data file /x.csv does not exist" in text
    missing = CliRunner().invoke(app, ["diagnose", "--store", str(tmp_path / "none.db")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
