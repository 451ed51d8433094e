"""LoRA through Hugging Face ``peft``; the task head stays fully trainable."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from memtl.errors import ConfigError
from memtl.methods import head_parameter_names, register_method
from memtl.methods.options import MethodOptions, option
from memtl.methods.checkpointing import enable_gradient_checkpointing

# peft's defaults per architecture would also work, but naming them keeps runs comparable
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "bart": ["q_proj", "v_proj"],  # encoder self-, decoder self- and cross-attention
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
}


@dataclass
class LoraOptions(MethodOptions):
    r: int = option(8, "the LoRA rank", min=1)
    alpha: float = option(16, "the LoRA alpha", gt=0)  # scale = alpha / r
    dropout: float = option(0.1, "dropout on the LoRA input", min=0, lt=1)
    target_modules: list[str] | None = option(None, "the modules LoRA adapts",
                                              null="the query/value projections (all linear layers where unknown)")
    gradient_checkpointing: bool = option(False, "gradient checkpointing (recompute activations in backward)")

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)


@register_method("lora", LoraOptions)
def apply_lora(model: nn.Module, opts: LoraOptions) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = opts.target_modules or DEFAULT_TARGETS.get(model_type)
    if targets is None:
        targets = "all-linear"
    else:
        leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in targets if t not in leaf_names and not any(n.endswith(t) for n, _ in model.named_modules())]
        if missing:
            raise ConfigError(
                f"method.target_modules: no module named {', '.join(map(repr, missing))} in {type(model).__name__}; "
                f"linear layers are named {', '.join(sorted(leaf_names))}"
            )
    if opts.gradient_checkpointing:
        # enable on the base model before wrapping; peft forwards the flag
        enable_gradient_checkpointing(model)
    config = LoraConfig(
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=targets,
        modules_to_save=head_parameter_names(model),
        bias="none",
    )
    return get_peft_model(model, config)
