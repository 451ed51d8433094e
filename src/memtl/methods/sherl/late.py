"""Optional tuning of SHERL's late pre-trained layers: LoRA (through peft) or adapters.

LoRA is peft's, injected into the late layers only (``...q_proj.lora_A.default.weight``;
the frozen weight moves to ``...q_proj.base_layer.weight``). An adapter wraps an existing
``nn.Linear`` and takes over its ``weight``/``bias`` under the same names, so pre-trained
state-dict keys (``...dense.weight``) are unchanged beside the new ``...dense.adapter.*``.

Where: each architecture's ``lora``/``adapters`` paths (``architectures.py``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memtl.methods.meft.adapters import Adapter


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


def _wrap(layer: nn.Module, path: str, make) -> nn.Module:
    parent, _, name = path.rpartition(".")
    owner = layer.get_submodule(parent)
    new = make(getattr(owner, name))
    setattr(owner, name, new)
    return new


def add_lora(model: nn.Module, late: list[nn.Module], paths: tuple[str, ...], r: int, alpha: float,
             dropout: float) -> None:
    """peft's LoRA (B = 0 at init, scale alpha / r) on the linear maps at ``paths`` inside
    each late layer (the attention query and value projections). peft leaves only its
    adapters trainable, so this runs before the side module and the head are unfrozen."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {id(m): n for n, m in model.named_modules()}
    targets = [f"{names[id(layer)]}.{path}" for layer in late for path in paths]
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                       bias="none"), model)


def add_adapters(layer: nn.Module, paths: tuple[str, ...], bottleneck: int, dropout: float) -> list[nn.Module]:
    """Adapters after the linear maps at ``paths`` inside ``layer`` (the attention output
    projection and the feed-forward output projection)."""
    return [_wrap(layer, path, lambda lin: AdaptedLinear(lin, bottleneck, dropout)).adapter for path in paths]
