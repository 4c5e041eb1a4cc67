"""The bench harness's arithmetic and contract (the figures themselves are measured by `fedlens bench`, never
asserted on time here)."""

import pytest

from fedlens import bench


def test_round_overhead_counts_only_what_is_not_site_compute():
    run = {"rounds": [{"round": 1, "train_wall": 2.0, "evaluate_wall": 1.0, "diagnostics_seconds": 0.1}],
           "site_rounds": [
               {"round": 1, "phase": "train", "status": "ok", "seconds": 1.0, "diagnostics_seconds": 0.02},
               {"round": 1, "phase": "train", "status": "ok", "seconds": 1.0, "diagnostics_seconds": 0.02},
               {"round": 1, "phase": "train", "status": "ok", "seconds": 1.0, "diagnostics_seconds": 0.02},
               {"round": 1, "phase": "evaluate", "status": "ok", "seconds": 0.2, "diagnostics_seconds": 0.01},
               {"round": 1, "phase": "evaluate", "status": "failed", "seconds": None, "diagnostics_seconds": None}]}
    (row,) = bench._round_breakdown(run, workers=2)
    # train: 3 s of compute on 2 workers -> 1.5 s ideal; evaluate: one 0.2 s site -> 0.2 s; wall 3 s.
    assert row["ideal"] == pytest.approx(1.7) and row["overhead"] == pytest.approx(1 - 1.7 / 3.0)
    assert row["diagnostics"] == pytest.approx(0.07 / 2 + 0.1)


def test_the_contract_keys_and_a_clear_error_for_unknown_benchmarks():
    assert bench.KEYS == ("dp_overhead_lora", "dp_overhead_full", "round_overhead_3", "round_overhead_10",
                          "round_overhead_30", "startup_s", "diagnostics_share", "bytes_ratio_lora", "max_sites",
                          "max_sites_peak_gb", "dashboard_render_s")
    with pytest.raises(ValueError, match="unknown benchmark\\(s\\) nope; choose from dp_overhead"):
        bench.run(["nope"])


def test_bytes_per_round_serialises_real_replies():
    out = bench.run(["bytes_per_round"], progress=lambda m: None)
    assert out["details"]["bytes_per_round"]["values_lora"] == 74_883  # adapters + head of the real MiniLM
    assert 0.003 < out["bytes_ratio_lora"] < 0.004  # 74,883 of 22.7 M values, plus message framing
    assert out["dp_overhead_lora"] is None and set(bench.KEYS) <= set(out) and "cpus" in out["device"]
    assert "bytes_ratio_lora" in bench.format_table(out) and "met" in bench.format_table(out)
