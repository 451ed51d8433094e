"""BERT-family part of SHERL: BERT and RoBERTa (post-LayerNorm encoders).

The HF encoder is replaced by ``SherlEncoder``, which keeps the pre-trained layers under
their original names (``encoder.layer.<i>``, so pre-trained state-dict keys are unchanged)
and adds the side module as ``encoder.side``. It keeps the HF encoder's call signature,
so ``model(input_ids=..., attention_mask=..., token_type_ids=..., labels=...)`` works as
before: embeddings -> SHERL encoder -> pooler -> classifier.

Not supported: decoders / cross-attention, KV caches. ``output_hidden_states`` reports
what the HF layer hooks see: the early layers' outputs h_1..h_{N-k}, then the late layers'
outputs (whose input is the side module's output, not h_{N-k}).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from memtl.errors import ConfigError
from memtl.methods.bert_family import encoder_layers
from memtl.methods.sherl.side import SideModule, run_without_grad


class SherlEncoder(nn.Module):
    """Drop-in for ``BertEncoder``: early route without a graph, side module, late layers.

    ``layer[:n_early]`` run under ``torch.no_grad()``, as do the embeddings (through hooks
    installed by ``install``; their output is detached here as well); their
    outputs ``h_0 … h_{N-k}`` are the only tensors the early route keeps. ``side`` turns
    them into the input of ``layer[n_early:]``, which run with autograd.

    ``checkpointing`` (public, switchable): during training recompute the side module
    (and, inside it, each projection on its own) and each late layer in backward
    (non-reentrant ``torch.utils.checkpoint``), so only the side module's inputs h_i (one
    d-wide tensor per early layer) and each late layer's input are kept between forward
    and backward.
    """

    def __init__(self, layers: nn.ModuleList, num_late: int, side: SideModule, checkpointing: bool = False):
        super().__init__()
        self.layer = layers
        self.side = side
        self.num_late = num_late
        self.checkpointing = checkpointing

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        self._checkpointing = self.side.recompute = bool(value)

    @property
    def num_early(self) -> int:
        return len(self.layer) - self.num_late

    def early_features(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> list[torch.Tensor]:
        """``[h_0, h_1, …, h_{N-k}]``: the embedding output and the early layers' outputs,
        computed without an autograd graph."""
        h = hidden_states.detach()
        features = [h]
        with torch.no_grad():
            for layer in self.layer[: self.num_early]:
                h = layer(h, attention_mask, **kwargs)
                features.append(h)
        return features

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("SHERL encoder: cross-attention (encoder_hidden_states) is not supported")
        features = self.early_features(hidden_states, attention_mask, **kwargs)
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        x = self.side(features)
        del features  # from here on only autograd's saved tensors hold them
        for layer in self.layer[self.num_early:]:
            if recompute:
                x = checkpoint(layer, x, attention_mask, use_reentrant=False, **kwargs)
            else:
                x = layer(x, attention_mask, **kwargs)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=x)


def install(model: nn.Module, late_layers: int, side_width: int | None, projection: str, dropout: float | None,
            temperature: float, checkpointing: bool) -> tuple[nn.Module, SideModule, list[nn.Module]]:
    """Swap the encoder of a BERT-family model for a SHERL encoder; returns (backbone, side
    module, late layers)."""
    config = model.config
    backbone, layers = encoder_layers(model, "sherl", "SHERL", SherlEncoder)
    n = len(layers)
    if late_layers >= n:
        raise ConfigError(f"method.late_layers={late_layers}: {type(model).__name__} has {n} layers and SHERL "
                          f"needs at least one early layer; choose 1..{n - 1}")
    dim = config.hidden_size
    side_dim = dim // 2 if side_width is None else side_width
    if side_dim < 1:
        raise ConfigError(f"method.side_width=null: hidden size {dim} is too small to halve; set method.side_width")
    ref = layers[0].output.dense.weight  # new modules follow the model's dtype and device
    side = SideModule(
        num_features=n - late_layers + 1, dim=dim, side_dim=side_dim, projection=projection,
        dropout=config.hidden_dropout_prob if dropout is None else dropout, temperature=temperature,
        layer_norm_eps=config.layer_norm_eps, dtype=ref.dtype, device=ref.device,
    )
    run_without_grad(backbone.embeddings)  # the embeddings are part of the early route
    backbone.encoder = SherlEncoder(layers, num_late=late_layers, side=side, checkpointing=checkpointing)
    return backbone, side, list(layers[n - late_layers:])
