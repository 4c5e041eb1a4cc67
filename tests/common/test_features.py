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


def test_cached_features_are_read_back_and_a_broken_file_is_recomputed(tmp_path, site_data, monkeypatch):
    import common.features as cf
    from common.model import build_model

    cfg = AppConfig.from_run_config({**TINY, "model.mode": "head"})
    model = build_model(cfg.model, cfg.data.labels, seed=0)
    identity = cf.encoder_identity(cfg.model, 0)
    first = cf.cached_features(model, site_data.train, identity=identity, folder=tmp_path)
    (kept,) = (tmp_path / cf.FOLDER).glob("*.pt")
    calls = []
    monkeypatch.setattr(cf, "features", lambda m, d: calls.append(1) or first)
    again = cf.cached_features(model, site_data.train, identity=identity, folder=tmp_path)
    assert calls == [] and torch.equal(again.x, first.x)
    kept.write_bytes(b"not a tensor")
    cf.cached_features(model, site_data.train, identity=identity, folder=tmp_path)
    assert calls == [1]
    # Another encoder (another seed of the tiny model), or other rows: another file.
    assert cf.key(cf.encoder_identity(cfg.model, 1), site_data.train) != cf.key(identity, site_data.train)
    assert cf.key(identity, site_data.val) != cf.key(identity, site_data.train)
