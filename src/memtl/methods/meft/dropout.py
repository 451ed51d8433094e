"""Dropout for MEFT's layers: torch's on GPU; on CPU, masks drawn at less than half the cost.

MEFT draws every dropout mask twice, once in the forward and again when the backward
recomputes the layer (the RNG state is replayed, so it is the same mask). On CPU,
``F.dropout`` costs ~6 ns per element at MiniLM's shapes: its ``bernoulli_`` draws one
Mersenne-Twister number per element, serially, while everything else in the step runs on
every core. Here one 31-bit draw gives two 15-bit uniforms, and the comparison and the
scaling run vectorised (MiniLM's attention probabilities, 16 × 12 × 128 × 128: 20 ms →
9 ms on this machine's 2 cores).

The drop probability is rounded to a multiple of 2⁻¹⁵ (0.1 → 0.100006) and the kept values
are scaled by the inverse of the rounded keep probability, so the layer's expectation is
unchanged. The draw is a function of the CPU generator's state alone, so the engine's RNG
replay reproduces it exactly. On CUDA, where ``F.dropout`` is one fused kernel, it is used
as is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LEVELS = 1 << 15


def drop_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A CPU bool tensor of ``shape``, each entry True (dropped) with probability round(p·2¹⁵)/2¹⁵."""
    n = math.prod(shape)
    half = (n + 1) // 2
    threshold = round(p * _LEVELS)
    bits = torch.empty(half, dtype=torch.int32).random_()  # uniform on [0, 2³¹)
    drop = torch.empty(2 * half, dtype=torch.bool)
    torch.lt(bits.bitwise_and(_LEVELS - 1), threshold, out=drop[:half])  # bits 0..14
    torch.lt(bits.bitwise_right_shift(16), threshold, out=drop[half:])  # bits 16..30
    return drop[:n].view(shape)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the cheaper CPU draw (see the module docstring)."""
    if not 0.0 <= p <= 1.0:  # as F.dropout: a negative p would otherwise scale silently
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    if p >= 1.0:
        return torch.zeros_like(x)
    threshold = round(p * _LEVELS)
    if threshold == 0:  # p < 2⁻¹⁶ rounds to no dropout at all
        return x
    # scale, then zero in place: autograd keeps only the bool mask (as F.dropout does); a
    # float × bool product would make a float copy of the mask on CPU, forward and backward
    return x.mul(_LEVELS / (_LEVELS - threshold)).masked_fill_(drop_mask(x.shape, p), 0.0)
