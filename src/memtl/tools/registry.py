"""The tools' one table of methods: each label that ``memtl bench``, ``memtl estimate`` and
``memtl gpu-check`` accept, as the ``apply_method`` name and options it stands for. Kept free
of torch, so that the estimator stays light."""
from __future__ import annotations

# label -> (apply_method name, options)
METHOD_SPECS = {
    "full": ("full", {}),
    "lora": ("lora", {}),
    "full+ckpt": ("full", {"gradient_checkpointing": True}),
    "lora+ckpt": ("lora", {"gradient_checkpointing": True}),
    "meft1": ("meft1", {}),
    "meft2": ("meft2", {}),
    "meft3": ("meft3", {}),
    # the paper's float inverse (the default is the exact, fixed-point one)
    "meft1+float": ("meft1", {"inverse": "float"}),
    "meft2+float": ("meft2", {"inverse": "float"}),
    "meft3+float": ("meft3", {"inverse": "float"}),
    "sherl": ("sherl", {}),
    "sherl+keep": ("sherl", {"recompute_side": False}),  # the side module's activations kept (authors' code)
    "sherl+ckpt": ("sherl", {"gradient_checkpointing": True}),
    # the paper's setting on every backbone (decoder LMs default to the kept start + late LoRA)
    "sherl+paper": ("sherl", {"preserve_start": False, "late_layers": 1, "late_tuning": "frozen"}),
    "head": ("head", {}),  # linear probe: only the task head trains
}
PEERS = ["full", "lora", "full+ckpt", "lora+ckpt"]  # what every benchmark measures beside a method
