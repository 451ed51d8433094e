"""Head only (a linear probe): the pre-trained model stays frozen, only the task head trains.

The reference for every other method: what the frozen features alone score at the same
budget, so a table shows how much each method adds on top of them (and the majority-class
floor shows what the head alone could fake by predicting one class).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from memtl.errors import ConfigError
from memtl.methods import head_parameter_names, register_method
from memtl.methods.options import MethodOptions


@dataclass
class HeadOptions(MethodOptions):
    pass


@register_method("head", HeadOptions)
def apply_head(model: nn.Module, opts: HeadOptions) -> nn.Module:
    names = head_parameter_names(model)
    if not names:
        # e.g. a decoder scoring QA choices with its LM head, tied to the input embeddings
        raise ConfigError(f"method=head: {type(model).__name__} has no separate task head to train (classifier, "
                          "classification_head, score or qa_outputs); use head-only with a classification "
                          "head (GLUE tasks, encoders' multiple-choice QA) or pick another method")
    model.requires_grad_(False)
    for name in names:
        model.get_submodule(name).requires_grad_(True)
    return model
