"""BERT-family (post-LayerNorm encoder) part of MEFT: BERT and RoBERTa.

Each Hugging Face ``BertLayer``/``RobertaLayer`` is replaced by a ``BertMeftLayer``
that takes over its sub-modules under the same names (``attention``, ``intermediate``,
``output``), so pre-trained state-dict keys are unchanged; the adapters are added beside
them (``ffn_adapter``, ``attn_adapter``, ``rev_adapter``). The encoder becomes a
``MeftBertEncoder``/``MeftRobertaEncoder`` in place (install.py), whose ``forward`` keeps the
HF encoder's call signature, so ``model(input_ids=..., attention_mask=..., labels=...)``
works as before.

Not supported: decoders / cross-attention (``is_decoder``), KV caches. The HF
``output_hidden_states`` hook targets ``BertLayer`` modules, which no longer exist: it
returns an empty tuple. The layers run the HF attention module as loaded (SDPA, eager or
flash) and torch's dropout, as every other method does, on every device.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.models.bert.modeling_bert import BertEncoder
from transformers.models.roberta.modeling_roberta import RobertaEncoder

from memtl.methods.bert_family import encoder_layers
from memtl.methods.meft.adapters import MeftLayer
from memtl.methods.meft.install import Architecture, MeftStack


class BertMeftLayer(MeftLayer):
    """A BERT layer split into its attention and feed-forward blocks, with adapters."""

    def take_over(self, hf_layer: nn.Module) -> None:
        self.attention = hf_layer.attention
        self.intermediate = hf_layer.intermediate
        self.output = hf_layer.output

    def attention_block(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Self-attention + output projection (+ adapter) + residual + LayerNorm."""
        context = self.attention.self(x, attention_mask=mask)[0]
        out = self.attention.output
        h = out.dropout(out.dense(context))
        if self.attn_adapter is not None:
            h = h + self.attn_adapter(h)  # sequential on the projection, as the authors' code
        return out.LayerNorm(h + x)

    def feed_forward_block(self, h: torch.Tensor) -> torch.Tensor:
        """Intermediate + output dense, parallel adapter added before residual + LayerNorm."""
        out = self.output
        z = out.dropout(out.dense(self.intermediate(h)))
        z = z + self.ffn_adapter(h)
        return out.LayerNorm(z + h)


class MeftEncoder(MeftStack):
    """``BertEncoder``/``RobertaEncoder`` forward: two streams from the embedding output,
    reversible stack, then the streams' average feeds the rest of the model (pooler, head)."""

    label = "encoder"
    layers_attr = "layer"

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("MEFT encoder: cross-attention (encoder_hidden_states) is not supported")
        h = self.run_layers(hidden_states, attention_mask)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=h)


class MeftBertEncoder(MeftEncoder, BertEncoder):
    """``BertEncoder`` with its layers run as a MEFT stack."""


class MeftRobertaEncoder(MeftEncoder, RobertaEncoder):
    """``RobertaEncoder`` with its layers run as a MEFT stack."""


def _backbone(model: nn.Module, method: str) -> nn.Module:
    return encoder_layers(model, method, "MEFT", MeftEncoder)[0]


BERT = Architecture(backbone=_backbone, stacks={"encoder": MeftBertEncoder}, layer=BertMeftLayer,
                    layernorm_eps=lambda config: config.layer_norm_eps,
                    dropout=lambda config: config.hidden_dropout_prob)
SPECS = {"bert": BERT, "roberta": dataclasses.replace(BERT, stacks={"encoder": MeftRobertaEncoder})}
