"""How MEFT installs itself, the same way in every architecture.

Each Hugging Face module that owns a layer loop (``BertEncoder``/``RobertaEncoder``,
``BartEncoder`` and ``BartDecoder``, ``OPTDecoder``, ``LlamaModel``) stays where it is, with
its embeddings, norms and state-dict keys. Its layers become MEFT layers that take over the
HF layers' sub-modules under their names (``adapters.MeftLayer``), and its class is switched
in place to a subclass (``MeftStack`` + the HF class) whose ``forward`` does what HF's does
but runs the layers as one reversible stack (``engine.run_stack``). An architecture only
declares which modules those are, what they become, and three numbers of its config
(``Architecture``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from memtl.errors import ConfigError
from memtl.methods.meft.adapters import Adapter, MeftLayer, Variant
from memtl.methods.meft.engine import run_stack

if TYPE_CHECKING:
    from memtl.methods.meft import MeftOptions


class MeftStack:
    """Mixin of a HF module that owns a layer loop once MEFT is installed in it."""

    label: str  # names the stack in errors and reports: encoder | decoder
    layers_attr = "layers"  # the attribute holding HF's layer list (BERT's: ``layer``)
    # set by install; public: tests and experiments may switch them (num_rev_layers=0: plain
    # autograd through the same maths)
    num_rev_layers: int
    inverse: str
    streams: str = "two"  # "one": the adapters on the plain forward (MeftOptions.streams)
    output_stream: int | None = None  # None: the streams' average; 0/1: that stream (MeftOptions.output)
    recorded: list | None = None  # see engine.run_stack

    def run_layers(self, h: torch.Tensor, *context) -> torch.Tensor:
        """Both streams start from ``h``; their average comes back. ``context`` is what every
        layer's F and G read besides their input (masks, rotary embeddings, encoder output)."""
        return run_stack(self, h, stack_layers(self), context, self.label)


def stack_layers(stack: MeftStack) -> nn.ModuleList:
    """A stack's MEFT layers."""
    return getattr(stack, stack.layers_attr)


@dataclass(frozen=True)
class Architecture:
    """What ``install`` needs to know about one model type."""

    # (model, method name) -> the HF base model; raises ConfigError for a model MEFT cannot take
    backbone: Callable[[nn.Module, str], nn.Module]
    # each module owning a layer loop (its path in the base model, "" for the base model
    # itself) -> the MeftStack subclass it becomes; in forward order
    stacks: dict[str, type[MeftStack]]
    layer: type[MeftLayer]  # what each HF layer becomes
    layernorm_eps: Callable[[Any], float]  # config -> eps of the F/G adapter's LayerNorm (adapter_layernorm)
    dropout: Callable[[Any], float]  # config -> adapter dropout when method.adapter_dropout is null


def install(model: nn.Module, arch: Architecture, variant: Variant, opts: MeftOptions) -> nn.Module:
    """Make every layer loop of ``model`` a MEFT stack, in place; returns the HF base model.
    ``opts.lam``/``opts.beta`` are numbers (``MeftOptions.for_model`` resolved them)."""
    if any(isinstance(m, MeftStack) for m in model.modules()):
        raise ConfigError(f"method={variant.name}: {type(model).__name__} already has MEFT applied; "
                          "apply a method once, to a fresh pre-trained model")
    backbone = arch.backbone(model, variant.name)
    stacks = [(backbone.get_submodule(path), cls) for path, cls in arch.stacks.items()]
    depths = [len(getattr(owner, cls.layers_attr)) for owner, cls in stacks]
    k = opts.num_rev_layers
    if k is not None and k > max(depths):
        several = len(stacks) > 1
        counts = " and ".join(f"{n} {cls.label}" for n, (_, cls) in zip(depths, stacks)) if several else depths[0]
        raise ConfigError(f"method.num_rev_layers={k}: {type(model).__name__} has {counts} layers"
                          f"{' (k applies to each stack)' if several else ''}; choose 0..{max(depths)}, "
                          "or null for all")

    config = model.config
    owner, cls = stacks[0]
    ref = next(getattr(owner, cls.layers_attr)[0].parameters())  # new modules follow the model's dtype and device
    kw = dict(dim=config.hidden_size, bottleneck=opts.bottleneck, activation=opts.adapter_activation, init=opts.adapter_init,
              dropout=arch.dropout(config) if opts.adapter_dropout is None else opts.adapter_dropout,
              layernorm_eps=arch.layernorm_eps(config), dtype=ref.dtype, device=ref.device)
    for (owner, cls), n in zip(stacks, depths):
        layers = [arch.layer(layer, variant, opts.lam, opts.beta, make_adapter=lambda: Adapter(**kw),
                             make_rev_adapter=lambda: Adapter(layernorm=opts.adapter_layernorm, **kw))
                  for layer in getattr(owner, cls.layers_attr)]
        setattr(owner, cls.layers_attr, nn.ModuleList(layers))
        owner.__class__ = cls  # same object, sub-modules and keys; only forward changes
        # the first k layers of each stack; a shallower stack (BART's encoder or decoder): all of it
        owner.num_rev_layers = 0 if opts.streams == "one" else n if k is None else min(k, n)
        owner.inverse, owner.streams = opts.inverse, opts.streams
        owner.output_stream = variant.chain if opts.output == "chain" else None
    return backbone
