"""SHERL on BART: where the early and late routes sit in an encoder-decoder.

With N decoder layers and k late layers:

- early route (no gradient, no graph): the WHOLE encoder, the decoder's embeddings
  (``embed_tokens``, ``embed_positions``, ``layernorm_embedding``) and decoder layers
  1 … N−k, whose cross-attention reads the encoder output;
- side module: fuses the decoder stream's features h_0 (decoder embedding output) …
  h_{N−k} (docs/DESIGN.md §2) into the input of the late layers;
- late route (autograd): the last k decoder layers, self-attending causally to the side
  module's output and cross-attending to the (gradient-free) encoder output, then the head:
  ``BartForSequenceClassification``'s EOS-token ``classification_head`` (trains), or the
  frozen, embedding-tied ``lm_head``.

Why there: the head reads the decoder's last layer, so the late route must end there and
the task gradient enters through the last decoder layers. Putting the encoder on the early
route keeps SHERL's memory property (only k layers and the small side module hold
activations, the encoder holds none). The fused features must live on the late layers'
input positions, which are the decoder's tokens: encoder features sit on the source
positions (another length in general), so they enter the late route the way BART feeds
them anyway, through cross-attention, not through the fusion. The alternative, the encoder
as early route with the whole decoder as late route, would keep autograd state for N
decoder layers and lose most of the saving.

Late tuning (``late_tuning=lora|adapter``) touches the late layers' self-attention
(``self_attn.q_proj``/``v_proj``; adapters after ``self_attn.out_proj`` and ``fc2``); the
cross-attention stays frozen, so the encoder output (no grad) meets only frozen linear
maps and autograd keeps nothing of it.

``k`` counts decoder layers: 1 <= k < decoder_layers. Supported: ``BartModel``,
``BartForSequenceClassification``, ``BartForConditionalGeneration`` and the decoder-only
``BartForCausalLM`` (no encoder: the early route is the decoder's embeddings and early
layers). The hooks, checkpointing and no-cache rule are ``decoder.attach``'s.
"""
from __future__ import annotations

import torch.nn as nn

from memtl.errors import ConfigError
from memtl.methods.sherl.decoder import attach, embedding_modules
from memtl.methods.sherl.side import SideModule


def install(model: nn.Module, late_layers: int, side_width: int | None, projection: str, dropout: float,
            temperature: float, checkpointing: bool) -> tuple[nn.Module, SideModule, list[nn.Module]]:
    """SHERL in a BART model; returns (backbone, side module, late decoder layers)."""
    backbone = model.base_model  # BartModel, or BartDecoderWrapper for BartForCausalLM
    decoder = getattr(backbone, "decoder", None)
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise ConfigError(f"method=sherl: {type(model).__name__} has no BART decoder where SHERL expects it "
                          "(transformers v5 layout); choose a supported backbone")
    encoder = getattr(backbone, "encoder", None)
    early = ([encoder] if isinstance(encoder, nn.Module) else []) + embedding_modules(decoder)
    side, late = attach(model, decoder, decoder.layers, early, late_layers, side_width, projection, dropout,
                        temperature, checkpointing, what="decoder layers")
    return backbone, side, late
