"""LoRA through Hugging Face ``peft``; the task head stays fully trainable."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from memtl.errors import ConfigError
from memtl.methods import head_parameter_names, register_method
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
class LoraOptions:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    target_modules: list[str] | None = None  # None: query/value projections
    gradient_checkpointing: bool = False

    def __post_init__(self):
        def number(x) -> bool:  # not a bool, nor a string a typo left
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not number(self.r) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"method.r={self.r!r}: the LoRA rank must be an integer >= 1")
        if not number(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"method.alpha={self.alpha!r}: the LoRA alpha must be a number > 0")
        if not number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout={self.dropout!r}: must be a number in [0, 1)")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"method.gradient_checkpointing={self.gradient_checkpointing!r}: must be true or false")
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ConfigError("method.target_modules is empty: name at least one module, or null for the default")


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
