"""Step 2's model: a BERT sequence classifier that mean-pools token states, as sentence encoders such as all-MiniLM-L6-v2 were trained.

This file is self-contained on purpose: `save_pretrained` copies it next to a saved model, so that
`AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)` loads the model anywhere.

A saved model's config.json says `"model_type": "fedlens-mean-pool-bert"`, not "bert". Plain transformers then cannot
mistake it for a BertForSequenceClassification: a "bert" model type with our class only in `auto_map` loaded, without
`trust_remote_code`, as a [CLS] classifier with a random pooler and predicted something else, with only a warning.
Now the config itself is custom code, and transformers refuses it unless `trust_remote_code=True` (or fedlens has
registered the classes: `common.model.register_mean_pool_bert`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolBertConfig(BertConfig):
    """A BertConfig under its own model type: the same fields, read by MeanPoolBertForSequenceClassification only."""

    model_type = "fedlens-mean-pool-bert"


class MeanPoolBertForSequenceClassification(BertPreTrainedModel):
    """BERT encoder -> masked mean over tokens -> dropout -> linear head.

    BertForSequenceClassification classifies the [CLS] state through a pooler (dense + tanh) that a sentence
    encoder never trained; the mean over tokens is the representation MiniLM was tuned to produce.
    """

    config_class = MeanPoolBertConfig

    def __init__(self, config) -> None:  # noqa: ANN001 (a transformers BertConfig)
        if not isinstance(config, MeanPoolBertConfig):
            # MiniLM's own config and the tiny test one are plain BertConfigs; adopting ours here means whatever
            # saves this model writes our model type. The attention choice is not a config field, so carry it over.
            fields = {k: v for k, v in config.to_dict().items() if k != "model_type"}
            config = MeanPoolBertConfig.from_dict(fields, attn_implementation=config._attn_implementation)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           position_ids=position_ids).last_hidden_state  # [B, L, H]
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, H]
        logits = self.classifier(self.dropout(pooled))  # [B, K]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# save_pretrained writes both classes into config.json's auto_map and copies this file beside the weights.
MeanPoolBertConfig.register_for_auto_class()
MeanPoolBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
