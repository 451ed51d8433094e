"""BERT-family (post-LayerNorm encoder) part of MEFT: BERT and RoBERTa.

Each Hugging Face ``BertLayer``/``RobertaLayer`` is replaced by a ``BertMeftLayer``
that takes over its sub-modules under the same names (``attention``, ``intermediate``,
``output``), so pre-trained state-dict keys are unchanged; the adapters are added beside
them (``ffn_adapter``, ``attn_adapter``, ``rev_adapter``). The encoder is replaced by
``MeftEncoder``, which keeps the HF encoder's call signature, so
``model(input_ids=..., attention_mask=..., labels=...)`` works as before.

Not supported: decoders / cross-attention (``is_decoder``), KV caches. The HF
``output_hidden_states`` hook targets ``BertLayer`` modules, which no longer exist: it
returns an empty tuple. ``output_attentions`` still works with ``attn_implementation="eager"``,
except in training on CPU, where the layers run their own attention (``self_attention``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from memtl.errors import ConfigError
from memtl.methods.bert_family import encoder_layers
from memtl.methods.meft.adapters import Adapter, MeftLayer, Variant
from memtl.methods.meft.dropout import dropout
from memtl.methods.meft.engine import run_stack


def self_attention(sa: nn.Module, x: torch.Tensor, mask=None) -> torch.Tensor:
    """A ``BertSelfAttention``/``RobertaSelfAttention`` forward (context only), with MEFT's
    dropout on the attention probabilities when it trains on CPU; otherwise the module's
    own forward (SDPA, eager or flash, as the model was loaded). ``mask``: what the HF
    model passes its layers: None, a bool mask (True = attend) or an additive float one."""
    p = sa.dropout.p if sa.training else 0.0
    if p == 0.0 or x.device.type != "cpu":
        return sa(x, attention_mask=mask)[0]
    shape = (*x.shape[:-1], -1, sa.attention_head_size)
    q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (sa.query, sa.key, sa.value))
    scores = q @ k.transpose(2, 3) * sa.scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1)
    del scores  # B·H·T² bytes this frame would otherwise hold through the rest
    return (dropout(probs, p, True) @ v).transpose(1, 2).reshape(*x.shape[:-1], -1)


class BertMeftLayer(MeftLayer):
    """A BERT layer split into its attention and feed-forward blocks, with adapters."""

    def __init__(self, hf_layer: nn.Module, variant: Variant, lam: float, beta: float,
                 make_adapter, make_rev_adapter):
        super().__init__()
        self.variant, self.lam, self.beta, self.switch = variant, lam, beta, variant.switch
        # take over the pre-trained sub-modules under their original names
        self.attention = hf_layer.attention
        self.intermediate = hf_layer.intermediate
        self.output = hf_layer.output
        # parallel adapter on the feed-forward block (every variant)
        self.ffn_adapter = make_adapter()
        # MEFT3: adapter on the attention output projection
        self.attn_adapter = make_adapter() if variant.attn_adapter else None
        # MEFT1/2: the stand-alone adapter playing G (MEFT1) or F (MEFT2)
        self.rev_adapter = make_rev_adapter() if variant.rev_adapter else None

    def attention_block(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Self-attention + output projection (+ adapter) + residual + LayerNorm."""
        context = self_attention(self.attention.self, x, mask)
        out = self.attention.output
        h = dropout(out.dense(context), out.dropout.p, self.training)
        if self.attn_adapter is not None:
            h = h + self.attn_adapter(h)  # sequential on the projection, as the authors' code
        return out.LayerNorm(h + x)

    def feed_forward_block(self, h: torch.Tensor) -> torch.Tensor:
        """Intermediate + output dense, parallel adapter added before residual + LayerNorm."""
        out = self.output
        z = dropout(out.dense(self.intermediate(h)), out.dropout.p, self.training)
        z = z + self.ffn_adapter(h)
        return out.LayerNorm(z + h)

    def whole_layer(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        return self.feed_forward_block(self.attention_block(x, mask))


class MeftEncoder(nn.Module):
    """Drop-in for ``BertEncoder``: two streams from the embedding output, reversible
    stack, then the streams' average feeds the rest of the model (pooler, head)."""

    def __init__(self, layers: list[BertMeftLayer], num_rev_layers: int, inverse: str = "exact"):
        super().__init__()
        self.layer = nn.ModuleList(layers)
        # public: tests and experiments may switch these (num_rev_layers=0: plain autograd, same maths)
        self.num_rev_layers = num_rev_layers
        self.inverse = inverse

    recorded: list | None = None  # see engine.run_stack

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("MEFT encoder: cross-attention (encoder_hidden_states) is not supported")
        h = run_stack(self, hidden_states, self.layer, (attention_mask,), "encoder")
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=h)


def install(model: nn.Module, variant: Variant, lam: float, beta: float, num_rev_layers: int | None,
            bottleneck: int, activation: str, dropout: float | None, adapter_layernorm: bool,
            inverse: str = "exact") -> nn.Module:
    """Swap the encoder of a BERT-family model for a MEFT encoder; returns the backbone."""
    config = model.config
    backbone, layers = encoder_layers(model, variant.name, "MEFT", MeftEncoder)
    n = len(layers)
    k = n if num_rev_layers is None else num_rev_layers
    if k > n:
        raise ConfigError(f"method.num_rev_layers={num_rev_layers}: {type(model).__name__} has {n} layers; "
                          f"choose 0..{n}, or null for all")

    ref = layers[0].output.dense.weight  # new modules follow the model's dtype and device
    kw = dict(dim=config.hidden_size, bottleneck=bottleneck, activation=activation,
              dropout=config.hidden_dropout_prob if dropout is None else dropout,
              layernorm_eps=config.layer_norm_eps, dtype=ref.dtype, device=ref.device)
    new_layers = [
        BertMeftLayer(
            layer, variant, lam, beta,
            make_adapter=lambda: Adapter(**kw),
            make_rev_adapter=lambda: Adapter(layernorm=adapter_layernorm, **kw),
        )
        for layer in layers
    ]
    backbone.encoder = MeftEncoder(new_layers, num_rev_layers=k, inverse=inverse)
    return backbone
