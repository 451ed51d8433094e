"""Adapters and the three MEFT variants, independent of any architecture.

A MEFT layer works on two streams and needs two functions, F and G (see ``engine.py``).
Which pre-trained block plays F and which plays G is what distinguishes the variants
(docs/DESIGN.md §1.3); ``MeftLayer`` sets that up and adds the adapters, so an
architecture's layer only takes over its HF sub-modules and provides two blocks
(``attention_block``, ``feed_forward_block``; ``whole_layer`` is one after the other).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from memtl.errors import ConfigError

# activations an adapter may use (names as in Hydra configs)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,  # a linear adapter: a rank-r update, like LoRA's
}

# how an adapter's two layers start (names as in Hydra configs)
INITS = {
    "normal": "both layers N(0, 0.02²), the paper's",
    "zero": "the up-projection at 0, like LoRA's B: the adapters add exactly 0 at init",
}


class Adapter(nn.Module):
    """``[LayerNorm →] Linear(d→r) → act → dropout → Linear(r→d)``, starting at or near zero.

    ``init="normal"``: weights ~ N(0, 0.02²) and zero biases, so at init the adapter's output
    is small. ``init="zero"``: the down-projection as before, the up-projection all zeros, so
    the output is exactly 0 and the up-projection's gradient is not (LoRA's B = 0).
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        activation: str = "relu",
        dropout: float = 0.0,
        layernorm: bool = False,
        layernorm_eps: float = 1e-12,
        init: str = "normal",
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"method.adapter_activation={activation!r}: choose one of {', '.join(sorted(ACTIVATIONS))}"
            )
        if init not in INITS:
            raise ConfigError(f"method.adapter_init={init!r}: choose one of {', '.join(sorted(INITS))}")
        kw = {"dtype": dtype, "device": device}
        self.layer_norm = nn.LayerNorm(dim, eps=layernorm_eps, **kw) if layernorm else None
        self.down = nn.Linear(dim, bottleneck, **kw)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim, **kw)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)
            nn.init.zeros_(lin.bias)
        if init == "zero":
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.up(self.dropout(self.act(self.down(x))))


@dataclass(frozen=True)
class Variant:
    name: str
    f: str  # which callable plays F: "whole_layer" | "adapter" | "attention_block"
    g: str  # which callable plays G: "adapter" | "whole_layer" | "feed_forward_block"
    lam: float  # default scale of x1 (the paper's, for post-norm encoders)
    beta: float  # default scale of x2
    switch: bool  # pass (y2, y1) on instead of (y1, y2)
    attn_adapter: bool  # an adapter on the attention output projection (MEFT3)
    rev_adapter: bool  # a stand-alone adapter that plays F or G (MEFT1/2)
    # which of a layer's passed-on streams holds the pre-trained layer's output (0: x1, 1: x2):
    # MEFT1's y1 = λx1 + layer(x2) and MEFT2's y2 = βx2 + layer(y1), each after the switch; MEFT3's
    # y2 = βx2 + G(y1), the whole block. method.output=chain returns that stream of the last layer
    chain: int
    # defaults for pre-norm decoders (OPT's pre-LN form, LLaMA), whose F/G hold the residual:
    # λ·x re-adds the residual stream at every layer, so the paper's 0.1 moves a deep model far
    # from its pre-trained function. Chosen on SmolLM2-135M's zero-shot ARC-Easy dev accuracy
    # at init (pre-trained 43.5; docs/RESULTS.md): MEFT1 λ 0.1/0.01/0.001 -> 28.1/42.5/42.6,
    # MEFT2 β -> 28.8/41.9/40.9, MEFT3 λ = β -> 26.1/41.8/44.0; the smaller factor only where
    # it helps, as it costs log2(1/λ) bits of remainder per element and layer
    decoder_lam: float = 1.0
    decoder_beta: float = 1.0

    @property
    def chain_skips_last_g(self) -> bool:
        """Whether the chain stream is y1 = λx1 + F(x2) (MEFT1's), which the last layer's G
        does not reach: under method.output=chain that G's adapter can get no gradient."""
        return self.g == "adapter" and self.chain == (1 if self.switch else 0)


VARIANTS: dict[str, Variant] = {
    "meft1": Variant("meft1", f="whole_layer", g="adapter", lam=0.1, beta=1.0, switch=True,
                     attn_adapter=False, rev_adapter=True, chain=1, decoder_lam=0.01),
    "meft2": Variant("meft2", f="adapter", g="whole_layer", lam=1.0, beta=0.1, switch=True,
                     attn_adapter=False, rev_adapter=True, chain=0, decoder_beta=0.01),
    "meft3": Variant("meft3", f="attention_block", g="feed_forward_block", lam=0.1, beta=0.1, switch=False,
                     attn_adapter=True, rev_adapter=False, chain=1, decoder_lam=0.001, decoder_beta=0.001),
}


class MeftLayer(nn.Module):
    """Base class of an architecture's reversible layer: the variant's set-up (λ, β, switch,
    adapters) and ``f``/``g`` for the engine.

    A subclass takes over the HF layer's sub-modules in ``take_over`` (under their original
    names, so pre-trained state-dict keys are unchanged) and implements
    ``attention_block(x, *context)`` and ``feed_forward_block(h)`` with the adapters inside:
    ``ffn_adapter`` parallel to the feed-forward block, ``attn_adapter`` (MEFT3) on the
    attention output projection. ``f``/``g`` pass the stack's context (the attention mask; for
    a decoder also the encoder output and its mask) on to the blocks that read it.
    """

    def __init__(self, hf_layer: nn.Module, variant: Variant, lam: float, beta: float,
                 make_adapter: Callable[[], Adapter], make_rev_adapter: Callable[[], Adapter]):
        super().__init__()
        self.take_over(hf_layer)  # first: the pre-trained modules keep their place in the state dict
        self.variant, self.lam, self.beta, self.switch = variant, lam, beta, variant.switch
        self.ffn_adapter = make_adapter()  # every variant
        self.attn_adapter = make_adapter() if variant.attn_adapter else None  # MEFT3
        self.rev_adapter = make_rev_adapter() if variant.rev_adapter else None  # MEFT1's G / MEFT2's F

    def take_over(self, hf_layer: nn.Module) -> None:
        raise NotImplementedError

    def whole_layer(self, x: torch.Tensor, *context) -> torch.Tensor:
        return self.feed_forward_block(self.attention_block(x, *context))

    def _call(self, role: str, x: torch.Tensor, *context) -> torch.Tensor:
        if role == "adapter":
            return self.rev_adapter(x)
        if role == "feed_forward_block":
            return self.feed_forward_block(x)
        return getattr(self, role)(x, *context)

    def f(self, x: torch.Tensor, *context) -> torch.Tensor:
        return self._call(self.variant.f, x, *context)

    def g(self, x: torch.Tensor, *context) -> torch.Tensor:
        return self._call(self.variant.g, x, *context)

    def adapter_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, Adapter)]
