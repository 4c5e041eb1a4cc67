"""The server's held-out data: the workload's embedded held-out set ("auto"), or the operator's own labelled file,
in a validation part to tune on and a test part to report on."""

import numpy as np
import pytest

from common.config import AppConfig
from tests.conftest import TINY


def test_the_server_can_hold_its_own_labelled_file(tmp_path, tokenizer):
    from common.datasets import SiteDataError
    from common.model import build_model, trainable_state
    from server.central_eval import make_central_eval, server_data

    held = tmp_path / "held-out.csv"
    held.write_text("review,rating\nworked well,9\nterrible side effects,1\nit was fine i guess,6\n")
    cfg = AppConfig.from_run_config({**TINY, "server.central-eval": str(held), "server.val-fraction": 0.0})
    data = server_data(cfg, tokenizer)
    assert data.val is None and data.test.labels.tolist() == [2, 0, 1]  # positive, negative, neutral (ratings)
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    metrics = make_central_eval(cfg, model, data)(trainable_state(model))
    assert set(metrics) >= {"accuracy", "macro_f1", "loss", "ece", "confidence"} and "val_accuracy" not in metrics
    assert np.isfinite(metrics["loss"]) and 1 / 3 <= metrics["confidence"] <= 1

    missing = AppConfig.from_run_config({**TINY, "server.central-eval": str(tmp_path / "nope.csv")})
    with pytest.raises(SiteDataError, match=r"server \(server.central-eval\): data file .*nope.csv does not exist"):
        server_data(missing, tokenizer)
    with pytest.raises(ValueError, match="server.central-eval.*drugreview-test.*labelled file"):
        AppConfig.from_run_config({**TINY, "server.central-eval": "my-test-set"})


def test_the_drug_reviews_server_set_splits_into_validation_and_test(tokenizer):
    from common.model import build_model, trainable_state
    from server.central_eval import make_central_eval, server_data

    cfg = AppConfig.from_run_config(TINY)  # central-eval "auto" on the drug reviews: the 379 test reviews
    data = server_data(cfg, tokenizer)
    assert (len(data.val), len(data.test)) == (122, 257)  # keyed by each review's text: 30 % to tune on
    metrics = make_central_eval(cfg, build_model(cfg.model, cfg.data.labels, seed=0), data)(
        trainable_state(build_model(cfg.model, cfg.data.labels, seed=0)))
    assert {"val_accuracy", "val_macro_f1"} <= set(metrics)


def test_movies_held_out_for_the_server_are_at_no_site():
    from client.data import pool
    from common.datasets import GROUP, held_out, load_movies
    from server.central_eval import server_rows

    cfg = AppConfig.from_run_config({**TINY, "data.source": "movies"})
    assert cfg.data.labels == ("rotten", "fresh")
    frame = load_movies(cfg.data.labels)
    assert len(frame) == 12_808 and frame[GROUP].nunique() == 508
    server, by = server_rows(cfg)
    sites = pool("movies", cfg.data.labels, cfg.data.seed)
    assert by == GROUP and len(server) + len(sites) == len(frame)
    assert not set(server[GROUP]) & set(sites[GROUP])  # whole movies: none on both sides
    assert 0.10 < held_out(frame, "movies", cfg.data.seed).mean() < 0.20


def test_own_files_with_their_own_labels_need_no_server_set(tmp_path):
    from server.central_eval import server_rows

    own = {**TINY, "data.source": "files", "data.labels": "spam,ham", "data.files": str(tmp_path / "s{partition}.csv")}
    assert server_rows(AppConfig.from_run_config(own)) is None  # "auto": nothing the server holds fits them
    with pytest.raises(ValueError, match=r"server.central-eval = 'drugreview-test' holds labels negative,neutral,"
                                         r"positive, but data.labels = 'spam,ham'; set server.central-eval to the path"):
        AppConfig.from_run_config({**own, "server.central-eval": "drugreview-test"})
    with pytest.raises(ValueError, match=r"data.labels must be .*your files' label set"):
        AppConfig.from_run_config({**own, "data.labels": ""})


def test_a_server_data_prior_needs_server_data_and_reads_its_validation_part_only(tmp_path, tokenizer):
    from server.central_eval import class_prior, server_data

    with pytest.raises(ValueError, match="train.class-prior = server-data needs the server's own labelled data"):
        AppConfig.from_run_config({**TINY, "data.source": "files", "data.labels": "a,b", "train.class-prior": "server-data"})
    cfg = AppConfig.from_run_config({**TINY, "train.class-prior": "server-data"})
    data = server_data(cfg, tokenizer)
    counts = np.bincount(data.val.labels.numpy(), minlength=3)
    assert class_prior(cfg, data) == pytest.approx(list((counts + 1) / (counts.sum() + 3)), rel=1e-6)
