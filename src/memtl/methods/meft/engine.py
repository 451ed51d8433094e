"""The reversible engine: one ``autograd.Function`` over a stack of two-stream layers.

A layer is anything with ``f(x, *context)``, ``g(x, *context)``, ``lam``, ``beta``,
``switch`` and ``parameters()`` (an ``nn.Module``); the engine knows nothing about the
architecture. One layer (docs/DESIGN.md §1.1):

    y1 = lam·x1 + F(x2)          x2 = (y2 − G(y1)) / beta
    y2 = beta·x2 + G(y1)         x1 = (y1 − F(x2)) / lam

and passes ``(y2, y1)`` on when ``switch`` else ``(y1, y2)``.

``reversible_stack`` runs the first ``num_rev`` layers through ``_ReversibleStack``:
forward under ``no_grad`` keeping only the final two streams; backward walks the layers
top-down, reconstructing each layer's inputs from its outputs and recomputing F and G
with grad enabled, one layer at a time. Peak activation memory is then one layer's
recompute graph plus the streams, whatever the depth. The remaining layers run with
plain autograd. Without grad (eval, ``torch.no_grad``) every layer is a plain forward.

Two arithmetics for the reversible layers (``inverse``):

- ``"exact"`` (docs/DESIGN.md §1.7): the streams are int64 fixed point, value = n·2⁻³², so adding
  F's output (rounded to that grid) is exact, and multiplying by lam = p/q keeps the
  remainder of the division by q in a per-stack buffer (``RemainderStack``, packed in
  mixed radix: log2(q) bits per element per layer). The inverse recovers the forward's
  streams bit for bit at any depth and in any compute precision, provided F and G
  recompute bit for bit (same inputs, RNG state, autocast). The backward treats the
  rounding to the grid as the identity, so gradients are plain autograd's up to the
  compute dtype's own rounding. A value outside the grid's range raises
  ``FixedPointOverflow`` naming the layer; it never wraps.
- ``"float"``: the paper's arithmetic in the model's dtype; the inverse divides by lam
  and beta, so rounding error grows ~1/lam per layer going down.

Context (``f(x, *context)``): per-stack extras every layer reads, e.g. attention masks,
or a decoder's encoder output read through cross-attention. Context tensors that require
grad become inputs of the Function: its backward recomputes F and G with them as leaves
and returns their gradient summed over every layer (autograd then sums over the
reversible and the plain layers), so whatever produced them (the encoder and its
adapters) trains as under plain autograd.
"""
from __future__ import annotations

import contextlib
import functools
import math
from fractions import Fraction
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

from memtl.errors import ConfigError, RunError

Tensor = torch.Tensor

INVERSES = ("exact", "float")
# fixed point: value = n · 2^-bits, with the grid below the compute dtype's own rounding at
# ordinary magnitudes: 2^-32 = 2.3e-10 for float32/bf16 (range ±2.7e8), 2^-50 = 8.9e-16 for
# float64 (range ±1024; float64 serves the tests' oracles)
FRAC_BITS = {torch.float64: 50}
DEFAULT_FRAC_BITS = 32
MAX_DENOMINATOR = 1 << 16


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


def _maybe_rng(state: RNGState | None):
    return state.restored() if state is not None else contextlib.nullcontext()


# --- exact arithmetic: fixed-point streams and the remainders of the scalings ------------


def _has_values(t: Tensor) -> bool:
    """False for a fake tensor (shape and dtype only: ``memtl estimate`` runs the real model on
    them). The three reads of values below then take their usual branch without reading: the
    int16 residual, no overflow, an exact reconstruction; every tensor is still computed, so
    the memory is the same."""
    return not is_fake(t)


class FixedPointOverflow(RunError):
    """A stream or an F/G output left the fixed-point range (or was not finite)."""


@functools.lru_cache(maxsize=None)
def as_fraction(value: float) -> tuple[int, int]:
    """``value`` as p/q with 1 <= q <= 2^16, exactly (the nearest double of p/q is ``value``);
    ConfigError otherwise. 0.1 -> (1, 10), 0.01 -> (1, 100), 1 -> (1, 1)."""
    fr = Fraction(value).limit_denominator(MAX_DENOMINATOR)
    if float(fr) != value or fr == 0 or abs(fr.numerator) > MAX_DENOMINATOR:
        raise ConfigError(f"λ/β = {value!r}: the exact inverse needs a non-zero rational p/q with |p|, q <= "
                          f"{MAX_DENOMINATOR} (e.g. 0.1, 0.01, 0.25, 1/3); choose one, or method.inverse=float")
    return fr.numerator, fr.denominator


def fixed_point_limit(layers: Sequence[nn.Module], frac_bits: int) -> float:
    """Largest magnitude a stream or an F/G output may take: with it, p·n never leaves int64."""
    p = max(abs(as_fraction(f)[0]) for layer in layers for f in (layer.lam, layer.beta))
    return 2.0 ** (60 - frac_bits) / p


# (dtype, capacity): a word holds values below its capacity, and every radix (a q <= capacity)
# is itself a value of the dtype, so the word's own arithmetic never leaves it
_WORD_DTYPES = tuple((dt, torch.iinfo(dt).max) for dt in (torch.uint8, torch.int16, torch.int32, torch.int64))


def _word_dtype(capacity: int) -> tuple[torch.dtype, int] | None:
    """The smallest integer dtype (and its bytes) whose non-negative range holds ``capacity`` values."""
    return next(((dt, torch.iinfo(dt).bits // 8) for dt, cap in _WORD_DTYPES if capacity <= cap), None)


class RemainderStack:
    """The remainders of every exact scaling of a stack's forward, popped in reverse order
    by its backward. Each is an integer in [0, q); they are packed per element in mixed
    radix (word = word·q + r) into integer words, split where that takes the fewest bytes,
    so a stack costs about log2(q) bits per element per scaling. ``radices``: the q of each
    push, in order."""

    def __init__(self, radices: Sequence[int]):
        # fewest bytes to pack radices[i:] into consecutive words: a small dynamic programme
        n = len(radices)
        best: list[tuple[int, int]] = [(0, n)] * (n + 1)  # (bytes, end of the first word)
        for i in reversed(range(n)):
            options = []
            for j in range(i + 1, n + 1):
                word = _word_dtype(math.prod(radices[i:j]))
                if word is None:
                    break
                options.append((word[1] + best[j][0], j))
            best[i] = min(options)
        self.plan: list[tuple[torch.dtype, list[int]]] = []  # per word: its dtype and radices
        i = 0
        while i < n:
            j = best[i][1]
            self.plan.append((_word_dtype(math.prod(radices[i:j]))[0], list(radices[i:j])))
            i = j
        self.bytes_per_element = best[0][0]
        self.words: list[Tensor] = []
        self._pushed = 0  # digits in the last word

    def push(self, r: Tensor, q: int) -> None:
        if not self.words or self._pushed == len(self.plan[len(self.words) - 1][1]):
            dtype, radices = self.plan[len(self.words)]
            self.words.append(r.to(dtype))
            self._pushed = 1
        else:
            dtype, radices = self.plan[len(self.words) - 1]
            self.words[-1].mul_(q).add_(r.to(dtype))  # < prod(radices) <= the dtype's range
            self._pushed += 1
        assert radices[self._pushed - 1] == q, "pushes must follow the plan"

    def pop(self, q: int) -> Tensor:
        word = self.words[-1]
        r = torch.remainder(word, q).long()
        self._pushed -= 1
        if self._pushed == 0:  # the word is spent: free it now
            self.words.pop()
            self._pushed = len(self.plan[len(self.words) - 1][1]) if self.words else 0
        else:
            self.words[-1] = torch.div(word, q, rounding_mode="floor")
        return r

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.words)


class FixedStream:
    """A fixed-point stream n·2^-bits, held as its float view ``hi`` (what F and G read, so the
    view costs nothing extra) and the integer residual ``lo = n − round(hi·2^bits)`` in the
    smallest integer dtype that holds it (int16 while |values| < 2^8 in float32): 6 bytes per
    element where an int64 stream and its view would take 12."""

    __slots__ = ("hi", "lo")

    def __init__(self, hi: Tensor, lo: Tensor):
        self.hi, self.lo = hi, lo

    @property
    def shape(self) -> torch.Size:
        return self.hi.shape

    @property
    def device(self) -> torch.device:
        return self.hi.device


_RESIDUAL_DTYPES = ((torch.int16, 1 << 15), (torch.int32, 1 << 31), (torch.int64, 1 << 63))


class FixedPoint:
    """Exact arithmetic on ``FixedStream``s (``FRAC_BITS``); F and G read the float view in
    ``dtype``; additions and scalings run on int64 and leave no trace but the remainders."""

    def __init__(self, dtype: torch.dtype, remainders: RemainderStack | None = None):
        self.dtype = dtype
        self.remainders = remainders
        self.view_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.frac_bits = FRAC_BITS.get(dtype, DEFAULT_FRAC_BITS)
        self.scale = 2.0 ** self.frac_bits

    def _round(self, x: Tensor) -> Tensor:
        # x·2^bits is exact in float32/64 (a power of two; float16 would overflow, so it is
        # widened first); round, then an exact cast. Always a new tensor: x is never changed
        return torch.mul(x.to(self.view_dtype), self.scale).round_().to(torch.int64)

    def integer(self, s: FixedStream) -> Tensor:
        """The int64 n of a stream (a fresh tensor)."""
        return self._round(s.hi).add_(s.lo)

    def stream(self, n: Tensor) -> FixedStream:
        """A stream from a fresh int64 tensor ``n`` (consumed: it becomes the residual)."""
        hi = n.to(self.view_dtype).mul_(1.0 / self.scale).to(self.dtype)
        lo = n.sub_(self._round(hi))
        bounds = torch.stack(torch.aminmax(lo))
        if _has_values(bounds):
            low, high = bounds.tolist()
            dtype = next(dt for dt, cap in _RESIDUAL_DTYPES if -cap <= low and high < cap)
        else:  # no values (memtl estimate): the usual case, |values| < 2^7 in float32
            dtype = torch.int16
        return FixedStream(hi, lo.to(dtype))

    def encode(self, x: Tensor) -> FixedStream:
        return self.stream(self._round(x))

    def decode(self, s: FixedStream) -> Tensor:
        return s.hi

    def scaled_add(self, s: FixedStream, factor: float, out: Tensor) -> FixedStream:
        """factor·s + round(out): the remainder of the division by q is pushed."""
        p, q = as_fraction(factor)
        t = self.integer(s)
        if p != 1:
            t.mul_(p)
        if q != 1:
            r = torch.remainder(t, q)  # in [0, q)
            self.remainders.push(r, q)
            t.sub_(r).div_(q, rounding_mode="floor")  # exact: t − r is a multiple of q
            del r
        return self.stream(t.add_(self._round(out)))

    def unscaled_sub(self, s: FixedStream, factor: float, out: Tensor) -> FixedStream:
        """(s − round(out)) / factor, exactly: the inverse of ``scaled_add`` (pops its remainder)."""
        p, q = as_fraction(factor)
        t = self.integer(s).sub_(self._round(out))
        if q != 1:
            t.mul_(q).add_(self.remainders.pop(q))
        return self.stream(t.div_(p, rounding_mode="floor") if p != 1 else t)  # t is a multiple of p

    def difference(self, a: FixedStream, b: FixedStream) -> Tensor:
        """a − b as float64 values (exact while |a − b| < 2^(53 − bits))."""
        return (self.integer(a) - self.integer(b)).double() / self.scale

    @staticmethod
    def checksum(x1: FixedStream, x2: FixedStream) -> Tensor:
        return torch.stack([t.double().sum() for s in (x1, x2) for t in (s.hi, s.lo)])

    def verify(self, x1: FixedStream, x2: FixedStream, forward_sums: Tensor) -> None:
        """The backward's reconstruction of the stack's inputs against the forward's: F or G
        recomputing other bits (a kernel that differs with grad enabled, a nondeterministic
        one) would make the gradients silently inexact."""
        sums = self.checksum(x1, x2)
        if self.remainders.words or (_has_values(sums) and not torch.equal(sums, forward_sums)):
            raise RuntimeError("MEFT exact inverse: the backward did not rebuild the stack's inputs bit for bit; "
                               "F or G recomputes differently from the forward (a nondeterministic kernel?): "
                               "use method.inverse=float, or make the layers deterministic")


class FloatStreams:
    """The paper's arithmetic: streams in the model's dtype, the inverse divides."""

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, x: Tensor) -> Tensor:
        return x

    def scaled_add(self, x: Tensor, factor: float, out: Tensor) -> Tensor:
        return factor * x + out

    def unscaled_sub(self, y: Tensor, factor: float, out: Tensor) -> Tensor:
        return torch.sub(y, out).div_(factor)

    def difference(self, a: Tensor, b: Tensor) -> Tensor:
        return a - b


def _amax(t: Tensor) -> Tensor:
    """max |t| as float64 (nan when t has a nan), without an abs() copy of t."""
    lo, hi = torch.aminmax(t)
    return torch.maximum(-lo.double(), hi.double())


class RangeCheck:
    """Per layer, the largest |F|, |G| and stream magnitudes of the exact forward; checked
    once after the stack (one device sync) so a value beyond the range never goes unseen."""

    def __init__(self, layers: Sequence[nn.Module], name: str, stack_input: Tensor, arithmetic: FixedPoint):
        self.limit = fixed_point_limit(layers, arithmetic.frac_bits)
        self.frac_bits = arithmetic.frac_bits
        self.name = name
        self.stack_input = stack_input  # max |input|, checked with the rest
        self.rows: list[Tensor] = []

    def add(self, f: Tensor, g: Tensor, y1: FixedStream, y2: FixedStream) -> None:
        self.rows.append(torch.stack([_amax(f), _amax(g), _amax(y1.hi), _amax(y2.hi)]))

    def check(self) -> None:
        table = torch.stack([self.stack_input.expand(4), *self.rows])
        if not _has_values(table):  # memtl estimate: no values to check
            return
        first, *rows = table.tolist()
        if not first[0] <= self.limit:  # also nan
            raise FixedPointOverflow(
                f"MEFT exact inverse: the input of the reversible {self.name} stack reached |value| = {first[0]:.3g}, "
                f"outside the fixed-point range ±{self.limit:.3g}: check the inputs, or use method.inverse=float")
        for i, row in enumerate(rows):
            for what, v in zip(("F's output", "G's output", "stream 1", "stream 2"), row):
                if not v <= self.limit:
                    raise FixedPointOverflow(
                        f"MEFT exact inverse: layer {i} of the reversible {self.name} stack: {what} reached "
                        f"|value| = {v:.3g}, outside the fixed-point range ±{self.limit:.3g} (int64 with "
                        f"{self.frac_bits} fractional bits), where it would wrap "
                        "around. The activations diverged or are this large: lower the learning rate or clip "
                        "gradients (trainer.gradient_clip_val), or use method.inverse=float")


# --- one layer, forward and inverse ----------------------------------------------------


def layer_forward(layer: nn.Module, x1: Tensor, x2: Tensor, context: Sequence[Any] = (),
                  arithmetic=None, record_rng: bool = False, check: RangeCheck | None = None):
    """Forward of one layer on two streams (``arithmetic``: how they are held; None: float).
    With ``record_rng`` also returns the RNG states before F and before G, so that an
    inverse/recompute can draw the same dropout masks."""
    a = arithmetic or FloatStreams()
    rng_f = RNGState(x2.device) if record_rng else None
    f = layer.f(a.decode(x2), *context)
    y1 = a.scaled_add(x1, layer.lam, f)
    rng_g = RNGState(y1.device) if record_rng else None
    g = layer.g(a.decode(y1), *context)
    y2 = a.scaled_add(x2, layer.beta, g)
    if check is not None:
        check.add(f, g, y1, y2)
    out = (y2, y1) if layer.switch else (y1, y2)
    return (out, (rng_f, rng_g)) if record_rng else out


def layer_inverse(layer: nn.Module, o1: Tensor, o2: Tensor, context: Sequence[Any] = (),
                  rng: tuple[RNGState | None, RNGState | None] = (None, None), arithmetic=None):
    """Reconstruct a layer's inputs ``(x1, x2)`` from its outputs (no grad)."""
    a = arithmetic or FloatStreams()
    y1, y2 = (o2, o1) if layer.switch else (o1, o2)
    with torch.no_grad():
        with _maybe_rng(rng[1]):
            x2 = a.unscaled_sub(y2, layer.beta, layer.g(a.decode(y1), *context))
        with _maybe_rng(rng[0]):
            x1 = a.unscaled_sub(y1, layer.lam, layer.f(a.decode(x2), *context))
    return x1, x2


def stack_arithmetic(layers: Sequence[nn.Module], inverse: str, dtype: torch.dtype):
    """The arithmetic one forward of ``layers`` runs in (exact: with a fresh remainder buffer)."""
    if inverse == "float":
        return FloatStreams()
    radices = [q for layer in layers for f in (layer.lam, layer.beta) if (q := as_fraction(f)[1]) != 1]
    return FixedPoint(dtype, RemainderStack(radices))


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
    """inputs: x1, x2, layers, context, diff_pos, inverse, name, *diff_context, *params.

    ``diff_context`` are the context entries at positions ``diff_pos`` that require grad
    (e.g. a decoder's encoder output); ``params`` the layers' trainable parameters. Both
    are inputs so that (a) backward runs even when x1/x2 do not require grad (frozen
    embeddings), and (b) their grads flow back through autograd's normal accumulation
    (``.grad``, hooks, DDP, the encoder's graph) rather than being written by hand.
    """

    @staticmethod
    def forward(ctx, x1, x2, layers, context, diff_pos, inverse, name, *tensors):
        # Function.forward already runs without grad: nothing below is recorded
        diff_context, params = tensors[:len(diff_pos)], tensors[len(diff_pos):]
        ctx.layers = layers
        # differentiable context goes through save_for_backward (version checks), the rest as is
        ctx.context = tuple(None if i in diff_pos else c for i, c in enumerate(context))
        ctx.diff_pos = diff_pos
        ctx.autocast = AutocastState(x1.device)
        ctx.arithmetic = a = stack_arithmetic(layers, inverse, x1.dtype)
        ctx.in_dtype = x1.dtype
        check = RangeCheck(layers, name, torch.maximum(_amax(x1), _amax(x2)), a) if inverse == "exact" else None
        x1, x2 = a.encode(x1), (a.encode(x2) if x2 is not x1 else None)  # the same tensor (h0): encoded once
        x2 = x1 if x2 is None else x2
        ctx.input_sums = a.checksum(x1, x2) if inverse == "exact" else None
        ctx.rng = []
        for layer in layers:
            (x1, x2), rng = layer_forward(layer, x1, x2, context, a, record_rng=True, check=check)
            ctx.rng.append(rng)
        if check is not None:
            check.check()
        # the only activations kept: the final two streams (the context is the caller's anyway).
        # Held on ctx, not in save_for_backward, so that the backward can free them as soon as
        # the top layer is inverted (saved tensors live until the backward returns); nothing
        # modifies a stack's outputs in place (run_stack and the plain layers make new tensors)
        ctx.streams = [x1, x2]
        ctx.save_for_backward(*diff_context)
        ctx.param_index = {id(p): i for i, p in enumerate(params)}
        # new tensor objects (sharing the streams' storage) for autograd to give a grad_fn: ctx
        # must not hold its own outputs (a reference cycle through the graph). They share the
        # streams' version counter: the backward checks that nobody changed them in place
        out = a.decode(x1).detach(), a.decode(x2).detach()
        ctx.versions = [t._version for t in out]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, do1, do2):
        diff_context = ctx.saved_tensors
        if ctx.streams is None:  # the first backward consumed the streams (and the remainders)
            raise RuntimeError("MEFT: this forward's reversible backward already ran; it frees what it "
                               "reconstructs from, so a second backward through the same graph "
                               "(retain_graph=True) is not supported: run the forward again")
        (o1, o2), ctx.streams = ctx.streams, None
        a = ctx.arithmetic
        if [a.decode(o)._version for o in (o1, o2)] != ctx.versions:
            raise RuntimeError("MEFT: an output of the reversible stack was modified in place before the backward; "
                               "the reconstruction starts from it: modify a copy instead")
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
        in_dtype = ctx.in_dtype
        do1 = torch.zeros(o1.shape, dtype=in_dtype, device=o1.device) if do1 is None else do1
        do2 = torch.zeros(o2.shape, dtype=in_dtype, device=o2.device) if do2 is None else do2

        # the bottom layer's input grads are wasted work when the stack's inputs need none
        # (frozen embeddings): skipping them spares F's backward below its first adapter
        inputs_need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        bottom = ctx.layers[0]
        for layer, (rng_f, rng_g) in zip(reversed(ctx.layers), reversed(ctx.rng)):
            y1, y2, dy1, dy2 = (o2, o1, do2, do1) if layer.switch else (o1, o2, do1, do2)
            # drop the loop's references: each stream-sized tensor is freed as soon as this
            # layer is done with it (the peak is one recompute graph plus these streams)
            o1 = o2 = do1 = do2 = None
            need_dx = inputs_need_grad or layer is not bottom
            # the parameters that were trainable at forward time (the Function's inputs)
            params = [p for p in layer.parameters() if id(p) in ctx.param_index]

            # 1. recompute g = G(y1) with grad; backprop dy2 into G's params and y1
            y1_in = a.decode(y1).detach().requires_grad_(True)
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
                x2 = a.unscaled_sub(y2, layer.beta, g.detach())
            del g, y2

            # 3. recompute f = F(x2) with grad; backprop dy1 into F's params and x2
            x2_in = a.decode(x2).detach().requires_grad_(need_dx)
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
                x1 = a.unscaled_sub(y1, layer.lam, f.detach())
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

        if ctx.input_sums is not None:  # one sync: the walk down ended where the forward began
            a.verify(o1, o2, ctx.input_sums)
        # grads must match each input's dtype (autocast may leave the streams' grads in bf16)
        dx1 = do1.to(in_dtype) if ctx.needs_input_grad[0] else None
        dx2 = do2.to(in_dtype) if ctx.needs_input_grad[1] else None
        return (dx1, dx2, None, None, None, None, None, *ctx_grads, *grads)


def reversible_stack(x1: Tensor, x2: Tensor, layers: Sequence[nn.Module], context: Sequence[Any] = (),
                     num_rev: int | None = None, inverse: str = "exact",
                     name: str = "encoder") -> tuple[Tensor, Tensor]:
    """Run ``layers`` on the two streams; the first ``num_rev`` (None: all) with the
    reversible backward in the ``inverse`` arithmetic (exact | float), the rest with plain
    autograd. Returns the final streams. ``name`` labels the stack in error messages."""
    if inverse not in INVERSES:
        raise ConfigError(f"method.inverse={inverse!r}: choose exact (fixed-point streams, bit-exact) or float "
                          "(the paper's division)")
    layers = list(layers)
    num_rev = len(layers) if num_rev is None else num_rev
    rev, plain = layers[:num_rev], layers[num_rev:]
    context = tuple(context)
    # context tensors the backward must return a gradient for (e.g. a decoder's encoder output)
    diff_pos = tuple(i for i, c in enumerate(context) if isinstance(c, Tensor) and c.requires_grad)
    diff_context = [context[i] for i in diff_pos]

    if rev and torch.is_grad_enabled() and (trainable_parameters(rev) or x1.requires_grad or x2.requires_grad
                                            or diff_pos):
        x1, x2 = _ReversibleStack.apply(x1, x2, rev, context, diff_pos, inverse, name,
                                        *diff_context, *trainable_parameters(rev))
    else:  # no grad (eval), or nothing to differentiate: a plain forward records nothing either
        plain = layers
    for layer in plain:
        x1, x2 = layer_forward(layer, x1, x2, context)
    return x1, x2


def run_stack(stack: nn.Module, h: Tensor, layers: Sequence[nn.Module], context: tuple, name: str) -> Tensor:
    """A MEFT stack's forward (docs/DESIGN.md §1.2): both streams start from ``h``, run through
    ``layers`` as set by ``stack.num_rev_layers`` and ``stack.inverse``, and their average
    (or the one ``stack.output_stream`` names) comes back (``stack.streams == "one"``: the plain one-stream forward instead). ``stack.recorded`` (a list, set by diagnostics.py for one forward) receives
    what the layers ran on, so reconstruction can be measured without redoing the forward."""
    if stack.recorded is not None:
        stack.recorded.append((h, context))
    if stack.streams == "one":  # the ablation: each layer G(F(h)) on the plain model's one stream
        for layer in layers:
            h = layer.whole_layer(h, *context)
        return h
    x1, x2 = reversible_stack(h, h, layers, context, num_rev=stack.num_rev_layers, inverse=stack.inverse, name=name)
    if stack.output_stream is not None:  # method.output=chain
        return (x1, x2)[stack.output_stream].to(h.dtype)
    return ((x1 + x2) / 2).to(h.dtype)
