"""Siamese sentence pairs (``data.pair_encoding=siamese``): each sentence encoded on its own.

Sentence-embedding models such as all-MiniLM-L6-v2 were trained this way (sentence-
transformers: a bi-encoder, mean pooling), not on "[CLS] a [SEP] b [SEP]": their frozen
features separate RTE's classes when the sentences are encoded apart and not when they are
joined (docs/RESULTS.md). The head is SBERT's: a linear layer on [u, v, |u - v|, u * v],
u and v the mean-pooled last hidden states of the two sentences.

The encoder is the HF model's own (``model.base_model``), called twice, so every method
applies unchanged: ``siamese_head`` swaps the classifier for the pair head *before*
``apply_method`` (which keeps the head trainable under its usual name), ``SiameseModel``
wraps the result. BERT's pooler feeds nothing here and is frozen.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from memtl.errors import ConfigError

ENCODER_TYPES = ("bert", "roberta")


def siamese_head(model: nn.Module) -> nn.Module:
    """Replace the sequence-classification head of a BERT/RoBERTa model by a linear layer on
    [u, v, |u - v|, u * v] (in place; returns the model)."""
    if model.config.model_type not in ENCODER_TYPES or not isinstance(getattr(model, "classifier", None), nn.Module):
        raise ConfigError(f"data.pair_encoding=siamese needs an encoder backbone ({', '.join(ENCODER_TYPES)}) with a "
                          f"classification head; {type(model).__name__} is not one: set data.pair_encoding=cross")
    ref = model.base_model.embeddings.word_embeddings.weight
    model.classifier = nn.Linear(4 * model.config.hidden_size, model.config.num_labels, dtype=ref.dtype,
                                 device=ref.device)
    model.classifier.weight.data.normal_(0.0, model.config.initializer_range)
    model.classifier.bias.data.zero_()
    return model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class SiameseModel(nn.Module):
    """``model(input_ids, attention_mask, b_input_ids, b_attention_mask, labels=...)`` ->
    ``loss`` (cross-entropy; MSE for one label) and ``logits``. ``model`` is what
    ``apply_method`` returned for a model prepared by ``siamese_head``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        hf = self.hf_model
        pooler = getattr(hf.base_model, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(False)  # unused: the pair head reads the mean-pooled states

    @property
    def hf_model(self) -> nn.Module:  # under peft, the HF model its layers were injected into
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def encode(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids, attention_mask, b_input_ids, b_attention_mask, labels=None, token_type_ids=None,
                b_token_type_ids=None, **kwargs) -> SequenceClassifierOutput:
        u = self.encode(input_ids, attention_mask, token_type_ids)
        v = self.encode(b_input_ids, b_attention_mask, b_token_type_ids)
        logits = self.hf_model.classifier(torch.cat([u, v, (u - v).abs(), u * v], dim=-1))
        loss = None
        if labels is not None:
            if logits.shape[-1] == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
