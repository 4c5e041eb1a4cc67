"""common/model.py save_final_model: the saved model, loaded where fedlens is not installed, is the same function, or
transformers refuses it; it never silently becomes another model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import AppConfig
from common.model import build_model, encode, load_tokenizer, predict, register_mean_pool_bert, save_final_model

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["A wonderful film, I loved every minute.", "Dull, far too long and badly acted.", "It was fine."]

# Runs in a fresh interpreter: the editable install's .pth puts the repository on sys.path even with PYTHONPATH
# unset, so it is taken off first; then neither fedlens nor the classes it registers can be found. (`common` alone
# would still import: the editable wheel leaves an empty site-packages/common/ holding the pyproject.toml copy.)
# One interpreter loads every saved model (starting one costs ~5 s here). The answer goes to a file: transformers'
# [y/N] prompt is printed on stdout.
CHILD = r"""
import json, sys
from pathlib import Path
root, model_dirs, texts, result = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
out = {}
for name in ("common.model", "fedlens"):
    try:
        __import__(name)
        out[name] = "imported"
    except ImportError:
        out[name] = "absent"
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

def probs(model_dir, batch, **kwargs):
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs).eval()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    with torch.no_grad():
        p = torch.softmax(model(**batch).logits, dim=-1)
    return {"class": type(model).__module__ + "." + type(model).__name__, "probs": p.tolist()}

for model_dir in model_dirs:
    batch = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)(texts, padding=True, return_tensors="pt")
    out[model_dir] = {"remote": probs(model_dir, batch, trust_remote_code=True), "plain": probs(model_dir, batch),
                      "refused": probs(model_dir, batch, trust_remote_code=False)}
result.write_text(json.dumps(out))
"""
CASES = [("mean", "head"), ("mean", "lora"), ("mean", "full"), ("cls", "lora")]


def _save(out_dir: Path, pooling: str, mode: str) -> np.ndarray:
    """Save a tiny trained-looking model with save_final_model; its in-process probabilities on TEXTS."""
    cfg = AppConfig.from_run_config({"model.tiny": True, "model.mode": mode, "model.pooling": pooling})
    model = build_model(cfg.model, ("negative", "neutral", "positive"), seed=0)
    # Move what federated training moves (head; LoRA's B is zero at init, so without this the merge is a no-op).
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    tokenizer = load_tokenizer(cfg.model)
    expected, _ = predict(model, encode(TEXTS, np.zeros(len(TEXTS), dtype=np.int64), tokenizer, 32))
    save_final_model(model, tokenizer, out_dir)
    return expected


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """Per case: the saved folder, the in-process probabilities, and what a fedlens-less interpreter loaded."""
    root = tmp_path_factory.mktemp("saved")
    cases = {case: {"dir": root / "-".join(case)} for case in CASES}
    for case, c in cases.items():
        c["expected"] = _save(c["dir"], *case)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The copied modelling file is compiled into a module cache: this test's own, not the user's.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"))
    result = root / "loaded.json"
    dirs = [str(c["dir"]) for c in cases.values()]
    # stdin closed: without trust_remote_code transformers would otherwise ask on a terminal and wait 15 s.
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO_ROOT), json.dumps(dirs), json.dumps(TEXTS), str(result)],
                          cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(result.read_text())
    for c in cases.values():
        c["loaded"] = loaded[str(c["dir"])]
        c["fedlens"] = (loaded["common.model"], loaded["fedlens"])
    return cases


@pytest.mark.parametrize("mode", ["head", "lora", "full"])
def test_mean_pool_model_loads_exactly_with_remote_code_and_is_refused_without(saved, mode):
    c = saved[("mean", mode)]
    config = json.loads((c["dir"] / "config.json").read_text())
    got = c["loaded"]
    assert config["model_type"] == "fedlens-mean-pool-bert"
    assert config["architectures"] == ["MeanPoolBertForSequenceClassification"]
    assert config["auto_map"] == {"AutoConfig": "mean_pool_bert.MeanPoolBertConfig",
                                  "AutoModelForSequenceClassification":
                                      "mean_pool_bert.MeanPoolBertForSequenceClassification"}
    assert (c["dir"] / "mean_pool_bert.py").read_text() == (REPO_ROOT / "common" / "mean_pool_bert.py").read_text()
    keys = _safetensor_keys(c["dir"])  # embeddings 5 + 2 layers x 16 + classifier 2
    assert len(keys) == 39 and not any("lora" in k or "pooler" in k or k.startswith("base_model") for k in keys)
    assert c["fedlens"] == ("absent", "absent")
    # Not trivial: on every review the classes' probabilities differ by more than 0.05.
    assert np.ptp(c["expected"], axis=1).min() > 0.05
    assert got["remote"]["class"].startswith("transformers_modules.")  # the copied file, not fedlens
    np.testing.assert_allclose(got["remote"]["probs"], c["expected"], atol=1e-5)
    for how in ("plain", "refused"):  # no argument, and trust_remote_code=False
        assert got[how]["error"].startswith("ValueError: The repository ")
        assert "Please pass the argument `trust_remote_code=True` to allow custom code to be run." in got[how]["error"]


def test_cls_pooling_saves_a_plain_bert_classifier(saved):
    c = saved[("cls", "lora")]
    config = json.loads((c["dir"] / "config.json").read_text())
    assert config["model_type"] == "bert" and "auto_map" not in config
    assert not (c["dir"] / "mean_pool_bert.py").exists()
    assert np.ptp(c["expected"], axis=1).min() > 0.05
    for how in ("plain", "refused", "remote"):  # nothing to refuse, nothing remote to run
        assert c["loaded"][how]["class"] == "transformers.models.bert.modeling_bert.BertForSequenceClassification"
        np.testing.assert_allclose(c["loaded"][how]["probs"], c["expected"], atol=1e-5)


def test_fedlens_loads_its_own_saved_model_without_remote_code(saved):
    from transformers import AutoModelForSequenceClassification

    from common.mean_pool_bert import MeanPoolBertForSequenceClassification

    c = saved[("mean", "lora")]
    register_mean_pool_bert()
    model = AutoModelForSequenceClassification.from_pretrained(c["dir"])
    assert type(model) is MeanPoolBertForSequenceClassification
    tokenizer = load_tokenizer(AppConfig.from_run_config({"model.tiny": True}).model)
    got, _ = predict(model, encode(TEXTS, np.zeros(len(TEXTS), dtype=np.int64), tokenizer, 32))
    np.testing.assert_allclose(got, c["expected"], atol=1e-5)


def _safetensor_keys(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return list(f.keys())
