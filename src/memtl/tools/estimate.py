"""Memory estimator: the peak memory of a training step, predicted before running it.

    memtl estimate --backbone bert-base-uncased --methods full,lora+ckpt,meft3 \\
        --batch-size 32 --seq-len 512 --precision bf16-mixed --budget 24GB
    memtl estimate --validate          # predicted vs measured (memtl bench) on small configs

Only the Hugging Face config is needed (hidden size, layers, heads, intermediate size,
vocab, positions), never the weights. The model is a small *symbolic autograd*: every
op of a BERT layer (as Hugging Face and memtl's methods run it) is listed with the size
of its output and the tensors autograd saves for backward, which depend on what needs a
gradient (a frozen Linear keeps no input, a Linear fed by a no-grad input keeps no
weight copy, ...). Replaying the ops in execution order - forward, then backward in
reverse, freeing each tensor when its last user is done, with checkpointed and
reversible segments recomputed where the real code recomputes them - gives the live
bytes over time; their maximum is the step's peak. Nothing is fitted to measurements:
the per-op rules were read off the saved tensors of a tiny BERT
(``torch.autograd.graph.saved_tensors_hooks`` / ``grad_fn._saved_*``).

Two figures per method:

* peak step memory - docs/DESIGN.md §4's headline, what ``memtl bench`` measures: the peak of
  live bytes during forward + backward above the pre-step baseline. The parameter
  gradients are allocated inside the step (the benchmark zeroes them with
  ``set_to_none``), so they are part of it; parameters and AdamW state are not.
* total - what a GPU must hold: parameters + AdamW state (two fp32 moments per trainable
  parameter) + the larger of the step's peak and the optimizer step (gradients + one
  parameter-sized temporary of the foreach AdamW). ``fits`` compares it with
  ``--budget``; the CUDA context (~0.5 GB) and allocator fragmentation are not included.

Devices differ in two kernels that matter for memory: CPU trains attention through the
math path (scores, softmax, dropout noise and dropped probabilities: four B·H·T²
tensors, three kept) with a float dropout noise, while CUDA uses a fused
(flash / memory-efficient) kernel that keeps only q, k, v, the output and the
log-sum-exp, and a one-byte dropout mask. MEFT's layers on CPU run memtl's own attention
(the same tensors, with a one-byte dropout mask) and draw their other dropout masks as
one-byte masks too. ``--device`` picks the rules; ``--validate --device cuda`` (and ``memtl
gpu-check``) measures the CUDA ones against the allocator.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

from memtl.cli import ArgumentParser
from memtl.errors import ConfigError
from memtl.tools.registry import METHOD_SPECS

MIB = 2**20
GB = 10**9

# ---------------------------------------------------------------------------------------
# geometry: what the estimate needs from a Hugging Face config


@dataclass(frozen=True)
class Geometry:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 30522
    max_positions: int = 512
    type_vocab: int = 2
    model_type: str = "bert"

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> "Geometry":
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in keys if k not in cfg]
        if missing:
            raise ConfigError(f"--backbone {name}: its config has no {', '.join(missing)}; "
                              "the estimator supports BERT-family encoders (bert, roberta)")
        model_type = cfg.get("model_type", "bert")
        if model_type not in ("bert", "roberta"):
            raise ConfigError(f"--backbone {name}: model type {model_type!r} is not supported; "
                              "the estimator models BERT-family encoders (bert, roberta)")
        return cls(name, cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                   cfg["intermediate_size"], cfg.get("vocab_size", 30522), cfg.get("max_position_embeddings", 512),
                   cfg.get("type_vocab_size", 2), model_type)


def _bert(h, l, heads, i, **kw):
    return dict(hidden_size=h, num_hidden_layers=l, num_attention_heads=heads, intermediate_size=i, **kw)


# configs known offline (the hub's config.json values; no download needed)
KNOWN_CONFIGS = {
    "bert-base-uncased": _bert(768, 12, 12, 3072),
    "bert-large-uncased": _bert(1024, 24, 16, 4096),
    "roberta-base": _bert(768, 12, 12, 3072, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                          model_type="roberta"),
    "roberta-large": _bert(1024, 24, 16, 4096, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                           model_type="roberta"),
    "minilm": _bert(384, 6, 12, 1536),  # sentence-transformers/all-MiniLM-L6-v2
}
ALIASES = {"bert-base": "bert-base-uncased", "bert_base": "bert-base-uncased", "bert-large": "bert-large-uncased",
           "roberta_base": "roberta-base", "roberta_large": "roberta-large"}


def load_geometry(backbone: str, layers: int | None = None) -> Geometry:
    """A backbone name (memtl bench geometry, known hub config, hub id in the local cache)
    or a path to a config.json / model folder."""
    from memtl.geometries import GEOMETRIES, geometry

    name = ALIASES.get(backbone, backbone)
    if backbone in GEOMETRIES:  # the random-init geometries (BertConfig defaults otherwise)
        model_type, cfg = geometry(backbone)
        cfg = {**cfg, "model_type": model_type}
    elif name in KNOWN_CONFIGS:
        cfg = KNOWN_CONFIGS[name]
    elif os.path.exists(backbone):
        path = os.path.join(backbone, "config.json") if os.path.isdir(backbone) else backbone
        try:
            with open(path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--backbone {backbone}: cannot read a config.json there ({e}); give a model "
                              "folder holding a valid config.json, a path to one, or a known name") from None
    else:
        cfg = _hub_config(backbone)
    if layers:
        cfg = {**cfg, "num_hidden_layers": layers}
    return Geometry.from_config(backbone, cfg)


def _hub_config(name: str) -> dict:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError):
        known = sorted({*KNOWN_CONFIGS, *ALIASES, "minilm-random", "tiny-bert"})
        raise ConfigError(f"--backbone {name}: not a known config ({', '.join(known)}), not a path to a "
                          "config.json, and not in the local Hugging Face cache") from None


# ---------------------------------------------------------------------------------------
# methods: what trains


@dataclass(frozen=True)
class Method:
    name: str  # full | lora | meft1/2/3 | sherl
    ckpt: bool = False
    lora_r: int = 8
    bottleneck: int = 8  # MEFT adapters
    late_layers: int = 1  # SHERL k
    side_width: int | None = None  # SHERL d' (None: hidden/2)
    recompute_side: bool = True  # SHERL: the side module recomputed in backward (implied by ckpt)
    inverse: str = "exact"  # MEFT: exact (fixed-point streams) | float


# the labels of the tools' method table (memtl.tools.registry) the estimator models; SHERL's
# paper setting on decoders and the head-only probe are not modelled
MODELLED = ("full", "lora", "full+ckpt", "lora+ckpt", "meft1", "meft2", "meft3", "meft1+float", "meft2+float",
            "meft3+float", "sherl", "sherl+keep", "sherl+ckpt")


def method_of(label: str) -> Method:
    """The estimator's ``Method`` for a label of the tools' method table."""
    name, options = METHOD_SPECS[label]
    known = {"gradient_checkpointing", "recompute_side", "inverse"}
    if set(options) - known:
        raise ValueError(f"{label}: the estimator does not model option(s) {sorted(set(options) - known)}")
    return Method(name, ckpt=options.get("gradient_checkpointing", False),
                  recompute_side=options.get("recompute_side", True), inverse=options.get("inverse", "exact"))


METHODS = {label: method_of(label) for label in MODELLED}


def parameter_counts(g: Geometry, m: Method, num_labels: int = 2) -> dict[str, int]:
    """Total and trainable parameters of the sequence-classification model after the method."""
    d, inter = g.hidden, g.intermediate
    emb = (g.vocab + g.max_positions + g.type_vocab) * d + 2 * d
    layer = 4 * (d * d + d) + 2 * d * inter + inter + d + 4 * d
    head = (d * d + d) + (d * num_labels + num_labels)  # pooler (RoBERTa: head dense) + classifier
    total = emb + g.layers * layer + head
    if m.name == "full":
        return {"total": total, "trainable": total}
    if m.name == "lora":  # peft: A (d->r) and B (r->d) on query and value; a trainable copy of the head
        extra = g.layers * 2 * 2 * d * m.lora_r
        return {"total": total + extra + head, "trainable": extra + head}
    if m.name.startswith("meft"):  # two adapters per layer (FFN + F/G or attention-output adapter)
        r = m.bottleneck
        extra = g.layers * 2 * (2 * d * r + r + d)
        return {"total": total + extra, "trainable": extra + head}
    if m.name == "sherl":
        s = side_width(g, m)
        n = g.layers - m.late_layers + 1  # h_0 .. h_{N-k}
        extra = n * (d * s + s + 2 * s) + (s + 1) + (s * d + d) + 2 * d + 1
        return {"total": total + extra, "trainable": extra + head}
    raise ConfigError(f"unknown method {m.name!r}")


def side_width(g: Geometry, m: Method) -> int:
    return g.hidden // 2 if m.side_width is None else m.side_width


# ---------------------------------------------------------------------------------------
# the symbolic autograd


class Mem:
    """Live bytes over time; ``peak`` is the running maximum (what the allocator reports)."""

    def __init__(self):
        self.live = self.peak = 0

    def alloc(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def free(self, n: int) -> None:
        self.live -= n


class T:
    """A tensor: its bytes, whether it requires grad, how many holders it has."""
    __slots__ = ("nbytes", "bpe", "rg", "refs")

    def __init__(self, numel: int, bpe: int, rg: bool = False):
        self.nbytes, self.bpe, self.rg, self.refs = numel * bpe, bpe, rg, 0

    @property
    def numel(self) -> int:
        return self.nbytes // self.bpe


@dataclass(eq=False)
class Op:
    ins: list  # activation inputs
    out: T
    saves: list = field(default_factory=list)  # kept for backward when a graph is recorded
    temps: list = field(default_factory=list)  # allocated beside the output (dropout noise, weight casts)
    grad_ins: list = field(default_factory=list)  # inputs that receive a gradient
    param_grad: int = 0  # bytes of parameter gradients produced (kept: .grad)
    bwd_temp: int = 0  # transient bytes inside the op's backward
    passthrough: bool = False  # backward hands the same gradient on (add, view)
    seg: tuple = ()  # checkpoint segments this op runs in (outermost first)


class G:
    """A gradient buffer, shared by the inputs of an add."""
    __slots__ = ("nbytes", "refs")

    def __init__(self, nbytes: int, refs: int = 1):
        self.nbytes, self.refs = nbytes, refs


def _unref(mem: Mem, t) -> None:
    t.refs -= 1
    if t.refs == 0:
        mem.free(t.nbytes)


def forward(mem: Mem, ops: list[Op], scope: tuple = (), grad: bool = True, keep=()) -> None:
    """Run ``ops``: allocate each output, keep what autograd saves (ops of ``scope`` when
    ``grad``), free the rest after its last use. Ops in deeper checkpoint segments save
    nothing; each such segment keeps its inputs until its backward. ``keep``: outputs the
    caller holds on to. Tensors made outside ``ops`` are the caller's (never freed here
    except through the saves this run adds)."""
    produced = {op.out for op in ops}
    uses = Counter(t for op in ops for t in op.ins)
    seg_started = set()
    for op in ops:
        if len(op.seg) > len(scope):  # entering a checkpointed segment: it holds its inputs
            sub = op.seg[:len(scope) + 1]
            if sub not in seg_started:
                seg_started.add(sub)
                for t in segment_inputs(ops, sub):
                    t.refs += 1
        mem.alloc(op.out.nbytes)
        op.out.refs = uses[op.out] + (op.out in keep)
        for t in op.temps:
            mem.alloc(t.nbytes)
            t.refs = 0
        if grad and op.seg == scope:
            for t in op.saves:
                t.refs += 1
        for t in op.temps:
            if t.refs == 0:
                mem.free(t.nbytes)
        for t in op.ins:
            if t in produced:
                _unref(mem, t)
        if op.out.refs == 0:
            mem.free(op.out.nbytes)


def segment_inputs(ops: list[Op], sub: tuple) -> list[T]:
    inside = [op for op in ops if op.seg[:len(sub)] == sub]
    made = {op.out for op in inside}
    return list(dict.fromkeys(t for op in inside for t in op.ins if t not in made))


def backward(mem: Mem, ops: list[Op], grads: dict, scope: tuple = ()) -> None:
    """Backward through ``ops`` (recorded by ``forward``) from the gradients in ``grads``
    (T -> G); gradients of tensors made outside ``ops`` are left in ``grads``.
    A checkpointed segment is recomputed (forward with saves) when the backward reaches it."""
    i = len(ops) - 1
    while i >= 0:
        op = ops[i]
        if len(op.seg) > len(scope):
            sub = op.seg[:len(scope) + 1]
            j = i
            while j >= 0 and ops[j].seg[:len(sub)] == sub:
                j -= 1
            seg_ops = ops[j + 1:i + 1]
            forward(mem, seg_ops, scope=sub)  # the recompute
            backward(mem, seg_ops, grads, scope=sub)
            for t in segment_inputs(ops, sub):  # the checkpoint lets go of its inputs
                _unref(mem, t)
            i = j
            continue
        g = grads.pop(op.out, None)
        if g is not None:
            for t in op.grad_ins:
                if op.passthrough:
                    new = g
                    g.refs += 1
                else:
                    new = G(t.nbytes)
                    mem.alloc(new.nbytes)
                old = grads.get(t)
                if old is None:
                    grads[t] = new
                elif old.refs == 1 and new is not g:  # autograd adds in place into a buffer it owns
                    _unref(mem, new)
                else:  # shared buffer: the sum is a new tensor
                    acc = G(t.nbytes)
                    mem.alloc(acc.nbytes)
                    _unref(mem, old)
                    _unref(mem, new)
                    grads[t] = acc
            mem.alloc(op.param_grad)
            mem.alloc(op.bwd_temp)
            mem.free(op.bwd_temp)
            _unref(mem, g)
        if op.seg == scope:
            for t in op.saves:
                _unref(mem, t)
        i -= 1


# ---------------------------------------------------------------------------------------
# building the ops of a BERT-family model, as Hugging Face and memtl run them


class Net:
    """Records ops. ``amp``: bf16 autocast; ``cuda``: CUDA kernels (fused attention,
    one-byte dropout masks), else CPU's."""

    def __init__(self, amp: bool, cuda: bool):
        self.amp, self.cuda = amp, cuda
        self.ops: list[Op] = []
        self.seg: tuple = ()

    def _op(self, ins, out, **kw) -> T:
        self.ops.append(Op(list(ins), out, seg=self.seg, **kw))
        return out

    def new(self, numel: int, bpe: int, rg: bool = False) -> T:
        return T(numel, bpe, rg)

    def keepalive(self, *ts: T) -> None:
        """Python references keep ``ts`` alive up to here (no autograd op)."""
        self._op(ts, T(0, 1))

    # elementwise ----------------------------------------------------------------------
    def cast(self, x: T, bpe: int) -> T:
        if x.bpe == bpe:
            return x
        return self._op([x], T(x.numel, bpe, x.rg), grad_ins=[x] if x.rg else [])

    def scale(self, x: T) -> T:  # x * python scalar: a new tensor, nothing saved
        return self._op([x], T(x.numel, x.bpe, x.rg), grad_ins=[x] if x.rg else [])

    def copy(self, x: T, grad_copies: bool = False) -> T:
        """A contiguous copy (reshape of a transposed view); its backward hands the grad on
        as a view, or (``grad_copies``) copies it back into the source's layout."""
        return self._op([x], T(x.numel, x.bpe, x.rg), grad_ins=[x] if x.rg else [], passthrough=not grad_copies)

    def add(self, a: T, b: T) -> T:
        rg = [t for t in (a, b) if t.rg]
        return self._op([a, b], T(max(a.numel, b.numel), max(a.bpe, b.bpe), bool(rg)), grad_ins=rg,
                        passthrough=True)

    def dropout(self, x: T) -> T:
        # CPU: input * (bernoulli noise / (1-p)), the noise in the input's dtype; CUDA: fused, bool mask
        mask = T(x.numel, 1 if self.cuda else x.bpe)
        return self._op([x], T(x.numel, x.bpe, x.rg), temps=[mask], saves=[mask] if x.rg else [],
                        grad_ins=[x] if x.rg else [])

    def act(self, x: T, keeps: str) -> T:
        """gelu keeps its input, relu/tanh/softmax their output (when a grad flows)."""
        out = T(x.numel, x.bpe, x.rg)
        saves = ([x] if keeps == "input" else [out]) if x.rg else []
        return self._op([x], out, saves=saves, grad_ins=[x] if x.rg else [])

    # layers ---------------------------------------------------------------------------
    def linear(self, x: T, d_in: int, d_out: int, train: bool, bias: bool = True, src: T | None = None,
               heads: bool = False) -> T:
        """``src``: the storage autograd keeps when x is a view of it (the pooler's first token).
        ``heads``: the output is split into heads (q, k, v): its grad arrives in the heads'
        layout and is copied back to a contiguous (rows, d_out) one in backward."""
        if self.amp:
            x = self.cast(x, 2)
        rows = x.numel // d_in
        w = d_in * d_out + (d_out if bias else 0)
        wcast = T(w, 2) if self.amp else None  # autocast's bf16 copy of the weight
        saves = [src or x] if train else []
        if x.rg and wcast is not None:
            saves.append(wcast)  # needed for the input's gradient
        return self._op([x] + ([src] if src else []), T(rows * d_out, x.bpe, x.rg or train), saves=saves,
                        temps=[wcast] if wcast is not None else [], grad_ins=[x] if x.rg else [],
                        param_grad=4 * w if train else 0,
                        bwd_temp=(2 * w if (train and self.amp) else 0) + (rows * d_out * x.bpe if heads else 0))

    def layernorm(self, x: T, d: int, train: bool) -> T:
        x = self.cast(x, 4) if self.amp else x  # autocast runs layer_norm in fp32
        rows = x.numel // d
        keep = x.rg or train
        stats = T(2 * rows, 4)  # mean and rstd
        return self._op([x], T(x.numel, x.bpe, keep), temps=[stats], saves=[x, stats] if keep else [],
                        grad_ins=[x] if x.rg else [], param_grad=8 * d if train else 0)

    def matmul(self, a: T, b: T, out_numel: int) -> T:
        saves = ([a] if b.rg else []) + ([b] if a.rg else [])
        return self._op([a, b], T(out_numel, a.bpe, a.rg or b.rg), saves=saves, grad_ins=[t for t in (a, b) if t.rg])

    def attention(self, q: T, k: T, v: T, B: int, H: int, S: int) -> T:
        """F.scaled_dot_product_attention in training (dropout on); returns (B,H,S,dh)."""
        scores = B * H * S * S
        if self.cuda:  # fused kernel keeps q, k, v, output, log-sum-exp
            out = T(q.numel, q.bpe, q.rg or k.rg or v.rg)
            lse = T(B * H * S, 4)
            rg = [t for t in (q, k, v) if t.rg]
            return self._op([q, k, v], out, temps=[lse], saves=[q, k, v, out, lse] if rg else [], grad_ins=rg,
                            bwd_temp=q.numel * 4 + B * H * S * 4)
        if self.amp:  # CPU autocast runs attention in fp32
            q, k, v = self.cast(q, 4), self.cast(k, 4), self.cast(v, 4)
        # math path: q, k each scaled by sqrt(scale) then made contiguous for bmm; v made contiguous
        q2, k2, v2 = self.copy(self.scale(q)), self.copy(self.scale(k)), self.copy(v)
        p = self.act(self.matmul(q2, k2, scores), keeps="output")
        self.ops[-1].temps.append(T(scores, 1))  # _safe_softmax's bool mask of fully masked rows
        return self.matmul(self.dropout(p), v2, q.numel)

    def lora_linear(self, x: T, d: int, r: int) -> T:
        """peft LoRA: base(x) + B(A(dropout(x))) * scaling, base frozen."""
        base = self.linear(x, d, d, train=False)
        low = self.linear(self.linear(self.dropout(x), d, r, train=True, bias=False), r, d, train=True, bias=False)
        return self.add(base, self.scale(low))

    def adapter(self, x: T, d: int, r: int) -> T:
        """memtl's Adapter: up(dropout(relu(down(x))))."""
        return self.linear(self.dropout(self.act(self.linear(x, d, r, train=True), "output")), r, d, train=True)

    # blocks of a BERT layer -----------------------------------------------------------
    def attention_block(self, x: T, g: Geometry, B: int, S: int, train: bool, lora_r: int = 0,
                        adapter_r: int = 0) -> T:
        d, H = g.hidden, g.heads
        proj = (lambda t: self.lora_linear(t, d, lora_r)) if lora_r else (lambda t: self.linear(t, d, d, train,
                                                                                                   heads=True))
        q = proj(x)
        k = self.linear(x, d, d, train, heads=True)
        v = proj(x)
        ctx = self.attention(q, k, v, B, H, S)
        self.keepalive(q, k, v)  # the attention module's locals hold them until it returns
        ctx = self.copy(ctx, grad_copies=True)  # (B,H,S,dh) -> (B,S,d)
        h = self.dropout(self.linear(ctx, d, d, train))
        if adapter_r:  # MEFT3: sequential adapter on the attention output projection
            h = self.add(h, self.adapter(h, d, adapter_r))
        out = self.layernorm(self.add(h, x), d, train)
        self.keepalive(h, ctx)  # locals of the calling frames until the block returns
        return out

    def ffn_block(self, h: T, g: Geometry, train: bool, adapter_r: int = 0, hf: bool = True) -> T:
        """``hf``: Hugging Face's BertLayer, whose frame holds the intermediate activation
        until the block returns (memtl's MEFT block drops it after the output dense)."""
        d = g.hidden
        inter = self.act(self.linear(h, d, g.intermediate, train), "input")
        z = self.dropout(self.linear(inter, g.intermediate, d, train))
        if adapter_r:  # MEFT: parallel adapter on the feed-forward block
            z = self.add(z, self.adapter(h, d, adapter_r))
        out = self.layernorm(self.add(z, h), d, train)
        self.keepalive(z, inter) if hf else self.keepalive(z)
        return out

    def bert_layer(self, x: T, g: Geometry, B: int, S: int, train: bool, lora_r: int = 0) -> T:
        return self.ffn_block(self.attention_block(x, g, B, S, train, lora_r), g, train)

    def embeddings(self, g: Geometry, B: int, S: int, train: bool, input_grads: bool = False) -> T:
        """``input_grads``: the word embeddings' output requires grad although they are frozen
        (peft's ``enable_input_require_grads`` under gradient checkpointing)."""
        n = B * S * g.hidden
        word = self._op([], T(n, 4, train or input_grads), param_grad=4 * g.vocab * g.hidden if train else 0)
        typ = self._op([], T(n, 4, train), param_grad=4 * g.type_vocab * g.hidden if train else 0)
        pos = self._op([], T(S * g.hidden, 4, train), param_grad=4 * g.max_positions * g.hidden if train else 0)
        h = self.add(self.add(word, typ), pos)
        return self.dropout(self.layernorm(h, g.hidden, train))

    def head(self, h: T, g: Geometry, B: int, labels: int = 2) -> T:
        """Pooler (first token -> dense -> tanh), dropout, classifier, loss; all trainable."""
        d = g.hidden
        first = self._op([h], T(B * d, h.bpe, h.rg), grad_ins=[h] if h.rg else [])  # select: its grad is (B,S,d)
        pooled = self.act(self.linear(first, d, d, train=True, src=h), "output")
        logits = self.linear(self.dropout(pooled), d, labels, train=True)
        return self.act(self.cast(logits, 4), "output")  # log-softmax + nll (tiny)


# ---------------------------------------------------------------------------------------
# one training step per method


def simulate(g: Geometry, m: Method, B: int, S: int, amp: bool = False, cuda: bool = False) -> int:
    """Peak live bytes of one forward + backward above the pre-step baseline."""
    if m.name.startswith("meft"):
        return _simulate_meft(g, m, B, S, amp, cuda)
    net = Net(amp, cuda)
    train = m.name == "full"
    h = net.embeddings(g, B, S, train, input_grads=m.name == "lora" and m.ckpt)
    if m.name == "sherl":
        h = _sherl_encoder(net, g, m, h, B, S)
    else:
        for i in range(g.layers):
            net.seg = (i,) if m.ckpt else ()  # HF checkpoints each encoder layer
            h = net.bert_layer(h, g, B, S, train, lora_r=m.lora_r if m.name == "lora" else 0)
        net.seg = ()
    loss = net.head(h, g, B)
    mem = Mem()
    forward(mem, net.ops, keep=[loss])
    mem.alloc(loss.nbytes)  # the seed gradient
    backward(mem, net.ops, {loss: G(loss.nbytes)})
    return mem.peak


def _sherl_encoder(net: Net, g: Geometry, m: Method, h0: T, B: int, S: int) -> T:
    """Early route without a graph (its features kept for the side module), side module,
    late layers with autograd (frozen weights). ``m.ckpt``: side module and late layers
    checkpointed, each projection checkpointed on its own inside; ``m.recompute_side``:
    the side module alone."""
    d, s, n = g.hidden, side_width(g, m), B * S
    feats, h = [h0], h0
    for _ in range(g.layers - m.late_layers):
        h = net.bert_layer(h, g, B, S, train=False)  # no grad flows: nothing saved
        feats.append(h)
    recompute = m.ckpt or m.recompute_side
    side = (100,) if recompute else ()
    zs = []
    for i, f in enumerate(feats):
        net.seg = side + ((101 + i,) if recompute else ())
        zs.append(net.layernorm(net.linear(f, d, s, train=True), s, train=True))
    net.seg = side
    L = len(zs) - 1
    shallow = net._op(zs[:-1], T(n * L * s, zs[0].bpe, True), grad_ins=zs[:-1], passthrough=True)  # stack
    deep = zs[-1]
    small = T(3 * n * L + n, 4)  # per-token norms, redundancy, scores, L1 sum kept by the fusion
    u = net._op([shallow, deep], T(n * s, shallow.bpe, True), temps=[small], saves=[shallow, deep, small],
                grad_ins=[shallow, deep], bwd_temp=3 * n * L * L * 4 + n * s * 4)
    out = net.dropout(net.layernorm(net.linear(net.act(u, "output"), s, d, train=True), d, train=True))
    gate = net._op([feats[-1]], T(n * d, 4, True), saves=[feats[-1]])  # tanh(g/T) * h_L
    x = net.add(out, gate)
    for i in range(m.late_layers):
        net.seg = (200 + i,) if m.ckpt else ()
        x = net.bert_layer(x, g, B, S, train=False)
    net.seg = ()
    return x


def _simulate_meft(g: Geometry, m: Method, B: int, S: int, amp: bool, cuda: bool) -> int:
    """The reversible stack (memtl.methods.meft.engine): forward without a graph keeping
    the two streams; backward recomputes G then F of one layer at a time with grad.
    Exact inverse: each stream is its float32 view (what F and G read) plus an int16
    residual (``FixedStream``), the arithmetic runs on int64 temporaries, and the
    remainders of the λ/β scalings (packed, ``RemainderStack``) are held from the
    forward's end."""
    from memtl.methods.meft.engine import RemainderStack, as_fraction

    d, r, n = g.hidden, m.bottleneck, B * S * g.hidden
    variant = m.name
    exact = m.inverse == "exact"
    lam, beta = {"meft1": (0.1, 1.0), "meft2": (1.0, 0.1), "meft3": (0.1, 0.1)}[variant]
    radices = [q for f in (lam, beta) if (q := as_fraction(f)[1]) != 1] * g.layers
    remainder_bytes = RemainderStack(radices).bytes_per_element * B * S * d

    def block(which: str, x: T) -> tuple[list[Op], T]:
        net = Net(amp, cuda)
        if which == "layer":  # the whole pre-trained layer with its FFN adapter
            y = net.ffn_block(net.attention_block(x, g, B, S, train=False), g, train=False, adapter_r=r, hf=False)
        elif which == "adapter":
            y = net.adapter(x, d, r)
        elif which == "attn":
            y = net.attention_block(x, g, B, S, train=False, adapter_r=r)
        else:
            y = net.ffn_block(x, g, train=False, adapter_r=r, hf=False)
        return net.ops, y

    f_kind, g_kind = {"meft1": ("layer", "adapter"), "meft2": ("adapter", "layer"), "meft3": ("attn", "ffn")}[variant]
    mem = Mem()
    # a stream is a float32 tensor; exact adds its int16 residual, allocated and freed with it
    residual = 2 * n if exact else 0
    emb = Net(amp, cuda)
    h0 = emb.embeddings(g, B, S, train=False)
    forward(mem, emb.ops, keep=[h0])  # frozen: nothing saved

    def new(k: int = 1, bpe: int = 4) -> T:
        t = T(n, bpe)
        t.refs = k
        mem.alloc(t.nbytes)
        return t

    def new_stream(k: int = 1) -> T:
        mem.alloc(residual)
        return new(k)

    def release(t: T) -> None:  # a stream's reference dropped
        _unref(mem, t)
        if t.refs == 0:
            mem.free(residual)

    def view(x: T) -> T:  # what F and G read: the stream (exact: its float view, a part of it)
        x.refs += 1
        return x

    def run(kind: str, x: T, grad: bool) -> tuple[list[Op], T, T]:
        v = view(x)
        if grad:  # the recompute's input is a leaf that requires grad
            _requires_grad(v)
        ops, y = block(kind, v)
        forward(mem, ops, grad=grad, keep=[y])
        if not grad:
            _unref(mem, v)
        return ops, y, v

    def combine(out: T) -> T:
        """scaled_add / unscaled_sub: the F/G output added to a stream makes the new one;
        the float path makes one temporary, the exact one two int64 ones."""
        temps = [new(bpe=8), new(bpe=8)] if exact else [new()]
        y = new_stream()
        for t in temps:
            _unref(mem, t)
        _unref(mem, out)
        return y

    # forward, no graph: y1 = lam*x1 + F(x2); y2 = beta*x2 + G(y1)
    if exact:
        tmp = new(bpe=8)
        x1 = x2 = new_stream(k=2)  # encode(h0)
        _unref(mem, tmp)
    else:
        x1 = x2 = h0
        h0.refs = 3  # held by the encoder's frame and as both streams
    for _ in range(g.layers):
        _, f, _ = run(f_kind, x2, grad=False)
        y1 = combine(f)
        _, gg, _ = run(g_kind, y1, grad=False)
        y2 = combine(gg)
        release(x1)
        release(x2)
        x1, x2 = (y2, y1) if variant != "meft3" else (y1, y2)
    if exact:
        mem.alloc(remainder_bytes)
    _unref(mem, h0)
    # ctx keeps the final streams until the backward starts; the caller gets them (float)
    # or their float32 views (exact)
    o1, o2 = x1, x2  # the caller's outputs share their (float view's) storage
    x1.refs += 1
    x2.refs += 1
    # (x1 + x2) / 2 -> head, with autograd
    head = Net(amp, cuda)
    hsum = head.add(x1, x2)
    hsum.rg = True
    h = head.scale(hsum)
    loss = head.head(h, g, B)
    forward(mem, head.ops, keep=[loss])
    release(x1)
    release(x2)
    grads = {loss: G(loss.nbytes)}
    mem.alloc(loss.nbytes)
    backward(mem, head.ops, grads)
    # the grad of the averaged streams reaches both streams as one buffer
    do1 = do2 = new(2, bpe=4)
    gy1 = gx2 = None  # the engine's locals keep the previous layer's until rebound
    for i in range(g.layers):
        y1, y2, dy1, dy2 = (o2, o1, do2, do1) if variant != "meft3" else (o1, o2, do1, do2)
        # 1. G(y1) with grad, backprop dy2
        ops, gy, v = run(g_kind, y1, grad=True)
        gr = {gy: G(dy2.nbytes, refs=2)}
        backward(mem, ops, gr)
        if gy1 is not None:
            _unref(mem, gy1)
        gy1 = gr.pop(v, None)
        _unref(mem, v)
        if gy1 is not None:  # dy1 = dy1 + gy1
            ndy1 = new(bpe=4)
            _unref(mem, dy1)
            dy1 = ndy1
        # 2. x2 = (y2 - g) / beta
        x2 = combine(gy)
        release(y2)
        # 3. F(x2) with grad, backprop dy1
        ops, f, v = run(f_kind, x2, grad=True)
        gr = {f: G(dy1.nbytes, refs=2)}
        backward(mem, ops, gr)
        if gx2 is not None:
            _unref(mem, gx2)
        gx2 = gr.pop(v, None)
        _unref(mem, v)
        # 4. x1 = (y1 - f) / lam
        x1 = combine(f)
        release(y1)
        # 5. dx1 = lam*dy1, dx2 = beta*dy2 + gx2
        dx1 = new(bpe=4)
        tmp = new(bpe=4)
        dx2 = new(bpe=4)
        _unref(mem, tmp)
        for t in (dy1, dy2):
            _unref(mem, t)
        o1, o2, do1, do2 = x1, x2, dx1, dx2
    return mem.peak


def _requires_grad(t: T) -> T:
    t.rg = True
    return t


# ---------------------------------------------------------------------------------------
# public API


def estimate(g: Geometry, method: str, batch_size: int, seq_len: int, precision: str = "32",
             device: str = "cuda") -> dict:
    """Predicted memory of one training step (bytes) and what a GPU must hold in total."""
    m = METHODS[method]
    counts = parameter_counts(g, m)
    peak = simulate(g, m, batch_size, seq_len, amp=precision == "bf16-mixed", cuda=device == "cuda")
    params, grads, adamw = 4 * counts["total"], 4 * counts["trainable"], 8 * counts["trainable"]
    opt_step = grads + 4 * counts["trainable"]  # gradients + one temporary of the foreach update
    return {
        "method": method, "backbone": g.name, "layers": g.layers, "hidden": g.hidden,
        "batch_size": batch_size, "seq_len": seq_len, "precision": precision, "device": device,
        "trainable_params": counts["trainable"], "total_params": counts["total"],
        "param_bytes": params, "grad_bytes": grads, "optimizer_bytes": adamw,
        "peak_step_bytes": peak, "total_bytes": params + adamw + max(peak, opt_step),
    }


def parse_size(text: str) -> int:
    """'24GB', '24 GB', '80G', '512MiB', '1.5TB' -> bytes (a bare number means GB)."""
    units = {"": GB, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": GB, "gb": GB, "t": 10**12,
             "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not match or match.group(2).lower() not in units or float(match.group(1)) <= 0:
        raise ConfigError(f"--budget {text!r}: give a size such as 24GB, 80GiB or 512MiB")
    return int(float(match.group(1)) * units[match.group(2).lower()])


# ---------------------------------------------------------------------------------------
# validation against the benchmark

VALIDATE_GEOMETRIES = ["tiny-bert", "minilm-random"]
VALIDATE_SHAPES = ["8x64", "16x128"]


def validate(geometries: list[str], shapes: list[tuple[int, int]], methods: list[str], precision: str,
             device: str = "cpu") -> list[dict]:
    """Run ``memtl bench`` on ``device`` for each configuration and put the prediction beside it."""
    import torch

    from memtl.tools.bench import measure_peak_mib

    measured = []
    for geo in geometries:
        for B, S in shapes:
            for method in methods:
                print(f"[validate] {method} {geo} {B}x{S} {precision} {device} ...", file=sys.stderr, flush=True)
                measured.append({"geometry": geo, "batch_size": B, "seq_len": S, "precision": precision,
                                 "method": method, "device": device,
                                 "peak_step_mib": measure_peak_mib(method, geo, None, B, S, torch.device(device),
                                                                   precision)})
    return compare(measured)


def compare(bench_rows: list[dict]) -> list[dict]:
    """Predicted against measured for rows shaped like ``memtl bench``'s (geometry, method,
    batch_size, seq_len, precision, device, peak_step_mib), each with its device's kernels.
    Rows the estimator cannot model (other architectures, method specs it lacks) are left out."""
    from memtl.geometries import GEOMETRIES

    rows = []
    for r in bench_rows:
        modelled = r["geometry"] in GEOMETRIES and GEOMETRIES[r["geometry"]][0] in ("bert", "roberta")
        if not modelled or r["method"] not in METHODS or not r.get("peak_step_mib"):
            continue
        device = str(r.get("device", "cpu")).split(":")[0]
        predicted = simulate(load_geometry(r["geometry"]), METHODS[r["method"]], r["batch_size"], r["seq_len"],
                             amp=r["precision"] == "bf16-mixed", cuda=device == "cuda") / MIB
        rows.append({"geometry": r["geometry"], "batch_size": r["batch_size"], "seq_len": r["seq_len"],
                     "precision": r["precision"], "device": device, "method": r["method"],
                     "measured_mib": r["peak_step_mib"], "predicted_mib": predicted,
                     "error": predicted / r["peak_step_mib"] - 1})
    return rows


# ---------------------------------------------------------------------------------------
# command line


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(prog="memtl estimate", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="minilm",
                   help="minilm, bert-base(-uncased), bert-large-uncased, roberta-base, roberta-large, a bench "
                        "geometry (tiny, minilm-random), a path to a config.json, or a hub id in the local cache")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="whose kernels to model (cuda: fused attention, 1-byte dropout masks); default cuda. "
                        "--validate: where to measure (default: cuda when there is one, else cpu)")
    p.add_argument("--budget", default=None, help="memory to fit in, e.g. 24GB, 80GiB")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.add_argument("--validate", action="store_true",
                   help="run memtl bench (on --device) on small configurations and compare with the predictions")
    p.add_argument("--geometries", default=",".join(VALIDATE_GEOMETRIES), help="--validate: bench geometries")
    p.add_argument("--shapes", default=",".join(VALIDATE_SHAPES), help="--validate: BxT list, e.g. 8x64,16x128")
    p.add_argument("--tolerance", type=float, default=0.15, help="--validate: exit 1 if any |error| is above")
    return p.parse_args(argv)


def _check(args) -> tuple[list[str], list[tuple[int, int]]]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown method {', '.join(unknown) or '(none)'} in --methods: "
                          f"choose from {', '.join(METHODS)}")
    for bad, what in ((args.batch_size < 1, "--batch-size"), (args.seq_len < 1, "--seq-len"),
                      (args.layers is not None and args.layers < 1, "--layers")):
        if bad:
            raise ConfigError(f"{what} must be >= 1")
    if not args.tolerance >= 0:
        raise ConfigError(f"--tolerance {args.tolerance}: must be >= 0 (a fraction: 0.15 = 15%)")
    shapes = []
    for s in args.shapes.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)\s*", s)
        if not match or min(map(int, match.groups())) < 1:
            raise ConfigError(f"--shapes {args.shapes!r}: give BxT pairs such as 8x64,16x128")
        shapes.append((int(match.group(1)), int(match.group(2))))
    return methods, shapes


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        methods, shapes = _check(args)
        if args.validate:
            from memtl.geometries import GEOMETRIES

            geos = [x.strip() for x in args.geometries.split(",") if x.strip()]
            encoders = [g for g, (model_type, _) in GEOMETRIES.items() if model_type in ("bert", "roberta")]
            bad = [x for x in geos if x not in encoders]
            if bad or not geos:
                raise ConfigError(f"--geometries: unknown {', '.join(bad) or '(none)'}; "
                                  f"choose from {', '.join(encoders)}")
            import torch

            if args.device is None:
                args.device = "cuda" if torch.cuda.is_available() else "cpu"
            if args.device == "cuda" and not torch.cuda.is_available():
                raise ConfigError("--validate --device cuda: no CUDA device here; use --device cpu")
            return _main_validate(geos, shapes, methods, args)
        args.device = args.device or "cuda"
        g = load_geometry(args.backbone, args.layers)
        budget = parse_size(args.budget) if args.budget is not None else None
        positions = g.max_positions - (2 if g.model_type == "roberta" else 0)
        if args.seq_len > positions:
            raise ConfigError(f"--seq-len {args.seq_len}: {args.backbone} has {positions} positions")
        if any(m.startswith("sherl") for m in methods) and g.layers < 2:
            raise ConfigError(f"--methods sherl: SHERL needs at least 2 layers ({args.backbone} has {g.layers})")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [estimate(g, m, args.batch_size, args.seq_len, args.precision, args.device) for m in methods]
    for r in rows:
        r["fits"] = None if budget is None else r["total_bytes"] <= budget
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    mib = lambda n: f"{n / MIB:,.0f}"  # noqa: E731
    print(f"{g.name}: {g.layers} layers, hidden {g.hidden}, {g.heads} heads, FFN {g.intermediate}; "
          f"batch {args.batch_size} x {args.seq_len}, precision {args.precision}, {args.device} kernels")
    header = ["method", "trainable", "params MiB", "AdamW MiB", "step peak MiB", "total MiB", "total GB", "fits"]
    body = [[r["method"], f"{r['trainable_params']:,}", mib(r["param_bytes"]), mib(r["optimizer_bytes"]),
             mib(r["peak_step_bytes"]), mib(r["total_bytes"]), f"{r['total_bytes'] / GB:.2f}",
             "-" if r["fits"] is None else ("yes" if r["fits"] else "no")] for r in rows]
    print(format_table(header, body))
    print("step peak: activations + gradients during forward + backward, above the pre-step baseline "
          "(what memtl bench measures); total: params + AdamW state + the larger of the step peak and the "
          "optimizer step" + (f"; budget {budget / GB:g} GB (CUDA context not included)" if budget else ""))
    return 0


def _main_validate(geos, shapes, methods, args) -> int:
    rows = validate(geos, shapes, methods, args.precision, args.device)
    body = [[r["geometry"], f"{r['batch_size']}x{r['seq_len']}", r["precision"], r["device"], r["method"],
             f"{r['measured_mib']:.2f}", f"{r['predicted_mib']:.2f}", f"{100 * r['error']:+.1f}%"] for r in rows]
    header = ["geometry", "BxT", "precision", "device", "method", "measured MiB", "predicted MiB", "error"]
    print(format_table(header, body))
    worst = max(abs(r["error"]) for r in rows)
    print(f"max |error| {100 * worst:.1f}% over {len(rows)} configurations (tolerance {100 * args.tolerance:g}%)")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
