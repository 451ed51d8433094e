"""Decoder-only part of MEFT: OPT (pre- and post-LayerNorm) and LLaMA (SmolLM2).

Each Hugging Face decoder layer is replaced by a MEFT layer that takes over its
sub-modules under the same names (OPT: ``self_attn``, ``self_attn_layer_norm``, ``fc1``,
``fc2``, ``final_layer_norm``; LLaMA: ``self_attn``, ``mlp``, ``input_layernorm``,
``post_attention_layernorm``), so pre-trained state-dict keys are unchanged; the adapters
sit beside them (``ffn_adapter``, ``attn_adapter``, ``rev_adapter``).

The blocks, with their residual inside (docs/DESIGN.md §1.5):

    pre-norm  (OPT-125m/1.3b, LLaMA)    attention_block(x)    = x + A(x),  A(x) = Attn(N1(x)) [+ adapter]
                                        feed_forward_block(h) = h + FFN(N2(h)) + ffn_adapter(N2(h))
    post-norm (OPT-350m)                attention_block(x)    = N1(x + A(x)), A(x) = Attn(x) [+ adapter]
                                        feed_forward_block(h) = N2(h + FFN(h) + ffn_adapter(h))
    whole_layer = feed_forward_block ∘ attention_block

The FFN adapter reads exactly what the FFN reads (``N2(h)`` in a pre-norm block), i.e. it
runs in parallel to the FFN as in the BERT layer; MEFT3's attention adapter is sequential
on the attention output projection (after its dropout): ``a + adapter(a)``, as in ``bert.py``.

The module that owns the HF layer loop (``OPTDecoder``; ``LlamaModel``) is switched in place
(install.py) to a subclass (``MeftOPTDecoder``; ``MeftLlamaModel``) whose ``forward`` does what HF's does
(embeddings, OPT's ``project_in``/``project_out`` and learned positions or LLaMA's rotary
embeddings, ``create_causal_mask``, final norm) but runs the layers as a reversible stack:
both streams start from the embedding output, and the stream that carries the pre-trained
layer chain (``method.output=chain``, the default here) or the streams' average goes into the
final norm (docs/DESIGN.md §1.2). The per-layer context handed to F and G is a ``DecoderContext`` (mask,
rotary cos/sin): non-differentiable, passed through the engine untouched. Sequence
classification (last non-pad token), causal-LM and QA heads are HF's own and unchanged.

Generation: without gradients (``generate()``, ``torch.no_grad()``) the stack is an ordinary
forward of the two streams, each layer's attention runs once, and HF's KV cache works as in
the original model (``use_cache=True``; ``cache``/``past_key_values``). With gradients on, a
cache raises: the reversible backward runs the attention again. Not supported:
``output_hidden_states``/``output_attentions`` (raise), OPT's ``layerdrop`` > 0 (ConfigError).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.models.opt.modeling_opt import OPTDecoder

from memtl.errors import ConfigError
from memtl.methods.meft.adapters import MeftLayer
from memtl.methods.meft.install import Architecture, MeftStack

# transformers 5.24 renamed the KV-cache argument and output field past_key_values -> cache;
# the GPU machines run older releases (5.17), so calls name it by what this install expects
CACHE_ARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

Tensor = torch.Tensor


class DecoderContext(NamedTuple):
    """What every layer needs besides its input; never differentiated."""

    mask: Tensor | None  # causal (+ padding) mask from create_causal_mask; None: sdpa's is_causal
    position_embeddings: tuple[Tensor, Tensor] | None = None  # LLaMA's rotary (cos, sin)
    cache: Cache | None = None  # the KV cache (inference only)


# --- layers ----------------------------------------------------------------------------


class _DecoderMeftLayer(MeftLayer):
    """What the decoder layers share: MEFT3's adapter on the attention output."""

    def _adapted(self, a: Tensor) -> Tensor:
        return a + self.attn_adapter(a) if self.attn_adapter is not None else a


class OPTMeftLayer(_DecoderMeftLayer):
    """An ``OPTDecoderLayer`` split into its blocks; pre-LN (125m, 1.3b) or post-LN (350m)."""

    def take_over(self, hf_layer: nn.Module) -> None:
        for name in ("self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm", "activation_fn"):
            setattr(self, name, getattr(hf_layer, name))
        self.do_layer_norm_before = hf_layer.do_layer_norm_before
        self.dropout = hf_layer.dropout

    def attention_block(self, x: Tensor, context: DecoderContext) -> Tensor:
        pre = self.do_layer_norm_before
        a, _ = self.self_attn(hidden_states=self.self_attn_layer_norm(x) if pre else x, attention_mask=context.mask,
                              **{CACHE_ARG: context.cache})
        h = x + self._adapted(F.dropout(a, self.dropout, self.training))
        return h if pre else self.self_attn_layer_norm(h)

    def feed_forward_block(self, h: Tensor) -> Tensor:
        pre = self.do_layer_norm_before
        z = self.final_layer_norm(h) if pre else h  # what the FFN (and its adapter) reads
        ffn = F.dropout(self.fc2(self.activation_fn(self.fc1(z))), self.dropout, self.training)
        out = h + ffn + self.ffn_adapter(z)
        return out if pre else self.final_layer_norm(out)


class LlamaMeftLayer(_DecoderMeftLayer):
    """A ``LlamaDecoderLayer`` (pre-RMSNorm, rotary attention, gated MLP) split into its blocks."""

    def take_over(self, hf_layer: nn.Module) -> None:
        for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            setattr(self, name, getattr(hf_layer, name))

    def attention_block(self, x: Tensor, context: DecoderContext) -> Tensor:
        a, _ = self.self_attn(hidden_states=self.input_layernorm(x), attention_mask=context.mask,
                              position_embeddings=context.position_embeddings, **{CACHE_ARG: context.cache})
        return x + self._adapted(a)

    def feed_forward_block(self, h: Tensor) -> Tensor:
        z = self.post_attention_layernorm(h)
        return h + self.mlp(z) + self.ffn_adapter(z)


# --- the module that owns the layer loop -------------------------------------------------


class MeftDecoderStack(MeftStack):
    """Mixin for the HF module that runs the layers (``OPTDecoder``, ``LlamaModel``): its
    ``layers`` become a reversible stack on two streams (install.py)."""

    label = "decoder"


def _cache(module: nn.Module, use_cache, past_key_values, kwargs) -> Cache | None:
    """The KV cache of this call (a new one for ``use_cache=True``), or None."""
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.get(flag):
            raise ValueError(f"MEFT decoder: {flag}=True is not supported (the HF layers it hooks are replaced); "
                             f"call with {flag}=False")
    # transformers >= 5.24 names the cache argument ``cache`` (``past_key_values`` before)
    cache = kwargs.get("cache") if kwargs.get("cache") is not None else past_key_values
    if not use_cache and cache is None:
        return None
    if torch.is_grad_enabled():
        raise ValueError("MEFT decoder: a KV cache is for inference only (the reversible backward runs each "
                         "attention again); call it under torch.no_grad() (as generate() does) or with use_cache=False")
    return cache if cache is not None else DynamicCache(config=module.config)


def _inputs_embeds(module, input_ids, inputs_embeds) -> Tensor:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    return module.embed_tokens(input_ids.view(-1, input_ids.shape[-1])) if inputs_embeds is None else inputs_embeds


class MeftOPTDecoder(MeftDecoderStack, OPTDecoder):
    """``OPTDecoder`` with its layers run as a MEFT stack (``OPTDecoder.forward``)."""

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, position_ids=None, **kwargs) -> BaseModelOutputWithPast:
        cache = _cache(self, use_cache, past_key_values, kwargs)
        inputs_embeds = _inputs_embeds(self, input_ids, inputs_embeds)
        past = cache.get_seq_length() if cache is not None else 0
        # learned positions count only the non-pad tokens (pads get position -1, as in HF)
        position_mask = attention_mask
        if position_mask is None:
            position_mask = torch.ones(inputs_embeds.shape[0], past + inputs_embeds.shape[1],
                                       device=inputs_embeds.device)
        if position_ids is None:
            position_ids = (torch.cumsum(position_mask, dim=1) * position_mask - 1).long()[:, past:]
        # passed by position, as transformers 5.24 renamed the argument (past_key_values -> cache)
        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache)
        pos_embeds = self.embed_positions(position_mask, past, position_ids=position_ids)
        if self.project_in is not None:  # OPT-350m: word_embed_proj_dim -> hidden_size
            inputs_embeds = self.project_in(inputs_embeds)
        h = self.run_layers(inputs_embeds + pos_embeds, DecoderContext(mask, cache=cache))
        if self.final_layer_norm is not None:  # pre-LN OPTs only
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return BaseModelOutputWithPast(last_hidden_state=h, **{CACHE_ARG: cache})


class MeftLlamaModel(MeftDecoderStack, LlamaModel):
    """``LlamaModel`` with its layers run as a MEFT stack (``LlamaModel.forward``)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        cache = _cache(self, use_cache, past_key_values, kwargs)
        inputs_embeds = _inputs_embeds(self, input_ids, inputs_embeds)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
        rotary = self.rotary_emb(inputs_embeds, position_ids=position_ids)  # (cos, sin), no grad
        h = self.run_layers(inputs_embeds, DecoderContext(mask, rotary, cache))
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{CACHE_ARG: cache})


# --- what install.py needs --------------------------------------------------------------


def _backbone(model: nn.Module, method: str) -> nn.Module:
    config = model.config
    if getattr(config, "layerdrop", 0.0) > 0:
        raise ConfigError(f"method={method}: the model's config.layerdrop={config.layerdrop} skips layers at "
                          "random, MEFT needs a fixed reversible stack; set config.layerdrop=0")
    return model.base_model  # OPTModel / LlamaModel


SPECS = {
    "opt": Architecture(backbone=_backbone, stacks={"decoder": MeftOPTDecoder}, layer=OPTMeftLayer,
                        layernorm_eps=lambda config: 1e-5,  # as OPT's LayerNorms
                        dropout=lambda config: config.dropout),
    "llama": Architecture(backbone=_backbone, stacks={"": MeftLlamaModel}, layer=LlamaMeftLayer,
                          layernorm_eps=lambda config: config.rms_norm_eps,
                          dropout=lambda config: 0.0),  # LLaMA has no hidden dropout
}
