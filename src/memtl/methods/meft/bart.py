"""BART (post-LayerNorm encoder–decoder) part of MEFT: both stacks reversible.

``BartModel.encoder``/``.decoder`` are replaced by ``MeftBartEncoder``/``MeftBartDecoder``,
which take over the embeddings (``embed_tokens`` stays tied to ``shared``),
``embed_positions`` and ``layernorm_embedding`` under their names, and whose ``layers``
are ``BartMeftLayer``s taking over each HF layer's sub-modules under their names
(``self_attn``, ``encoder_attn``, ``fc1`` ...): pre-trained state-dict keys are unchanged,
the adapters are new keys beside them. Both keep HF's call signatures, so
``model(input_ids, attention_mask, labels)`` works as before, and the sequence
classification head still reads the decoder's final EOS token (HF's
``BartForSequenceClassification``); ``BartForConditionalGeneration`` and
``BartForQuestionAnswering`` work the same way (frozen LM head, trainable ``qa_outputs``).

Blocks (post-LayerNorm, like BERT; LayerNorm eps is BART's, 1e-5):

- attention block: self-attention → dropout → [adapter on the output projection, MEFT3]
  → residual → ``self_attn_layer_norm``; in a decoder layer the self-attention is causal
  and is followed by the cross-attention block on the encoder output (same shape:
  ``encoder_attn`` → dropout → [adapter, MEFT3] → residual → ``encoder_attn_layer_norm``);
- feed-forward block: ``fc1`` → act → dropout → ``fc2`` → dropout, plus the parallel FFN
  adapter, → residual → ``final_layer_norm``;
- whole layer: attention block(s) then feed-forward block.

F and G per variant (docs/DESIGN.md §1.3), identical in both stacks except that a decoder's
"attention block" is self- plus cross-attention:

- MEFT1: F = whole layer (incl. cross-attention in the decoder), G = adapter; λ=0.1, β=1.
- MEFT2: F = adapter, G = whole layer; λ=1, β=0.1.
- MEFT3: F = self-attention (+ cross-attention) block(s), each attention output with its own
  adapter (``attn_adapter``; decoder also ``cross_attn_adapter``), G = feed-forward block
  with its parallel adapter; λ=β=0.1. Decoder layers thus hold three adapters in MEFT3.

Streams: each stack starts its two streams from its own embedding output and averages
them at its end; the encoder's average is the ``encoder_hidden_states`` every decoder
layer's cross-attention reads. That tensor is differentiable context of the decoder's
reversible stack (engine.py): its backward returns the gradient summed over all decoder
layers, which then flows into the encoder stack, so the encoder adapters train exactly
as under plain autograd.

``num_rev_layers = k`` applies to each stack: the first k encoder layers and the first k
decoder layers use the reversible backward (a stack with fewer than k layers: all of
it); k may be at most the larger stack's depth. ``inverse`` (exact | float) applies to
both stacks alike; both expose it and ``num_rev_layers`` for experiments.
Adapter dropout defaults to BART's ``config.dropout``.

Generation: the decoder takes HF's KV cache without gradients (``generate()``); with
gradients on a cache raises. Not supported: LayerDrop (never applied),
``output_hidden_states``/``output_attentions`` (the HF hooks target the replaced layers:
nothing is recorded), the decoder-only ``BartForCausalLM``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions
from transformers.models.bart.modeling_bart import BartModel

from memtl.errors import ConfigError
from memtl.methods.meft.adapters import Adapter, MeftLayer, Variant
from memtl.methods.meft.decoder import CACHE_ARG
from memtl.methods.meft.engine import run_stack


class BartMeftLayer(MeftLayer):
    """A BART encoder or decoder layer split into attention and feed-forward blocks, with adapters."""

    def __init__(self, hf_layer: nn.Module, variant: Variant, lam: float, beta: float,
                 make_adapter, make_rev_adapter):
        super().__init__()
        self.variant, self.lam, self.beta, self.switch = variant, lam, beta, variant.switch
        # take over the pre-trained sub-modules under their original names
        self.self_attn = hf_layer.self_attn
        self.self_attn_layer_norm = hf_layer.self_attn_layer_norm
        # decoder layers only: cross-attention on the encoder output
        self.encoder_attn = getattr(hf_layer, "encoder_attn", None)
        self.encoder_attn_layer_norm = getattr(hf_layer, "encoder_attn_layer_norm", None)
        self.fc1, self.fc2, self.final_layer_norm = hf_layer.fc1, hf_layer.fc2, hf_layer.final_layer_norm
        self.activation_fn = hf_layer.activation_fn
        self.dropout, self.activation_dropout = hf_layer.dropout, hf_layer.activation_dropout
        # parallel adapter on the feed-forward block (every variant)
        self.ffn_adapter = make_adapter()
        # MEFT3: an adapter on each attention output projection
        self.attn_adapter = make_adapter() if variant.attn_adapter else None
        self.cross_attn_adapter = make_adapter() if variant.attn_adapter and self.encoder_attn is not None else None
        # MEFT1/2: the stand-alone adapter playing G (MEFT1) or F (MEFT2)
        self.rev_adapter = make_rev_adapter() if variant.rev_adapter else None

    def _attend(self, attn: nn.Module, norm: nn.Module, adapter: Adapter | None, x: torch.Tensor, **kw):
        """One attention sub-block: attention → dropout → (+ adapter) → residual → LayerNorm."""
        h, _ = attn(x, **kw)
        h = F.dropout(h, p=self.dropout, training=self.training)
        if adapter is not None:
            h = h + adapter(h)  # sequential on the projection, as in the BERT version
        return norm(x + h)

    def attention_block(self, x: torch.Tensor, mask=None, encoder_hidden_states=None, encoder_mask=None,
                        cache=None):
        h = self._attend(self.self_attn, self.self_attn_layer_norm, self.attn_adapter, x, attention_mask=mask,
                         **{CACHE_ARG: cache})
        if self.encoder_attn is not None:
            h = self._attend(self.encoder_attn, self.encoder_attn_layer_norm, self.cross_attn_adapter, h,
                             key_value_states=encoder_hidden_states, attention_mask=encoder_mask, **{CACHE_ARG: cache})
        return h

    def feed_forward_block(self, h: torch.Tensor) -> torch.Tensor:
        z = F.dropout(self.activation_fn(self.fc1(h)), p=self.activation_dropout, training=self.training)
        z = F.dropout(self.fc2(z), p=self.dropout, training=self.training)
        z = z + self.ffn_adapter(h)
        return self.final_layer_norm(z + h)

    def whole_layer(self, x: torch.Tensor, *context) -> torch.Tensor:
        return self.feed_forward_block(self.attention_block(x, *context))


class _MeftBartStack(nn.Module):
    """What the encoder and decoder share: the HF embedding modules, the MEFT layers, and
    the two-stream run (both streams from the embedding output, averaged at the end)."""

    def __init__(self, hf_stack: nn.Module, layers: list[BartMeftLayer], num_rev_layers: int, inverse: str):
        super().__init__()
        self.config = hf_stack.config
        self.dropout = hf_stack.dropout
        self.embed_tokens = hf_stack.embed_tokens  # its weight is BartModel.shared's: ties kept
        self.embed_positions = hf_stack.embed_positions
        self.layernorm_embedding = hf_stack.layernorm_embedding
        self.layers = nn.ModuleList(layers)
        # public: tests and experiments may switch these (num_rev_layers=0: plain autograd, same maths)
        self.num_rev_layers = num_rev_layers
        self.inverse = inverse

    recorded: list | None = None  # see engine.run_stack

    def embed(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.layernorm_embedding(inputs_embeds + positions.to(inputs_embeds.device))
        return F.dropout(h, p=self.dropout, training=self.training)

    def run(self, h: torch.Tensor, context: tuple) -> torch.Tensor:
        return run_stack(self, h, self.layers, context, self.label)


def _check_ids(input_ids, inputs_embeds, what: str) -> None:
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError(f"You must specify exactly one of {what}input_ids or {what}inputs_embeds")


class MeftBartEncoder(_MeftBartStack):
    """Drop-in for ``BartEncoder`` (same call signature and output)."""

    label = "encoder"

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> BaseModelOutput:
        _check_ids(input_ids, inputs_embeds, "")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        h = self.embed(inputs_embeds, self.embed_positions(inputs_embeds[:, :, -1]))  # shape only, as HF
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=self.run(h, (mask,)))


class MeftBartDecoder(_MeftBartStack):
    """Drop-in for ``BartDecoder`` (same call signature and output). HF's KV cache works
    without gradients (``generate()``); with gradients on it raises (the reversible backward
    runs each attention again)."""

    label = "decoder"

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, inputs_embeds=None, use_cache=None,
                **kwargs) -> BaseModelOutputWithPastAndCrossAttentions:
        # transformers >= 5.24 passes the cache as ``cache`` and builds it inside the decoder from use_cache
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else past_key_values
        if use_cache or cache is not None:
            if torch.is_grad_enabled():
                raise ValueError("MEFT BART decoder: a KV cache is for inference only (the reversible backward runs "
                                 "each attention again); call it under torch.no_grad() (as generate() does) or "
                                 "with use_cache=False")
            if cache is None:
                cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        if encoder_hidden_states is None:
            raise ValueError("MEFT BART decoder: encoder_hidden_states is required (decoder-only use is not supported)")
        _check_ids(input_ids, inputs_embeds, "decoder_")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(past, past + length, device=inputs_embeds.device)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, device=inputs_embeds.device)
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        # passed by position, as transformers 5.24 renamed the argument past_key_values -> cache
        self_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, self_cache)
        cross_mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds,
                                               attention_mask=encoder_attention_mask,
                                               encoder_hidden_states=encoder_hidden_states)
        h = self.embed(inputs_embeds, self.embed_positions(input_ids, past, position_ids=position_ids))
        # the encoder output is differentiable context: the reversible backward returns its gradient
        h = self.run(h, (self_mask, encoder_hidden_states, cross_mask, cache))
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=h, **{CACHE_ARG: cache})


def install(model: nn.Module, variant: Variant, lam: float, beta: float, num_rev_layers: int | None,
            bottleneck: int, activation: str, dropout: float | None, adapter_layernorm: bool,
            inverse: str = "exact") -> nn.Module:
    """Swap the encoder and decoder of a BART model for MEFT stacks; returns the ``BartModel``."""
    backbone = model if isinstance(model, BartModel) else getattr(model, "model", None)
    if not isinstance(backbone, BartModel):
        raise ConfigError(f"method={variant.name}: {type(model).__name__} has no BART encoder-decoder "
                          "(BartModel); MEFT supports BartModel, BartForSequenceClassification, "
                          "BartForConditionalGeneration and BartForQuestionAnswering")
    if isinstance(backbone.encoder, MeftBartEncoder):
        raise ConfigError(f"method={variant.name}: {type(model).__name__} already has MEFT applied; "
                          "apply a method once, to a fresh pre-trained model")
    config = model.config
    enc_layers, dec_layers = list(backbone.encoder.layers), list(backbone.decoder.layers)
    deepest = max(len(enc_layers), len(dec_layers))
    if num_rev_layers is not None and num_rev_layers > deepest:
        raise ConfigError(f"method.num_rev_layers={num_rev_layers}: {type(model).__name__} has "
                          f"{len(enc_layers)} encoder and {len(dec_layers)} decoder layers (k applies to each "
                          f"stack); choose 0..{deepest}, or null for all")

    ref = enc_layers[0].fc1.weight  # new modules follow the model's dtype and device
    kw = dict(dim=config.d_model, bottleneck=bottleneck, activation=activation,
              dropout=config.dropout if dropout is None else dropout,
              layernorm_eps=enc_layers[0].final_layer_norm.eps, dtype=ref.dtype, device=ref.device)

    def convert(layers):
        return [BartMeftLayer(layer, variant, lam, beta, make_adapter=lambda: Adapter(**kw),
                              make_rev_adapter=lambda: Adapter(layernorm=adapter_layernorm, **kw))
                for layer in layers]

    def rev(n):  # the first k layers of each stack; a shallower stack: all of it
        return n if num_rev_layers is None else min(num_rev_layers, n)

    backbone.encoder = MeftBartEncoder(backbone.encoder, convert(enc_layers), rev(len(enc_layers)), inverse)
    backbone.decoder = MeftBartDecoder(backbone.decoder, convert(dec_layers), rev(len(dec_layers)), inverse)
    return backbone
