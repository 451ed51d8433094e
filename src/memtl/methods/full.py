"""Full fine-tuning: every parameter trains. Optional gradient checkpointing."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from memtl.methods import register_method
from memtl.methods.checkpointing import enable_gradient_checkpointing
from memtl.methods.options import MethodOptions, option


@dataclass
class FullOptions(MethodOptions):
    gradient_checkpointing: bool = option(False, "gradient checkpointing (recompute activations in backward)")


@register_method("full", FullOptions)
def apply_full(model: nn.Module, opts: FullOptions) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
