"""Site data at rest: the embedded set, partitioning, and the generic loader's errors."""

import numpy as np
import pandas as pd
import pytest

from common.datasets import SiteDataError, load_drugreview, load_file, partition, rating_to_label, split_train_val

LABELS = ("negative", "neutral", "positive")


def test_embedded_drug_reviews_have_the_documented_sizes_and_labels():
    train, test = load_drugreview("train", LABELS), load_drugreview("test", LABELS)
    assert (len(train), len(test)) == (600, 379)
    assert np.bincount(train["label"], minlength=3).tolist() == [161, 54, 385]
    assert train["text"].str.len().min() > 0


def test_ratings_map_negative_below_5_neutral_5_to_6_positive_above():
    assert [rating_to_label(r, LABELS) for r in (1, 4, 5, 6, 7, 10)] == [
        "negative", "negative", "neutral", "neutral", "positive", "positive"]


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


def _load(path, **kw):
    return load_file(path, text_column="text", label_column="label", labels=LABELS, site="clinic-a", **kw)


def test_generic_loader_reads_csv_jsonl_parquet(tmp_path):
    frame = pd.DataFrame({"text": ["good", "bad", "meh"], "label": ["positive", "negative", "neutral"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.jsonl", "d.parquet"):
        assert _load(tmp_path / name)["label"].tolist() == [2, 0, 1]


@pytest.mark.parametrize("content, expected", [
    (None, "clinic-a: data file .*missing.csv does not exist"),
    ("", "clinic-a: data file .*is empty"),
    ("review,stars\nok,3\n", "clinic-a: .* has no column\\(s\\) text, label"),
    ("text,label\nok,great\n", "clinic-a: .* has no usable rows; expected a text and a label from negative, "
                              "neutral, positive"),
    (b"text,label\n\xff\xfe bad,positive\n", "clinic-a: data file .* cannot be read as csv \\(UTF-8 expected\\)"),
])
def test_generic_loader_errors_name_site_path_and_expectation(tmp_path, content, expected):
    path = tmp_path / "missing.csv"
    if content is not None:
        path = tmp_path / "d.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SiteDataError, match=expected) as e:
        _load(path)
    assert "great" not in str(e.value)  # a data value stays in the site's log (detail), out of the reason it sends


def test_one_unusable_row_is_dropped_at_the_site_not_a_reason_to_fail(tmp_path, caplog):
    # Failing on one row's label would tell the coordinator whether any row has it: the row is dropped instead,
    # and only the site's own log says so.
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,positive\nmeh,superb\nbad,3\n,negative\nok,7.5\n")
    rows = _load(path)
    assert rows["text"].tolist() == ["fine", "bad", "ok"] and rows["label"].tolist() == [2, 0, 2]
    assert "2 row(s) without text or with a label outside" in caplog.text and "superb" not in caplog.text


def test_a_path_template_gives_each_simulated_site_its_own_file(tmp_path):
    from client.data import SiteIdentity, site_rows
    from common.config import AppConfig

    for pid in (0, 1):
        pd.DataFrame({"review": [f"text {pid} {i}" for i in range(4)], "rating": [1, 5, 9, 10]}).to_csv(
            tmp_path / f"site-{pid}.csv", index=False)
    cfg = AppConfig.from_run_config({"data.source": "files", "data.files": str(tmp_path / "site-{partition}.csv")})
    rows = site_rows(cfg.data, SiteIdentity("site-1", 1, 2, ""))
    assert rows["text"].tolist() == [f"text 1 {i}" for i in range(4)]
    with pytest.raises(ValueError, match="data.files must be a path template using only"):
        AppConfig.from_run_config({"data.files": "x/{nope}.csv"})
