"""The reversible engine: one ``autograd.Function`` over a stack of two-stream layers.

A layer is anything with ``f(x, *context)``, ``g(x, *context)``, ``lam``, ``beta``,
``switch`` and ``parameters()`` (an ``nn.Module``); the engine knows nothing about the
architecture. One layer (DESIGN §1.1):

    y1 = lam·x1 + F(x2)          x2 = (y2 − G(y1)) / beta
    y2 = beta·x2 + G(y1)         x1 = (y1 − F(x2)) / lam

and passes ``(y2, y1)`` on when ``switch`` else ``(y1, y2)``.

``reversible_stack`` runs the first ``num_rev`` layers through ``_ReversibleStack``:
forward under ``no_grad`` keeping only the final two streams; backward walks the layers
top-down, reconstructing each layer's inputs from its outputs and recomputing F and G
with grad enabled, one layer at a time. Peak activation memory is then one layer's
recompute graph plus the streams, whatever the depth. The remaining layers run with
plain autograd. Without grad (eval, ``torch.no_grad``) every layer is a plain forward.

Context (``f(x, *context)``): per-stack extras every layer reads, e.g. attention masks,
or a decoder's encoder output read through cross-attention. Context tensors that require
grad become inputs of the Function: its backward recomputes F and G with them as leaves
and returns their gradient summed over every layer of the segment (autograd then sums
over segments and the plain layers), so whatever produced them (the encoder and its
adapters) trains as under plain autograd.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor


# --- RNG and autocast state: the recompute must replay exactly what the forward did ----


class RNGState:
    """CPU (and, for CUDA tensors, CUDA) generator state at one point of the forward."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        # fork: the recompute must neither see nor advance the caller's RNG streams
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class AutocastState:
    """Autocast settings at forward time, replayed around the recompute in backward
    (which usually runs outside the caller's ``autocast`` block)."""

    def __init__(self, device: torch.device):
        types = ["cpu"] if device.type == "cpu" else ["cpu", device.type]
        self.states = [
            dict(device_type=t, enabled=torch.is_autocast_enabled(t), dtype=torch.get_autocast_dtype(t))
            for t in types
        ]
        self.cache_enabled = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for s in self.states:
                stack.enter_context(torch.autocast(cache_enabled=self.cache_enabled, **s))
            yield


# --- one layer, forward and inverse ----------------------------------------------------


def _maybe_rng(state: RNGState | None):
    return state.restored() if state is not None else contextlib.nullcontext()


def _cast(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x if dtype is None else x.to(dtype)


def layer_forward(layer: nn.Module, x1: Tensor, x2: Tensor, context: Sequence[Any] = (),
                  record_rng: bool = False, compute_dtype: torch.dtype | None = None):
    """Forward of one layer. With ``record_rng`` also returns the RNG states before F
    and before G, so that an inverse/recompute can draw the same dropout masks.
    ``compute_dtype``: the dtype F and G run in when the streams are kept in another
    (higher) precision; None = the streams' own dtype."""
    rng_f = RNGState(x2.device) if record_rng else None
    y1 = layer.lam * x1 + layer.f(_cast(x2, compute_dtype), *context)
    rng_g = RNGState(y1.device) if record_rng else None
    y2 = layer.beta * x2 + layer.g(_cast(y1, compute_dtype), *context)
    out = (y2, y1) if layer.switch else (y1, y2)
    return (out, (rng_f, rng_g)) if record_rng else out


def layer_inverse(layer: nn.Module, o1: Tensor, o2: Tensor, context: Sequence[Any] = (),
                  rng: tuple[RNGState | None, RNGState | None] = (None, None),
                  compute_dtype: torch.dtype | None = None):
    """Reconstruct a layer's inputs ``(x1, x2)`` from its outputs (no grad)."""
    y1, y2 = (o2, o1) if layer.switch else (o1, o2)
    with torch.no_grad():
        with _maybe_rng(rng[1]):
            x2 = (y2 - layer.g(_cast(y1, compute_dtype), *context)) / layer.beta
        with _maybe_rng(rng[0]):
            x1 = (y1 - layer.f(_cast(x2, compute_dtype), *context)) / layer.lam
    return x1, x2


def trainable_parameters(layers: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


# --- the reversible stack ----------------------------------------------------------------


class _ReversibleStack(torch.autograd.Function):
    """inputs: x1, x2, layers, context, diff_pos, compute_dtype, *diff_context, *params.

    ``diff_context`` are the context entries at positions ``diff_pos`` that require grad
    (e.g. a decoder's encoder output); ``params`` the layers' trainable parameters. Both
    are inputs so that (a) backward runs even when x1/x2 do not require grad (frozen
    embeddings), and (b) their grads flow back through autograd's normal accumulation
    (``.grad``, hooks, DDP, the encoder's graph) rather than being written by hand.
    """

    @staticmethod
    def forward(ctx, x1, x2, layers, context, diff_pos, compute_dtype, *tensors):
        # Function.forward already runs without grad: nothing below is recorded
        diff_context, params = tensors[:len(diff_pos)], tensors[len(diff_pos):]
        ctx.layers = layers
        # differentiable context goes through save_for_backward (version checks), the rest as is
        ctx.context = tuple(None if i in diff_pos else c for i, c in enumerate(context))
        ctx.diff_pos = diff_pos
        ctx.compute_dtype = compute_dtype
        ctx.autocast = AutocastState(x1.device)
        ctx.rng = []
        for layer in layers:
            (x1, x2), rng = layer_forward(layer, x1, x2, context, record_rng=True, compute_dtype=compute_dtype)
            ctx.rng.append(rng)
        # the only activations kept: the final two streams (the context is the caller's anyway)
        ctx.save_for_backward(x1, x2, *diff_context)
        ctx.param_index = {id(p): i for i, p in enumerate(params)}
        return x1, x2

    @staticmethod
    @once_differentiable
    def backward(ctx, do1, do2):
        o1, o2, *diff_context = ctx.saved_tensors
        cdt = ctx.compute_dtype
        grads: list[Tensor | None] = [None] * len(ctx.param_index)
        # differentiable context as leaves shared by every layer's recompute; each
        # autograd.grad call below returns one F or G's share of their gradient
        leaves = [c.detach().requires_grad_(True) for c in diff_context]
        context = list(ctx.context)
        for i, leaf in zip(ctx.diff_pos, leaves):
            context[i] = leaf
        context = tuple(context)
        ctx_grads: list[Tensor | None] = [None] * len(leaves)
        n_ctx = len(leaves)

        def add_ctx_grads(parts):
            for i, part in enumerate(parts):
                if part is not None:
                    ctx_grads[i] = part if ctx_grads[i] is None else ctx_grads[i] + part  # part may alias dy: no add_
        # streams flowing into no further op get no grad: treat as zero
        do1 = torch.zeros_like(o1) if do1 is None else do1
        do2 = torch.zeros_like(o2) if do2 is None else do2

        # the bottom layer's input grads are wasted work when the stack's inputs need none
        # (frozen embeddings): skipping them spares F's backward below its first adapter
        inputs_need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        bottom = ctx.layers[0]
        in_dtypes = (o1.dtype, o2.dtype)
        for layer, (rng_f, rng_g) in zip(reversed(ctx.layers), reversed(ctx.rng)):
            y1, y2, dy1, dy2 = (o2, o1, do2, do1) if layer.switch else (o1, o2, do1, do2)
            # drop the loop's references: each stream-sized tensor is freed as soon as this
            # layer is done with it (the peak is one recompute graph plus these streams)
            o1 = o2 = do1 = do2 = None
            need_dx = inputs_need_grad or layer is not bottom
            # the parameters that were trainable at forward time (the Function's inputs)
            params = [p for p in layer.parameters() if id(p) in ctx.param_index]

            # 1. recompute g = G(y1) with grad; backprop dy2 into G's params and y1
            y1_in = _cast(y1, cdt).detach().requires_grad_(True)
            with torch.enable_grad(), ctx.autocast.replayed(), rng_g.restored():
                g = layer.g(y1_in, *context)
            gy1, *g_grads = torch.autograd.grad(g, [y1_in, *leaves, *params], dy2.to(g.dtype), allow_unused=True)
            add_ctx_grads(g_grads[:n_ctx])
            g_grads = g_grads[n_ctx:]
            del y1_in
            dy1 = dy1 + gy1 if gy1 is not None else dy1
            del gy1
            # 2. reconstruct x2 (y2 is not needed after this)
            with torch.no_grad():
                x2 = torch.sub(y2, g).div_(layer.beta)
            del g, y2

            # 3. recompute f = F(x2) with grad; backprop dy1 into F's params and x2
            x2_in = _cast(x2, cdt).detach().requires_grad_(need_dx)
            with torch.enable_grad(), ctx.autocast.replayed(), rng_f.restored():
                f = layer.f(x2_in, *context)
            wrt = [x2_in, *leaves, *params] if need_dx else [*leaves, *params]
            f_grads = (list(torch.autograd.grad(f, wrt, dy1.to(f.dtype), allow_unused=True))
                       if f.requires_grad else [None] * len(wrt))
            gx2 = f_grads.pop(0) if need_dx else None
            add_ctx_grads(f_grads[:n_ctx])
            f_grads = f_grads[n_ctx:]
            del x2_in, wrt
            # 4. reconstruct x1
            with torch.no_grad():
                x1 = torch.sub(y1, f).div_(layer.lam)
            del f, y1

            # 5. input grads (in place into the fresh gx2 where the dtypes allow)
            dx1 = layer.lam * dy1
            del dy1
            if gx2 is None:
                dx2 = layer.beta * dy2
            elif gx2.dtype == dy2.dtype:
                dx2 = gx2.add_(dy2, alpha=layer.beta)
            else:
                dx2 = layer.beta * dy2 + gx2
            del gx2, dy2

            for p, gf, gg in zip(params, f_grads, g_grads):
                for part in (gf, gg):
                    if part is None:
                        continue
                    i = ctx.param_index[id(p)]
                    grads[i] = part if grads[i] is None else grads[i] + part
            del f_grads, g_grads
            o1, o2, do1, do2 = x1, x2, dx1, dx2
            del x1, x2, dx1, dx2

        # grads must match each input's dtype (autocast may leave the streams' grads in bf16)
        dx1 = do1.to(in_dtypes[0]) if ctx.needs_input_grad[0] else None
        dx2 = do2.to(in_dtypes[1]) if ctx.needs_input_grad[1] else None
        return (dx1, dx2, None, None, None, None, *ctx_grads, *grads)


def reversible_stack(x1: Tensor, x2: Tensor, layers: Sequence[nn.Module], context: Sequence[Any] = (),
                     num_rev: int | None = None, stream_dtype: torch.dtype | None = None,
                     anchor_every: int | None = None) -> tuple[Tensor, Tensor]:
    """Run ``layers`` on the two streams; the first ``num_rev`` (None: all) with the
    reversible backward, the rest with plain autograd. Returns the final streams.

    ``anchor_every`` = k splits the reversible layers into segments of k, each its own
    ``_ReversibleStack``: each keeps its exact output streams, so reconstruction restarts
    from exact values every k layers and rounding error grows over k layers, not the
    whole depth - for two streams of memory per segment (None: one segment, the paper).

    ``stream_dtype`` (e.g. float64) keeps the two streams in a higher precision than F
    and G compute in. The inverse divides by lam (and beta) at every layer, so rounding
    errors of the streams grow ~1/lam per layer going down; wider streams start them far
    smaller. They do not vanish: F and G still see the streams rounded to the compute
    dtype, and where a reconstructed value rounds to the neighbouring number (values on a
    rounding tie are common: streams are sums of compute-dtype numbers) that 1-ulp
    difference is amplified like any other error. Measured on MiniLM (6 layers, fp32):
    reversible gradients' error 1.5e-2 → 1.8e-4 (MEFT1), 1.1e-1 → 1e-2 (MEFT2).
    """
    compute_dtype = None
    if stream_dtype is not None and stream_dtype != x1.dtype:
        compute_dtype = x1.dtype
        x1, x2 = x1.to(stream_dtype), x2.to(stream_dtype)
    layers = list(layers)
    num_rev = len(layers) if num_rev is None else num_rev
    rev, plain = layers[:num_rev], layers[num_rev:]
    context = tuple(context)
    # context tensors the backward must return a gradient for (e.g. a decoder's encoder output)
    diff_pos = tuple(i for i, c in enumerate(context) if isinstance(c, Tensor) and c.requires_grad)
    diff_context = [context[i] for i in diff_pos]

    if rev and torch.is_grad_enabled() and (trainable_parameters(rev) or x1.requires_grad or x2.requires_grad
                                            or diff_pos):
        k = anchor_every or len(rev)
        for start in range(0, len(rev), k):
            segment = rev[start:start + k]
            x1, x2 = _ReversibleStack.apply(x1, x2, segment, context, diff_pos, compute_dtype,
                                            *diff_context, *trainable_parameters(segment))
    else:  # no grad (eval), or nothing to differentiate: a plain forward records nothing either
        plain = layers
    for layer in plain:
        x1, x2 = layer_forward(layer, x1, x2, context, compute_dtype=compute_dtype)
    return x1, x2
