"""How SHERL installs itself, the same way in every architecture (docs/DESIGN.md §2).

Transformers' own forward keeps running unchanged: embeddings, attention masks (from
``attention_mask``, any attention implementation), LLaMA's rotary cos/sin, the layer loop,
BART's encoder and cross-attention, final norms, OPT-350m's ``project_out``, poolers and
heads. So ``model(input_ids, attention_mask, labels)`` works as before for every supported
model class. Hooks on the HF modules split that forward into SHERL's two routes:

- early route: the modules an architecture declares as running before its layers
  (embeddings; BART's whole encoder) and ``layers[:N-k]`` run under ``torch.no_grad()``;
  the inputs of ``layers[0 … N-k]`` are kept, detached: h_0 (the embedding output) …
  h_{N-k} (the last early layer's output);
- the first late layer's forward pre-hook replaces its hidden-states input by
  ``side([h_0 … h_{N-k}])``; the k late layers run with autograd, with the masks and
  position embeddings HF computed for the whole stack, then the rest of HF's forward.

What HF computes outside modules before layer 0 (OPT's sum of token and position
embeddings, dropout, the masks, rotary cos/sin) only sees tensors without grad, so it
records no graph either.

Why hooks rather than a copy of each layer loop: the mask, position and cache handling of
every family stays transformers' own (and right), and pre-trained state-dict keys do not
change: the side module adds ``<stack>.side.*``; ``<stack>.sherl`` (the hooks) is no module.
An architecture only declares where its parts are (``Architecture``; the table is
``architectures.py``).

- Gradient checkpointing: the side module through ``torch.utils.checkpoint``
  (``SideModule.recompute``), each late layer through transformers' per-layer switch
  (``GradientCheckpointingLayer.gradient_checkpointing``; v5 checkpoints a layer's
  ``forward``, so these hooks stay outside the recomputation).
- KV cache for inference only: with gradients the stack runs with ``use_cache=False`` (a
  cache would keep the early layers' keys and values alive through backward) and an
  explicit ``use_cache=True`` or cache raises a ConfigError; without gradients
  (``generate()``) HF's cache works as in the original model: the side module works per
  token, so each new token's features are all it needs.
- layerdrop must be 0 (a skipped layer would move the split).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from memtl.errors import ConfigError
from memtl.methods.sherl.side import SideModule, run_without_grad


@dataclass(frozen=True)
class Architecture:
    """Where SHERL splits one model type. Paths are attribute paths in the HF base model
    (``model.base_model``; "" is the base model itself), the late-tuning targets paths inside
    one layer."""

    stack: str  # the module whose forward loops over the layers that SHERL splits
    layers: str  # the stack's attribute holding those layers
    early: tuple[str, ...]  # what runs before the layers and belongs to the early route (those the model has)
    lora: tuple[str, ...]  # late_tuning=lora: peft's LoRA on these linear maps of each late layer
    adapters: tuple[str, ...]  # late_tuning=adapter: an adapter after each of these linear maps
    what: str = "layers"  # what the error messages call the layers
    check: Callable[[nn.Module], object] | None = None  # refusals of its own (raises ConfigError)


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class SherlSplit:
    """The hooks that split one HF layer stack into SHERL's early and late routes.

    Stored as ``<stack>.sherl``; ``checkpointing`` is public and switchable: during training,
    recompute the side module (each projection on its own) and each late layer in backward
    (non-reentrant ``torch.utils.checkpoint``).
    """

    def __init__(self, stack: nn.Module, layers: nn.ModuleList, num_late: int, side: SideModule,
                 checkpointing: bool):
        self.layers, self.num_late, self.side = layers, num_late, side
        self._features: list[torch.Tensor] = []
        self.checkpointing = checkpointing
        for layer in layers[: self.num_early]:
            run_without_grad(layer)
            layer.register_forward_pre_hook(self._keep, with_kwargs=True)
        layers[self.num_early].register_forward_pre_hook(self._enter_late, with_kwargs=True)
        stack.register_forward_pre_hook(self._no_cache, with_kwargs=True)

    @property
    def num_early(self) -> int:
        return len(self.layers) - self.num_late

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        self._checkpointing = self.side.recompute = bool(value)
        for layer in self.layers[self.num_early:]:
            layer.gradient_checkpointing = bool(value)
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def _keep(self, layer, args, kwargs) -> None:
        """Pre-hook of each early layer: keep its input (h_0 for the first one)."""
        if layer is self.layers[0]:
            self._features = []  # a new forward (or one left half-way by an exception)
        self._features.append(_hidden(args, kwargs).detach())

    def _enter_late(self, layer, args, kwargs):
        """Pre-hook of the first late layer: its input becomes ``side([h_0 … h_{N-k}])``."""
        features, self._features = [*self._features, _hidden(args, kwargs).detach()], []
        if len(features) != self.num_early + 1:
            raise RuntimeError(f"SHERL: expected {self.num_early} early layers to run before the late ones, "
                               f"saw {len(features) - 1}")
        x = self.side(features)
        del features  # from here on only autograd's saved tensors hold them
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def _no_cache(self, stack, args, kwargs):
        """Pre-hook of the stack: a KV cache only without gradients (generation); in training
        it would keep the early layers' keys and values alive (``use_cache=None`` would mean
        the config's: it becomes False)."""
        if kwargs.get("use_cache") or any(kwargs.get(k) is not None for k in ("past_key_values", "cache")):
            if not torch.is_grad_enabled():
                return args, kwargs  # generate(): the side module works per token, the late layers read the cache
            raise ConfigError("method=sherl: a KV cache is for inference only (in training it would keep the early "
                              "layers' keys and values alive): call it under torch.no_grad() (as generate() does) "
                              "or with use_cache=False")
        return args, {**kwargs, "use_cache": False}


def _at(root: nn.Module, path: str):
    """The attribute at dotted ``path`` under ``root`` (``root`` for ""), or None."""
    for name in filter(None, path.split(".")):
        root = getattr(root, name, None)
    return root


def install(model: nn.Module, arch: Architecture, late_layers: int, side_width: int | None, projection: str,
            dropout: float, temperature: float, checkpointing: bool) -> tuple[nn.Module, SideModule, list[nn.Module]]:
    """Split ``model``'s layer stack as ``arch`` says: the early modules and ``layers[:N-k]``
    without grad, the side module as ``<stack>.side``, ``layers[N-k:]`` with autograd.
    Returns (HF base model, side module, late layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # (heavy: on first use)

    config, name = model.config, type(model).__name__
    backbone = model.base_model  # the model itself when bare
    stack = _at(backbone, arch.stack)
    if isinstance(getattr(stack, "sherl", None), SherlSplit):
        raise ConfigError(f"method=sherl: {name} already has SHERL applied; "
                          "apply a method once, to a fresh pre-trained model")
    if arch.check is not None:
        arch.check(model)
    layers = getattr(stack, arch.layers, None)
    if not isinstance(stack, nn.Module) or not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"method=sherl: {name} has no layer stack where SHERL expects it (the transformers v5 "
                          f"{config.model_type} layout); choose a supported backbone")
    n = len(layers)
    if late_layers >= n:
        raise ConfigError(f"method.late_layers={late_layers}: {name} has {n} {arch.what} and SHERL "
                          f"needs at least one early layer; choose 1..{n - 1}")
    if not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        raise ConfigError(f"method=sherl: {name}'s layers are not transformers GradientCheckpointingLayers; "
                          f"SHERL supports {config.model_type} as in transformers v5")
    if getattr(stack, "layerdrop", 0.0) > 0:
        raise ConfigError(f"method=sherl: {name} has layerdrop={stack.layerdrop}, which skips "
                          "layers at random and would move SHERL's early/late split; set the config's layerdrop to 0")
    dim = config.hidden_size
    side_dim = dim // 2 if side_width is None else side_width
    if side_dim < 1:
        raise ConfigError(f"method.side_width=null: hidden size {dim} is too small to halve; set method.side_width")
    ref = next(layers[0].parameters())  # new modules follow the model's dtype and device
    side = SideModule(
        num_features=n - late_layers + 1, dim=dim, side_dim=side_dim, projection=projection, dropout=dropout,
        temperature=temperature, layer_norm_eps=getattr(config, "layer_norm_eps", 1e-5),
        dtype=ref.dtype, device=ref.device,
    )
    stack.side = side
    early = {id(m): m for path in arch.early if isinstance(m := _at(backbone, path), nn.Module)}
    for m in early.values():  # (one module reached by two paths gets its hooks once)
        run_without_grad(m)
    stack.sherl = SherlSplit(stack, layers, late_layers, side, checkpointing)
    return backbone, side, list(layers[n - late_layers:])
