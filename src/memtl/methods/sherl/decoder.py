"""SHERL on decoder stacks: OPT (pre-LayerNorm, and the post-LayerNorm OPT-350m form with its
``project_in``/``project_out``) and the LLaMA family (pre-RMSNorm, rotary position embeddings).
BART's decoder reuses ``attach`` (``bart.py``).

Transformers' own forward keeps running unchanged: token and position embeddings, the causal
mask (from ``attention_mask``, any attention implementation), LLaMA's rotary cos/sin, the
layer loop, the final norm (OPT ``final_layer_norm`` / LLaMA ``norm``), OPT-350m's
``project_out`` and the heads. So ``model(input_ids, attention_mask, labels)`` works as
before for ``*Model``, ``*ForCausalLM`` and ``*ForSequenceClassification``. Hooks on the HF
modules split that forward into SHERL's two routes (docs/DESIGN.md §2):

- early route: the embedding modules and ``layers[:N-k]`` run under ``torch.no_grad()``;
  the inputs of ``layers[0 … N-k]`` are kept, detached: h_0 (the embedding output) …
  h_{N-k} (the last early layer's output);
- the first late layer's forward pre-hook replaces its hidden-states input by
  ``side([h_0 … h_{N-k}])``; the k late layers run with autograd, with the causal mask and
  position embeddings HF computed for the whole stack, then the final norm and the head.

What HF computes outside modules before layer 0 (OPT's sum of token and position
embeddings, dropout, the mask, rotary cos/sin) only sees tensors without grad, so it
records no graph either.

Why hooks rather than a copy of the layer loop: the mask, position and cache handling of
three model families stays transformers' own (and right), and pre-trained state-dict keys
do not change (the side module adds ``<stack>.side.*``).

- Gradient checkpointing: the side module through ``torch.utils.checkpoint`` in the hook,
  each late layer through transformers' per-layer switch
  (``GradientCheckpointingLayer.gradient_checkpointing``; v5 checkpoints a layer's
  ``forward``, so these hooks stay outside the recomputation).
- KV cache for inference only: with gradients on the stack runs with ``use_cache=False`` (a
  cache would keep the early layers' keys and values alive through backward) and an
  explicit ``use_cache=True`` or cache raises a ConfigError; without gradients
  (``generate()``) HF's cache works as in the original model: the side module works per
  token, so each new token's features are all it needs.
- layerdrop must be 0 (a skipped layer would move the split).
- LM heads stay frozen: OPT ties its head to the input embeddings (early route); LLaMA's
  (untied, vocabulary x hidden) is kept frozen alike, so a causal LM trains the side module
  (+ late LoRA/adapters) only.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from memtl.errors import ConfigError
from memtl.methods.sherl.side import SideModule, run_without_grad

#: the modules of a decoder stack that compute its embedding output h_0 (those present)
EMBEDDINGS = ("embed_tokens", "embed_positions", "project_in", "layernorm_embedding")


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class SherlSplit:
    """The hooks that split one HF layer stack into SHERL's early and late routes.

    Stored as ``<stack>.sherl``; ``checkpointing`` is public and switchable (as
    ``SherlEncoder.checkpointing``).
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


def embedding_modules(stack: nn.Module) -> list[nn.Module]:
    """The modules of ``stack`` that compute h_0 (the others are the layers and the final norm)."""
    return [m for name in EMBEDDINGS if isinstance(m := getattr(stack, name, None), nn.Module)]


def attach(model: nn.Module, stack: nn.Module, layers: nn.ModuleList, early: list[nn.Module], late_layers: int,
           side_width: int | None, projection: str, dropout: float, temperature: float, checkpointing: bool,
           what: str = "layers") -> tuple[SideModule, list[nn.Module]]:
    """Split ``stack`` (whose forward loops over ``layers``) into SHERL's routes: ``early``
    modules (embeddings, ...) and ``layers[:N-k]`` without grad, the side module as
    ``stack.side``, ``layers[N-k:]`` with autograd. Returns (side module, late layers)."""
    config = model.config
    if isinstance(getattr(stack, "sherl", None), SherlSplit):
        raise ConfigError(f"method=sherl: {type(model).__name__} already has SHERL applied; "
                          "apply a method once, to a fresh pre-trained model")
    n = len(layers)
    if late_layers >= n:
        raise ConfigError(f"method.late_layers={late_layers}: {type(model).__name__} has {n} {what} and SHERL "
                          f"needs at least one early layer; choose 1..{n - 1}")
    if not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        raise ConfigError(f"method=sherl: {type(model).__name__}'s layers are not transformers "
                          "GradientCheckpointingLayers; SHERL supports bart, opt, llama decoders as in transformers v5")
    if getattr(stack, "layerdrop", 0.0) > 0:
        raise ConfigError(f"method=sherl: {type(model).__name__} has layerdrop={stack.layerdrop}, which skips "
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
    for m in early:
        run_without_grad(m)
    stack.sherl = SherlSplit(stack, layers, late_layers, side, checkpointing)
    return side, list(layers[n - late_layers:])


def install(model: nn.Module, late_layers: int, side_width: int | None, projection: str, dropout: float,
            temperature: float, checkpointing: bool) -> tuple[nn.Module, SideModule, list[nn.Module]]:
    """SHERL in an OPT or LLaMA model (bare, causal LM or sequence classification);
    returns (backbone, side module, late layers)."""
    backbone = model.base_model  # OPTModel / LlamaModel (the model itself when bare)
    stack = getattr(backbone, "decoder", backbone)  # OPTDecoder; LlamaModel holds its layers itself
    layers = getattr(stack, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"method=sherl: {type(model).__name__} has no decoder layer stack where SHERL expects "
                          "it (transformers v5 OPT/LLaMA layout); choose a supported backbone")
    side, late = attach(model, stack, layers, embedding_modules(stack), late_layers, side_width, projection,
                        dropout, temperature, checkpointing)
    return backbone, side, late
