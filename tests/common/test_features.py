"""Head mode's frozen features: the head's input exactly, whatever the padding, cached on the machine's own disk."""

import torch

from common.config import AppConfig
from tests.conftest import TINY


def test_features_are_the_heads_input_and_the_head_on_them_gives_the_models_logits(site_data):
    from common.model import build_model, features, head, model_inputs, predict

    cfg = AppConfig.from_run_config({**TINY, "model.mode": "head"})
    model = build_model(cfg.model, cfg.data.labels, seed=0).eval()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    val = site_data.val
    f = features(model, val)
    assert f.x.shape == (len(val), 32) and torch.equal(f.labels, val.labels)
    with torch.no_grad():
        full = model(**model_inputs(val.input_ids, val.attention_mask)).logits  # padded to max-length
        on_features = head(model)(f.x)  # trimmed, length-sorted batches
    assert torch.allclose(full, on_features, atol=1e-5)
    (p_tokens, l_tokens), (p_feat, l_feat) = predict(model, val), predict(model, f)
    assert abs(p_tokens - p_feat).max() < 1e-5 and abs(l_tokens - l_feat).max() < 1e-5


def test_cached_features_are_read_back_row_by_row_and_a_broken_file_is_recomputed(tmp_path, site_data, monkeypatch):
    import common.features as cf
    from common.model import Encoded, build_model, features

    cfg = AppConfig.from_run_config({**TINY, "model.mode": "head"})
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    identity = cf.encoder_identity(cfg.model, 0)
    first = cf.cached_features(model, site_data.train, identity=identity, folder=tmp_path)
    (kept,) = (tmp_path / cf.FOLDER).glob("*.pt")
    computed = []
    monkeypatch.setattr(cf, "features", lambda m, d: computed.append(len(d)) or features(m, d))
    again = cf.cached_features(model, site_data.train, identity=identity, folder=tmp_path)
    assert computed == [] and torch.equal(again.x, first.x)
    # Another split sharing rows (another partition of the same texts) computes only the rows not seen yet.
    mixed = Encoded(torch.cat([site_data.train.input_ids[:5], site_data.val.input_ids]),
                    torch.cat([site_data.train.attention_mask[:5], site_data.val.attention_mask]),
                    torch.cat([site_data.train.labels[:5], site_data.val.labels]))
    out = cf.cached_features(model, mixed, identity=identity, folder=tmp_path)
    assert computed == [len(site_data.val)] and torch.equal(out.x[:5], first.x[:5])
    assert torch.allclose(out.x[5:], features(model, site_data.val).x, atol=1e-5)
    kept.write_bytes(b"not a tensor")
    cf.cached_features(model, site_data.train, identity=identity, folder=tmp_path)
    assert computed[-1] == len(site_data.train)
    # Another encoder (another seed of the tiny model): other keys and another file.
    assert cf.row_keys(cf.encoder_identity(cfg.model, 1), site_data.train) != cf.row_keys(identity, site_data.train)
    assert cf.store_path(tmp_path, cf.encoder_identity(cfg.model, 1)) != kept


def test_one_example_moves_no_other_examples_features(site_data):
    # Released summaries and DP-SGD on features assume each example's features depend on that example alone. Batches
    # are trimmed to their longest row, so removing the longest example changes the others' padding: the masked
    # positions contribute exact zeros, and only float rounding may differ.
    from common.model import build_model, features

    cfg = AppConfig.from_run_config({**TINY, "model.mode": "head"})
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    from common.model import Encoded

    data = site_data.train.first(40)
    lengths = data.attention_mask.sum(dim=1)
    # The longest row sets its batch's padding; the shortest moves every later batch boundary (rows go by length).
    for gone in (int(lengths.argmax()), int(lengths.argmin())):
        keep = torch.arange(len(data)) != gone
        without = Encoded(data.input_ids[keep], data.attention_mask[keep], data.labels[keep])
        a, b = features(model, data).x[keep], features(model, without).x
        assert (a - b).norm() < 1e-5 * a.norm()


def test_a_cache_file_of_the_wrong_shape_is_recomputed_and_a_full_disk_is_no_error(tmp_path, site_data, monkeypatch):
    import common.features as cf
    from common.model import build_model

    cfg = AppConfig.from_run_config({**TINY, "model.mode": "head"})
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    identity = cf.encoder_identity(cfg.model, 0)
    path = cf.store_path(tmp_path, identity)
    path.parent.mkdir(parents=True)
    keys = torch.tensor(list(b"".join(cf.row_keys(identity, site_data.val))), dtype=torch.uint8).reshape(-1, 16)
    torch.save({"keys": keys, "x": torch.zeros(len(site_data.val), 7)}, path)  # another model's width
    assert cf.cached_features(model, site_data.val, identity=identity, folder=tmp_path).x.shape[1] == 32

    def full_disk(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    out = cf.cached_features(model, site_data.train, identity=identity, folder=tmp_path / "other")
    assert out.x.shape == (len(site_data.train), 32) and not list((tmp_path / "other").rglob("*.tmp"))


def test_head_mode_refuses_a_classifier_that_is_not_one_linear_layer(tmp_path):
    import pytest
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from common.model import build_model

    tiny = RobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=80, num_labels=3)
    RobertaForSequenceClassification(tiny).save_pretrained(tmp_path)
    cfg = AppConfig.from_run_config({"model.path": str(tmp_path), "model.mode": "head", "model.pooling": "cls"})
    with pytest.raises(ValueError, match="model.mode = head needs a model whose classifier is one linear layer.*"
                                         "RobertaClassificationHead: use model.mode = lora or full"):
        build_model(cfg.model, cfg.data.labels)
