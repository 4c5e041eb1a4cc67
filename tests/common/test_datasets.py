"""Site data at rest: the embedded set and the generic loader's errors."""

import numpy as np
import pandas as pd
import pytest

from common.datasets import SiteDataError, load_drugreview, load_file, rating_to_label

LABELS = ("negative", "neutral", "positive")


def test_embedded_drug_reviews_have_the_documented_sizes_and_labels():
    train, test = load_drugreview("train", LABELS), load_drugreview("test", LABELS)
    assert (len(train), len(test)) == (600, 379)
    assert np.bincount(train["label"], minlength=3).tolist() == [161, 54, 385]
    assert train["text"].str.len().min() > 0


def test_ratings_map_negative_below_5_neutral_5_to_6_positive_above():
    assert [rating_to_label(r, LABELS) for r in (1, 4, 5, 6, 7, 10)] == [
        "negative", "negative", "neutral", "neutral", "positive", "positive"]


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
