"""Optional tuning of SHERL's late pre-trained layers: LoRA or adapters.

Both wrap an existing ``nn.Linear`` and take over its ``weight``/``bias`` Parameters under
the same names, so pre-trained state-dict keys (``...query.weight``) are unchanged; the new
trainable tensors appear beside them (``...query.lora_A.weight``, ``...dense.adapter.*``).

Where, per architecture (``TARGETS``): LoRA on the self-attention query and value
projections; adapters after the self-attention output projection and after the
feed-forward output projection (before each block's dropout + residual [+ LayerNorm]).
BART's cross-attention stays frozen (see ``bart.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from memtl.methods.meft.adapters import Adapter


class LoraLinear(nn.Module):
    """``W x + b + (alpha / r) · B A dropout(x)`` with ``B = 0`` at init (as peft)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the frozen pre-trained tensors
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.lora_A.out_features}"


class AdaptedLinear(nn.Module):
    """``y = W x + b``, then ``y + adapter(y)``: a Houlsby-style sequential adapter on a
    block's output projection, before its dropout + residual + LayerNorm."""

    def __init__(self, base: nn.Linear, bottleneck: int, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.adapter = Adapter(base.out_features, bottleneck, activation="relu", dropout=dropout,
                               dtype=base.weight.dtype, device=base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.adapter(y)


# model_type -> (LoRA targets, adapter targets), as paths inside one layer
_ENCODER = (("attention.self.query", "attention.self.value"), ("attention.output.dense", "output.dense"))
_OPT_BART = (("self_attn.q_proj", "self_attn.v_proj"), ("self_attn.out_proj", "fc2"))
TARGETS = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "bart": _OPT_BART,
    "opt": _OPT_BART,
    "llama": (("self_attn.q_proj", "self_attn.v_proj"), ("self_attn.o_proj", "mlp.down_proj")),
}


def _wrap(layer: nn.Module, path: str, make) -> nn.Module:
    parent, _, name = path.rpartition(".")
    owner = layer.get_submodule(parent)
    new = make(getattr(owner, name))
    setattr(owner, name, new)
    return new


def add_lora(layer: nn.Module, model_type: str, r: int, alpha: float, dropout: float) -> list[nn.Module]:
    """LoRA on the attention query and value projections of one layer; returns the new modules."""
    wrapped = [_wrap(layer, path, lambda lin: LoraLinear(lin, r, alpha, dropout)) for path in TARGETS[model_type][0]]
    return [m for w in wrapped for m in (w.lora_A, w.lora_B)]


def add_adapters(layer: nn.Module, model_type: str, bottleneck: int, dropout: float) -> list[nn.Module]:
    """Adapters after the attention output projection and the feed-forward output projection."""
    return [_wrap(layer, path, lambda lin: AdaptedLinear(lin, bottleneck, dropout)).adapter
            for path in TARGETS[model_type][1]]
