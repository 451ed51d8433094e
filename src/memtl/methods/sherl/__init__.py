"""SHERL: early anti-redundancy route + late-layer route (Diao et al., ECCV 2024; docs/DESIGN.md §2).

    model = memtl.apply_method(model, "sherl")                 # the backbone family's defaults
    model = memtl.apply_method(model, "sherl", late_layers=1, preserve_start=True)

The embeddings and the first N−k pre-trained layers run under ``torch.no_grad()``: no
autograd graph, no gradient, none of their internals kept. Their outputs h_0 … h_{N−k}
are projected to width d' (one projection each), fused per token by the anti-redundancy
module, mapped back to width d and added to the gated ``tanh(g/T)·h_{N−k}``; the result
enters the last k pre-trained layers, which run with autograd, then the task head.
Layout:

- ``side.py``  projections, anti-redundancy fusion, output block (architecture-agnostic)
- ``install.py``  the one install: hooks that split the HF module owning the layer loop
  into the two routes, transformers' own forward left running (``SherlSplit``)
- ``architectures.py``  per model type, where that module, its layers and the early
  modules are (BART: the encoder and the early decoder layers early, the last k decoder
  layers late), and the late-tuning targets
- ``late.py``  optional LoRA (peft) / adapters in the late layers

Trainable: the side module (projections, fusion w/b, output block, gate g), the task head
(``classifier``/``classification_head``/``score``/``qa_outputs`` and the backbone's pooler
when it has one), and the late-layer LoRA/adapters when enabled. Every pre-trained weight is
frozen, LM heads included (OPT/BART tie theirs to the input embeddings, which are early).

Options: declared once in ``SherlOptions`` below (``memtl options sherl``); what each does,
the family defaults (None: the backbone family's value, ``FAMILY_DEFAULTS``) and the
kept starting point (``preserve_start``): docs/methods.md, "SHERL".

Memory (docs/DESIGN.md §4), per extra early layer and token: h_i (d floats, needed for P_i's
weight gradient; the floor short of recomputing frozen layers) plus, without
checkpointing, P_i's pre-LayerNorm output and z_i (d' each): 2d at d' = d/2. The fusion's
hand-written backward keeps a single d'-wide gradient buffer per layer (measured per
layer: docs/RESULTS.md, "Depth sweep"). ``recompute_side`` (default) recomputes the side module in
backward, so between forward and backward the early route holds only the h_i;
``gradient_checkpointing`` recomputes the late layers too (compare peak step memory then:
the saved-tensor hook of ``StepMemoryMeter`` cannot see inside a checkpoint).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from memtl.errors import ConfigError
from memtl.methods import register_method, supported_model_type
from memtl.methods.bert_family import unfreeze_head
from memtl.methods.options import MethodOptions, is_int, is_number, option
from memtl.methods.sherl.architectures import SPECS
from memtl.methods.sherl.install import SherlSplit, install
from memtl.methods.sherl.late import add_adapters, add_lora
from memtl.methods.sherl.side import PROJECTIONS, START_FORMS, AntiRedundancyFusion, SideModule

__all__ = ["SherlOptions", "SherlSplit", "SideModule", "AntiRedundancyFusion", "apply_sherl"]

LATE_TUNING = ("frozen", "lora", "adapter")


# Defaults that depend on the backbone family: an option left at None takes its family's
# value when SHERL is applied. Decoder LMs (OPT, LLaMA) score through their frozen, tied LM
# head, so only the late route can adapt the output: on SmolLM2 ARC-Easy (docs/RESULTS.md,
# "SHERL's defaults") the paper's setting ends below the pre-trained model, while the kept
# start with eight late LoRA layers matches full fine-tuning. Encoders and BART train a
# task head and keep the paper's setting.
FAMILY_DEFAULTS = {
    "paper": {"preserve_start": False, "late_layers": 1, "late_tuning": "frozen", "lr": 5e-4},
    "decoder_lm": {"preserve_start": True, "late_layers": 8, "late_tuning": "lora", "lr": 3e-3},
}
DECODER_LM_TYPES = ("opt", "llama")


def family(model_type: str | None) -> str:
    return "decoder_lm" if model_type in DECODER_LM_TYPES else "paper"


@dataclass
class SherlOptions(MethodOptions):
    late_layers: int | None = option(None, "k, the late layers that run with autograd (below the number of layers)",
                                     min=1, null="the backbone family's default")
    side_width: int | None = option(None, "d', the side module's width", min=1, null="half the hidden size")
    projection: str = option("linear", "the projection of each kept layer", choices=tuple(PROJECTIONS))
    gate_temperature: float = option(0.1, "T of the skip gate tanh(g/T) (authors: 0.1)", gt=0)
    gate_init: float = option(0.0, "the skip gate's opening tanh(g/T) at init (0 = closed, docs/DESIGN.md §2)", gt=-1, lt=1)
    preserve_start: bool | None = option(None, "keeping the pre-trained starting point (the late layers receive "
                                         "exactly h_{N-k} at init)", null="the backbone family's default")
    start_form: str = option("out_proj", "how the side correction starts at 0 (preserve_start)",
                             choices=START_FORMS)
    late_tuning: str | None = option(None, "what trains in the late layers", choices=LATE_TUNING,
                                     null="the backbone family's default")
    late_lora_r: int = option(8, "the late layers' LoRA rank (late_tuning=lora)", min=1)
    late_lora_alpha: float = option(16, "the late layers' LoRA alpha (late_tuning=lora)", gt=0)
    late_adapter_bottleneck: int = option(8, "the late adapters' width (late_tuning=adapter)", min=1)
    dropout: float | None = option(None, "dropout of the side output block and the late LoRA/adapter inputs",
                                   min=0, lt=1, null="the model's hidden dropout")
    recompute_side: bool = option(True, "recomputing the side module in backward (the late layers keep theirs)")
    gradient_checkpointing: bool = option(False, "gradient checkpointing (of the side module and the late layers)")

    @staticmethod
    def default_lr(model_type: str | None) -> float:
        """``method.lr: null``: the learning rate of the backbone family's setting."""
        return FAMILY_DEFAULTS[family(model_type)]["lr"]

    def for_model(self, config, method: str = "sherl") -> "SherlOptions":
        """These options with each None replaced by the family default of ``config``'s
        model type. A decoder LM shallower than the default k + 1 layers gets k = layers − 1."""
        defaults = FAMILY_DEFAULTS[family(getattr(config, "model_type", None))]
        chosen = {k: v for k, v in defaults.items() if k != "lr" and getattr(self, k) is None}
        if "late_layers" in chosen:
            layers = getattr(config, "num_hidden_layers", None)  # (decoder LMs: their one stack)
            if is_int(layers):
                chosen["late_layers"] = max(1, min(chosen["late_layers"], layers - 1))
        return dataclasses.replace(self, **chosen)

    def __post_init__(self):
        super().__post_init__()
        if self.preserve_start and self.gate_init != 0:
            raise ConfigError(f"method.gate_init={self.gate_init} with method.preserve_start=true (the default on "
                              "decoder LMs): the kept starting point has no gate (skip weight 1); leave gate_init "
                              "at 0, or set method.preserve_start=false")


def hidden_dropout(config) -> float:
    """The model's dropout on hidden states: BERT's ``hidden_dropout_prob``, BART/OPT's
    ``dropout``; LLaMA has none (0)."""
    for name in ("hidden_dropout_prob", "dropout"):
        p = getattr(config, name, None)
        if is_number(p):
            return float(p)
    return 0.0


@register_method("sherl", SherlOptions)
def apply_sherl(model: nn.Module, opts: SherlOptions) -> nn.Module:
    """Apply SHERL to a supported model in place; returns it."""
    model.requires_grad_(False)  # everything pre-trained is frozen ...
    arch = SPECS[supported_model_type(model, SPECS, "sherl")]
    dropout = hidden_dropout(model.config) if opts.dropout is None else opts.dropout
    backbone, side, late = install(model, arch, opts.late_layers, opts.side_width, opts.projection, dropout,
                                   float(opts.gate_temperature), opts.gradient_checkpointing)
    if opts.late_tuning == "lora":  # first: peft leaves only its adapters trainable
        add_lora(model, late, arch.lora, opts.late_lora_r, float(opts.late_lora_alpha), dropout)
    elif opts.late_tuning == "adapter":
        for layer in late:
            for m in add_adapters(layer, arch.adapters, opts.late_adapter_bottleneck, dropout):
                m.requires_grad_(True)
    if opts.preserve_start:
        side.keep_pretrained_start(opts.start_form)
    else:
        with torch.no_grad():  # g = T·atanh(opening): tanh(g/T) starts at gate_init
            side.gate.fill_(float(opts.gate_temperature) * math.atanh(float(opts.gate_init)))
    side.recompute = opts.recompute_side or opts.gradient_checkpointing
    side.requires_grad_(True)  # ... except the side module, the late LoRA/adapters ...
    unfreeze_head(model, backbone)  # ... and the task head (LM heads stay frozen)
    return model
