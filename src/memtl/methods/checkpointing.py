"""Gradient checkpointing as a switch that combines with full fine-tuning and LoRA."""
from __future__ import annotations

import torch.nn as nn

from memtl.errors import ConfigError


def enable_gradient_checkpointing(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} does not support gradient checkpointing: "
            "set method.gradient_checkpointing=false"
        )
    # non-reentrant: works when the layer inputs do not require grad (frozen embeddings + LoRA)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
