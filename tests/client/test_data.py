"""Step 1 at a site: rows into sites (seeded partitions), a site's own file, and the add/remove-stable split."""

import numpy as np
import pandas as pd
import pytest

from client.data import SiteIdentity, partition, site_rows, split_train_val
from common.config import AppConfig
from common.datasets import load_drugreview

LABELS = ("negative", "neutral", "positive")


@pytest.mark.parametrize("how", ["iid", "natural", "dirichlet"])
def test_partitions_cover_rows_once_and_are_seeded(how):
    frame = load_drugreview("train", LABELS)
    parts = partition(frame, num_sites=4, how=how, alpha=0.5, seed=42)
    again = partition(frame, num_sites=4, how=how, alpha=0.5, seed=42)
    rows = np.concatenate(parts)
    assert len(parts) == 4 and all(len(p) > 0 for p in parts)
    assert len(rows) == len(set(rows.tolist())) <= 600
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))
    if how != "dirichlet":
        assert len(rows) == 600


def test_natural_sites_hold_disjoint_conditions():
    frame = load_drugreview("train", LABELS)
    parts = partition(frame, num_sites=4, how="natural", alpha=0.5, seed=42)
    conditions = [set(frame.iloc[p]["condition"]) for p in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not conditions[i] & conditions[j]


def test_split_is_seeded_disjoint_and_stable_under_add_remove():
    texts = [f"review number {i}" for i in range(200)]
    tr, va = split_train_val(texts, val_fraction=0.2, seed=1)
    tr2, va2 = split_train_val(texts, val_fraction=0.2, seed=1)
    assert 25 <= len(va) <= 55 and len(tr) + len(va) == 200  # ~20 %, decided row by row
    assert not set(tr) & set(va)
    assert (tr == tr2).all() and (va == va2).all()
    # Neighbouring data sets (one row removed): every other row stays on its side, as DP accounting assumes.
    drop = int(va[0])
    rest = texts[:drop] + texts[drop + 1:]
    tr3, va3 = split_train_val(rest, val_fraction=0.2, seed=1)
    assert {rest[i] for i in va3} == {texts[i] for i in va} - {texts[drop]}
    assert {rest[i] for i in tr3} == {texts[i] for i in tr}
    # A tiny site still gets one row on each side.
    tr4, va4 = split_train_val(["a", "b"], val_fraction=0.2, seed=1)
    assert len(tr4) == 1 and len(va4) == 1


def test_a_path_template_gives_each_simulated_site_its_own_file(tmp_path):
    for pid in (0, 1):
        pd.DataFrame({"review": [f"text {pid} {i}" for i in range(4)], "rating": [1, 5, 9, 10]}).to_csv(
            tmp_path / f"site-{pid}.csv", index=False)
    cfg = AppConfig.from_run_config({"data.source": "files", "data.labels": "negative,neutral,positive", "data.files": str(tmp_path / "site-{partition}.csv")})
    rows = site_rows(cfg.data, SiteIdentity("site-1", 1, 2, ""))
    assert rows["text"].tolist() == [f"text 1 {i}" for i in range(4)]
    with pytest.raises(ValueError, match="data.files must be a path template using only"):
        AppConfig.from_run_config({"data.files": "x/{nope}.csv"})
