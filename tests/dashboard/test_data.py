"""The dashboard's data layer: the noise bands drawn around noised curves are the noise the releases really carry."""

import numpy as np
import pandas as pd
import pytest

from common import diagnostics as dg
from common import run_store, run_views
from dashboard import data
from dashboard.bench import make_store


def _snapshot(path):
    raw = run_store.load_run(path)
    snap = {k: pd.DataFrame(v) if isinstance(v, list) else v for k, v in raw.items()}
    snap["cfg"] = run_views.run_config(raw)
    return snap


def test_the_accuracy_band_is_the_noise_of_the_summed_releases(tmp_path):
    snap = _snapshot(make_store(tmp_path / "s.db", sites=3, rounds=2))
    bands = data.noise_bands(snap).set_index(["round", "metric", "source"])["std"]
    # 3 sites of 30 validation examples, K = 3, each release at σ = 4.8: √(3·3·s²) / 90 with s the confusion cells'.
    s = dg.noise_std(4.8)["confusion"]
    assert bands[(2, "accuracy", data.SITES_VAL)] == pytest.approx((9 * s**2) ** 0.5 / 90)
    assert set(bands.index.get_level_values("round")) == {1, 2}

    # The same noise drawn into three sites' exact confusions: the unbiased reading (Σ diagonal / Σ n_val) spreads
    # by the band's std; the server's reading (dg.derive: clamped at 0, projected onto the public sizes) is
    # biased towards the middle and spreads less, never more: the band is never narrow.
    rng = np.random.default_rng(0)
    exact = np.diag([10.0, 10.0, 10.0])  # 30 validation examples a site, all right: accuracy 1
    unbiased, derived = [], []
    for _ in range(400):
        summed = dg.empty_blocks(3)
        summed["confusion"] = sum(exact + rng.normal(0, s, (3, 3)) for _ in range(3))
        unbiased.append(np.trace(summed["confusion"]) / 90)
        derived.append(dg.derive(summed, loss_clip=3.0, n_val=90, n_train=0, trained=False)["accuracy"])
    band = bands[(2, "accuracy", data.SITES_VAL)]
    assert np.std(unbiased) == pytest.approx(band, rel=0.1)
    assert np.std(derived) <= 1.1 * band


def test_no_band_without_dp_and_the_majority_line_from_the_summed_class_counts(tmp_path):
    snap = _snapshot(make_store(tmp_path / "s.db", sites=2, rounds=1))
    snap["cfg"] = snap["cfg"].__class__.from_stored({**snap["config"], "dp.enabled": False})
    assert data.noise_bands(snap).empty
    two = {"a": {"confusion": [[8, 2, 0], [1, 1, 0], [0, 0, 2]]}, "b": {"confusion": [[4, 0, 0], [0, 6, 0], [0, 1, 0]]}}
    assert data.majority_share(two) == pytest.approx(14 / 25)  # class 0: 10 + 4 of 25
    assert data.majority_share({}) is None


def test_the_privacy_frame_has_each_part_and_the_sites_own_cap(tmp_path):
    snap = _snapshot(make_store(tmp_path / "s.db", sites=2, rounds=3))
    eps = data.privacy_frame(snap["site_rounds"])
    assert set(eps["part"]) == {"total", "training", "diagnostics", "lifetime"}
    last = eps[eps["round"] == 3].set_index(["site", "part"])["epsilon"]
    assert last[("site-000", "total")] == 8.0 and last[("site-000", "lifetime")] == 9.5  # an earlier run spent 1.5
    assert (eps["cap"] == 10.0).all()


def test_a_site_cell_of_the_cross_site_matrix_carries_its_releases_noise(tmp_path):
    snap = _snapshot(make_store(tmp_path / "s.db", sites=2, rounds=2))
    frame = data.cross_site(snap["site_rounds"], snap["rounds"], "accuracy", num_classes=3, dp=True)
    sites = frame[frame["data"] != "server test set"]
    assert sites["std"].tolist() == pytest.approx([3 ** 0.5 * dg.noise_std(4.8)["confusion"] / 30] * 4)
    assert (frame[frame["data"] == "server test set"]["std"] == 0).all()
    f1 = data.cross_site(snap["site_rounds"], snap["rounds"], "macro_f1", num_classes=3, dp=True)
    assert f1[f1["data"] != "server test set"]["std"].isna().all()  # not linear in the counts: no std claimed
