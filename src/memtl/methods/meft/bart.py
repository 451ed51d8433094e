"""BART (post-LayerNorm encoder–decoder) part of MEFT: both stacks reversible.

``BartModel.encoder``/``.decoder`` become ``MeftBartEncoder``/``MeftBartDecoder`` in place
(install.py), keeping their embeddings (``embed_tokens`` stays tied to ``shared``),
``embed_positions`` and ``layernorm_embedding``; their ``layers`` are ``BartMeftLayer``s
taking over each HF layer's sub-modules under their names (``self_attn``, ``encoder_attn``,
``fc1`` ...): pre-trained state-dict keys are unchanged, the adapters are new keys beside
them. Both keep HF's call signatures, so
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

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions
from transformers.models.bart.modeling_bart import BartDecoder, BartEncoder, BartModel

from memtl.errors import ConfigError
from memtl.methods.meft.adapters import Adapter, MeftLayer, Variant
from memtl.methods.meft.decoder import CACHE_ARG
from memtl.methods.meft.install import Architecture, MeftStack


class BartMeftLayer(MeftLayer):
    """A BART encoder or decoder layer split into attention and feed-forward blocks, with adapters."""

    def __init__(self, hf_layer: nn.Module, variant: Variant, lam: float, beta: float,
                 make_adapter: Callable[[], Adapter], make_rev_adapter: Callable[[], Adapter]):
        super().__init__(hf_layer, variant, lam, beta, make_adapter, make_rev_adapter)
        # MEFT3 decoder layers: a second attention adapter, on the cross-attention output
        self.cross_attn_adapter = make_adapter() if variant.attn_adapter and self.encoder_attn is not None else None

    def take_over(self, hf_layer: nn.Module) -> None:
        self.self_attn = hf_layer.self_attn
        self.self_attn_layer_norm = hf_layer.self_attn_layer_norm
        # decoder layers only: cross-attention on the encoder output
        self.encoder_attn = getattr(hf_layer, "encoder_attn", None)
        self.encoder_attn_layer_norm = getattr(hf_layer, "encoder_attn_layer_norm", None)
        self.fc1, self.fc2, self.final_layer_norm = hf_layer.fc1, hf_layer.fc2, hf_layer.final_layer_norm
        self.activation_fn = hf_layer.activation_fn
        self.dropout, self.activation_dropout = hf_layer.dropout, hf_layer.activation_dropout

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


def _embed(stack: nn.Module, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """What both stacks run on: token plus position embeddings, LayerNorm, dropout (as HF)."""
    h = stack.layernorm_embedding(inputs_embeds + positions.to(inputs_embeds.device))
    return F.dropout(h, p=stack.dropout, training=stack.training)


def _check_ids(input_ids, inputs_embeds, what: str) -> None:
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError(f"You must specify exactly one of {what}input_ids or {what}inputs_embeds")


class MeftBartEncoder(MeftStack, BartEncoder):
    """``BartEncoder`` with its layers run as a MEFT stack (same call signature and output)."""

    label = "encoder"

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> BaseModelOutput:
        _check_ids(input_ids, inputs_embeds, "")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        h = _embed(self, inputs_embeds, self.embed_positions(inputs_embeds[:, :, -1]))  # shape only, as HF
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=self.run_layers(h, mask))


class MeftBartDecoder(MeftStack, BartDecoder):
    """``BartDecoder`` with its layers run as a MEFT stack (same call signature and output).
    HF's KV cache works without gradients (``generate()``); with gradients on it raises (the
    reversible backward runs each attention again)."""

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
        h = _embed(self, inputs_embeds, self.embed_positions(input_ids, past, position_ids=position_ids))
        # the encoder output is differentiable context: the reversible backward returns its gradient
        h = self.run_layers(h, self_mask, encoder_hidden_states, cross_mask, cache)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=h, **{CACHE_ARG: cache})


def _backbone(model: nn.Module, method: str) -> nn.Module:
    backbone = model if isinstance(model, BartModel) else getattr(model, "model", None)
    if not isinstance(backbone, BartModel):
        raise ConfigError(f"method={method}: {type(model).__name__} has no BART encoder-decoder "
                          "(BartModel); MEFT supports BartModel, BartForSequenceClassification, "
                          "BartForConditionalGeneration and BartForQuestionAnswering")
    return backbone


SPECS = {"bart": Architecture(backbone=_backbone, stacks={"encoder": MeftBartEncoder, "decoder": MeftBartDecoder},
                              layer=BartMeftLayer,
                              layernorm_eps=lambda config: 1e-5,  # BART's LayerNorms: torch's default eps
                              dropout=lambda config: config.dropout)}
