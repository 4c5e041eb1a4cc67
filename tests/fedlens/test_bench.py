"""The bench harness's arithmetic and contract (the figures themselves are measured by `fedlens bench`, never
asserted on time here)."""

import pytest

from fedlens import bench


def test_round_overhead_is_the_share_of_the_round_when_no_site_was_computing():
    run = {"rounds": [{"round": 1, "train_wall": 2.0, "evaluate_wall": 1.0, "diagnostics_seconds": 0.1}],
           "site_rounds": [
               # two sites in parallel, then one alone (3 sites on 2 workers): busy 0.0-1.0 and 1.1-2.0
               {"round": 1, "phase": "train", "status": "ok", "started_at": 0.0, "ended_at": 1.0,
                "diagnostics_seconds": 0.02},
               {"round": 1, "phase": "train", "status": "ok", "started_at": 0.1, "ended_at": 0.9,
                "diagnostics_seconds": 0.02},
               {"round": 1, "phase": "train", "status": "ok", "started_at": 1.1, "ended_at": 2.0,
                "diagnostics_seconds": 0.02},
               {"round": 1, "phase": "evaluate", "status": "ok", "started_at": 2.2, "ended_at": 2.4,
                "diagnostics_seconds": 0.01},
               {"round": 1, "phase": "evaluate", "status": "failed", "started_at": None, "ended_at": None,
                "diagnostics_seconds": None}]}
    (row,) = bench._round_breakdown(run, workers=2)
    assert row["busy"] == pytest.approx(1.0 + 0.9 + 0.2) and row["overhead"] == pytest.approx(1 - 2.1 / 3.0)
    assert row["diagnostics"] == pytest.approx(0.07 / 2 + 0.1)


def test_the_contract_keys_and_a_clear_error_for_unknown_benchmarks():
    assert bench.KEYS == ("dp_overhead_lora", "dp_overhead_full", "round_overhead_3", "round_overhead_10",
                          "round_overhead_30", "startup_s", "diagnostics_share", "bytes_ratio_lora", "max_sites",
                          "max_sites_peak_gb", "dashboard_render_s", "head_round_ratio", "deploy_round_ratio",
                          "export_round_s")
    with pytest.raises(ValueError, match="unknown benchmark\\(s\\) nope; choose from dp_overhead"):
        bench.run(["nope"])


def test_bytes_per_round_serialises_real_replies():
    out = bench.run(["bytes_per_round"], progress=lambda m: None)
    assert out["details"]["bytes_per_round"]["values_lora"] == 74_883  # adapters + head of the real MiniLM
    assert 0.003 < out["bytes_ratio_lora"] < 0.004  # 74,883 of 22.7 M values, plus message framing
    assert out["dp_overhead_lora"] is None and set(bench.KEYS) <= set(out) and "cpus" in out["device"]
    assert "bytes_ratio_lora" in bench.format_table(out) and "met" in bench.format_table(out)
