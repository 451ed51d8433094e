"""Memory estimator: the peak memory of a training step, predicted before running it.

    memtl estimate --backbone bert-base-uncased --methods full,lora+ckpt,meft3 \\
        --batch-size 32 --seq-len 512 --precision bf16-mixed --budget 24GB
    memtl estimate --validate          # predicted vs measured (memtl bench, CPU) on small configs

Only the Hugging Face config is needed, never the weights. The estimator runs the real
model without its memory: it is built from the config on the meta device, the method is
applied by its own code (``apply_method``), its parameters and buffers become fake tensors
(``FakeTensorMode``: shape, dtype and device, no data), and ``memtl bench``'s training step
runs on them (``MethodUnderTest``: the same batch, autocast, warm-up step, then the
measured forward + backward). ``LiveBytes``, a ``TorchDispatchMode``, sees each storage the
step creates and its death; the peak of the live bytes above the pre-step baseline is what
``memtl bench`` measures (docs/DESIGN.md §4). Three rules keep the fake step on the real
one's path (docs/ESTIMATE.md):

* tensors no larger than the batch (ids, masks, positions) are real, so that the code that
  reads values (Hugging Face dropping an all-ones mask, BART finding its EOS tokens) reads
  the batch's; everything larger is fake;
* autograd sums two gradients of one tensor in place when it holds the first alone, but
  never into a tensor subclass: on fake tensors its out-of-place sum is taken back when the
  first gradient dies at once;
* MEFT's exact inverse reads values three times; on fake tensors each takes its usual
  branch (``memtl.methods.meft.engine._has_values``).

Two figures per method:

* peak step memory - what ``memtl bench`` measures: the peak of live bytes during forward +
  backward above the pre-step baseline, parameter gradients included (the benchmark
  zeroes them with ``set_to_none``); parameters and AdamW state are not.
* total - what the device must hold: parameters + AdamW state (two fp32 moments per
  trainable parameter) + the larger of the step's peak and the optimizer step (gradients +
  one parameter-sized temporary). ``fits`` compares it with ``--budget``; the CUDA context
  (~0.5 GB) and allocator fragmentation are not included.

Validated on CPU (``--validate``, docs/ESTIMATE.md); ``--device cuda`` runs the model's CUDA
code on fake CUDA tensors, which needs a CUDA device, and is not validated.
"""
from __future__ import annotations

import json
import os
import re
import sys
import weakref

from memtl.cli import ArgumentParser
from memtl.errors import ConfigError
from memtl.tools.registry import METHOD_SPECS

MIB = 2**20
GB = 10**9
METHODS = list(METHOD_SPECS)


def _bert(h, l, heads, i, model_type="bert", **kw):
    return dict(model_type=model_type, hidden_size=h, num_hidden_layers=l, num_attention_heads=heads,
                intermediate_size=i, **kw)


# configs known offline (the hub's config.json shapes; no download needed)
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


def load_backbone(backbone: str, layers: int | None = None):
    """The ``transformers`` config of ``backbone``: a ``memtl.geometries`` name, a known hub
    config, a path to a config.json or model folder, or a hub id in the local cache.
    ``layers`` sets the depth of every stack."""
    from memtl.geometries import CONFIG_CLASSES, DEPTH_KEYS, GEOMETRIES, build_config

    name = ALIASES.get(backbone, backbone)
    if backbone in GEOMETRIES:
        return build_config(backbone, layers)
    if name in KNOWN_CONFIGS:
        cfg = dict(KNOWN_CONFIGS[name])
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
    model_type = cfg.pop("model_type", "bert")
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(f"--backbone {backbone}: model type {model_type!r} is not supported; the estimator "
                          f"runs {', '.join(sorted(CONFIG_CLASSES))} (memtl's geometries and methods)")
    if layers:
        cfg.update({k: layers for k in DEPTH_KEYS.get(model_type, ("num_hidden_layers",))})
    import transformers

    return getattr(transformers, CONFIG_CLASSES[model_type])(**cfg)


def _hub_config(name: str) -> dict:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from memtl.geometries import GEOMETRIES

    hf_logging.set_verbosity_error()
    try:
        return AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError):
        known = sorted({*KNOWN_CONFIGS, *ALIASES, *GEOMETRIES})
        raise ConfigError(f"--backbone {name}: not a known config ({', '.join(known)}), not a path to a "
                          "config.json, and not in the local Hugging Face cache") from None


def _positions(config) -> int | None:
    """Learned positions a sequence may use (None: rotary, no table)."""
    if config.model_type == "llama":
        return None
    return config.max_position_embeddings - (2 if config.model_type == "roberta" else 0)


# ---------------------------------------------------------------------------------------
# the step on fake tensors


def _engine_code():
    from torch.autograd import graph

    return graph._engine_run_backward.__code__


def _wrapper_files() -> set[str]:
    """Frames between a dispatch mode and the code that called the op."""
    import torch._compile
    import torch._dynamo.eval_frame

    return {torch._dynamo.eval_frame.__file__, torch._compile.__file__}


def _caller_is_engine(code, wrappers) -> bool:
    frame = sys._getframe(2)  # above _caller_is_engine and __torch_dispatch__
    while frame is not None and frame.f_code.co_filename in wrappers:
        frame = frame.f_back
    return frame is not None and frame.f_code is code


def live_bytes_mode(fake, small_bytes: int, rounding: int = 1):
    """A ``LiveBytes`` mode (the class needs torch, imported here, not at module load)."""
    import torch
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, is_fake
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import arg_tree_leaves, tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    aten = torch.ops.aten
    indexed = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
    engine, wrappers = _engine_code(), _wrapper_files()

    class LiveBytes(TorchDispatchMode):
        """Live bytes of the tensor storages made while active: a storage counts from the op
        that makes it until it is freed (a weak reference's callback), rounded up to
        ``rounding`` bytes (CUDA's allocator: 512). Ops run on fake tensors, but an op on real
        tensors only whose outputs take at most ``small_bytes`` runs for real, and so does one
        whose output shape depends on its inputs' values (e.g. nonzero on a mask)."""

        def __init__(self):
            super().__init__()
            self.live = self.peak = self.base = 0
            self.real_live = self.real_peak = 0  # real storages: the estimate's own memory
            self._storages = WeakIdKeyDictionary()
            self._pending = None  # (the first gradient's storage, its bytes, live bytes after the sum)

        def hold(self, tensors) -> None:
            """Storages made before it started (the model's): views of them are not new."""
            for t in tensors:
                self._track(t)

        def reset(self) -> None:
            """The measured step starts: its baseline is what lives now."""
            self.settle()
            self.base = self.peak = self.live

        def settle(self) -> None:
            if self._pending is not None:
                ref, nbytes, live = self._pending
                self._pending = None
                # the first gradient died at once: the real engine would have summed in place
                self.peak = max(self.peak, live - nbytes if ref() is None else live)

        def _add(self, rec: list, nbytes: int) -> None:
            self.live += nbytes
            if rec[1]:
                self.real_live += nbytes
                self.real_peak = max(self.real_peak, self.real_live)

        def _track(self, t) -> None:
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # no storage (sparse, nested)
                return
            n = -(-st.nbytes() // rounding) * rounding
            rec = self._storages.get(st)
            if rec is None:
                rec = self._storages[st] = [0, not is_fake(t)]
                weakref.finalize(st, lambda r=rec: self._add(r, -r[0])).atexit = False
            if rec[0] != n:  # new, or resized in place
                self._add(rec, n - rec[0])
                rec[0] = n

        def _runs_real(self, func, args, kwargs) -> bool:
            try:
                with fake:
                    shapes = func(*args, **kwargs)
            except (DynamicOutputShapeException, DataDependentOutputException):
                return True
            return sum(t.untyped_storage().nbytes() for t in tree_leaves(shapes)
                       if isinstance(t, torch.Tensor)) <= small_bytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.settle()
            tensors = [a for a in arg_tree_leaves(*args, **kwargs) if isinstance(a, torch.Tensor)]
            if not any(is_fake(t) for t in tensors) and self._runs_real(func, args, kwargs):
                out = func(*args, **kwargs)
            else:
                if func in indexed and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and not is_fake(i)
                                           for i in args[1]):
                    # a real boolean mask indexes fake data: its positions, as ATen takes them
                    positions = []
                    for i in args[1]:
                        is_mask = isinstance(i, torch.Tensor) and i.dtype == torch.bool
                        positions += list(i.nonzero().unbind(1)) if is_mask else [i]
                    args = (args[0], positions, *args[2:])
                with fake:
                    out = func(*args, **kwargs)
            # autograd's sum of two gradients of one tensor (InputBuffer): in place on real
            # tensors when it holds the first alone, out of place on fake ones
            summed = (func is aten.add.Tensor and kwargs.get("alpha", 1) == 1 and not torch.is_grad_enabled()
                      and is_fake(args[0]) and _caller_is_engine(engine, wrappers))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._track(t)
            if summed:
                st = args[0].untyped_storage()
                self._pending = (weakref.ref(st), self._storages.get(st, [0])[0], self.live)
            else:
                self.peak = max(self.peak, self.live)
            return out

    return LiveBytes()


def fake_model(config, label: str, fake, device):
    """The method's model on ``config``: built on the meta device by the real code, then each
    parameter and buffer (and tensor attribute) replaced by a fake one on ``device``, tied
    ones staying tied."""
    import copy

    import torch
    import torch.nn as nn

    from memtl.methods import apply_method
    from memtl.tools.bench import model_from_config

    name, options = METHOD_SPECS[label]
    with torch.device("meta"):
        model = apply_method(model_from_config(copy.deepcopy(config)), name, **options)
    done: dict[int, tuple] = {}  # id(meta tensor) -> (meta tensor, its fake)

    def fake_of(t, parameter: bool):
        if id(t) not in done:
            with fake:
                f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            done[id(t)] = (t, nn.Parameter(f, requires_grad=t.requires_grad) if parameter else f)
        return done[id(t)][1]

    for module in model.modules():
        for table, parameter in ((module._parameters, True), (module._buffers, False)):
            for key, t in table.items():
                if t is not None:
                    table[key] = fake_of(t, parameter)
        for key, t in list(vars(module).items()):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                setattr(module, key, fake_of(t, False))
    return model


def measure_step(config, label: str, batch_size: int, seq_len: int, precision: str = "32",
                 device: str = "cpu") -> dict:
    """One ``memtl bench`` step of method ``label`` on ``config``, on fake tensors: the step's
    peak bytes above its baseline, the real bytes the estimate itself held at most, and the
    model's parameter counts and bytes."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtl.methods import count_parameters
    from memtl.tools.bench import MethodUnderTest

    dev = torch.device(device)
    fake = FakeTensorMode(allow_non_fake_inputs=True, allow_fallback_kernels=False)
    model = fake_model(config, label, fake, dev)
    counts = count_parameters(model)
    params = {id(p): p for p in model.parameters()}.values()
    live = live_bytes_mode(fake, small_bytes=8 * batch_size * seq_len, rounding=512 if dev.type == "cuda" else 1)
    live.hold([*model.parameters(), *model.buffers()])
    with live:
        run = MethodUnderTest(label, None, None, batch_size, seq_len, dev, precision, seed=0, model=model)
        live.reset()
        run.fwd_bwd()
        live.settle()
    return {"peak_step_bytes": live.peak - live.base, "real_bytes": live.real_peak,
            "trainable_params": counts["trainable"], "total_params": counts["total"],
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad)}


# ---------------------------------------------------------------------------------------
# public API


def estimate(config, method: str, batch_size: int, seq_len: int, precision: str = "32", device: str = "cpu",
             backbone: str | None = None) -> dict:
    """Predicted memory of one training step (bytes) and what the device must hold in total."""
    m = measure_step(config, method, batch_size, seq_len, precision, device)
    adamw = 8 * m["trainable_params"]  # two fp32 moments per trainable parameter
    opt_step = 2 * m["grad_bytes"]  # gradients + one temporary of the foreach update
    return {
        "method": method, "backbone": backbone or config.model_type, "model_type": config.model_type,
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "batch_size": batch_size,
        "seq_len": seq_len, "precision": precision, "device": device, **m, "optimizer_bytes": adamw,
        "total_bytes": m["param_bytes"] + adamw + max(m["peak_step_bytes"], opt_step),
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

VALIDATE_GEOMETRIES = ["tiny-bert", "tiny-bart", "tiny-opt", "tiny-llama", "minilm-random"]
VALIDATE_SHAPES = ["8x64", "16x128"]
TOLERANCE = 0.10


def validate(geometries: list[str], shapes: list[tuple[int, int]], methods: list[str], precision: str,
             device: str = "cpu", layers: int | None = None) -> list[dict]:
    """Run ``memtl bench`` on ``device`` for each configuration and put the prediction beside it.
    On the CPU with one thread: a CPU kernel's scratch, which the estimator cannot see, grows
    with the threads (flash attention's under bf16 autocast: -15% at 4 threads on tiny-llama,
    nothing at BERT-base sizes; docs/ESTIMATE.md)."""
    import torch

    from memtl.tools.bench import measure_peak_mib

    measured = []
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        for geo in geometries:
            depth = load_backbone(geo, layers).num_hidden_layers
            for B, S in shapes:
                for method in methods:
                    print(f"[validate] {method} {geo} L={depth} {B}x{S} {precision} {device} ...", file=sys.stderr,
                          flush=True)
                    peak = measure_peak_mib(method, geo, layers, B, S, torch.device(device), precision)
                    measured.append({"geometry": geo, "layers": depth, "batch_size": B, "seq_len": S,
                                     "precision": precision, "method": method, "device": device,
                                     "peak_step_mib": peak})
    finally:
        torch.set_num_threads(threads)
    return compare(measured)


def compare(bench_rows: list[dict]) -> list[dict]:
    """Predicted against measured for rows shaped like ``memtl bench``'s (geometry, layers,
    method, batch_size, seq_len, precision, device, peak_step_mib), each predicted on its
    device. Rows of a geometry outside ``memtl.geometries`` (the pre-trained MiniLM) or
    without a measurement are left out."""
    from memtl.geometries import GEOMETRIES

    rows = []
    for r in bench_rows:
        if r["geometry"] not in GEOMETRIES or r["method"] not in METHOD_SPECS or not r.get("peak_step_mib"):
            continue
        device = str(r.get("device", "cpu")).split(":")[0]
        config = load_backbone(r["geometry"], r.get("layers"))
        predicted = measure_step(config, r["method"], r["batch_size"], r["seq_len"], r["precision"],
                                 device)["peak_step_bytes"] / MIB
        rows.append({"geometry": r["geometry"], "layers": config.num_hidden_layers, "batch_size": r["batch_size"],
                     "seq_len": r["seq_len"], "precision": r["precision"], "device": device, "method": r["method"],
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
                   help="a memtl geometry (tiny-bert, tiny-bart, tiny-opt, tiny-llama, minilm-random, bert-base, "
                        "bart-base, opt-125m, opt-350m, smollm2-random, ...), a known hub config (minilm, "
                        "bert-base(-uncased), bert-large-uncased, roberta-base, roberta-large), a path to a "
                        "config.json, or a hub id in the local cache (bert, roberta, bart, opt, llama)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (--validate: of every "
                                                            "geometry)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="the device whose code runs the step (cpu, the default, is the validated one; cuda needs a "
                        "CUDA device and is not validated); --validate: where to measure")
    p.add_argument("--budget", default=None, help="memory to fit in, e.g. 24GB, 80GiB")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.add_argument("--validate", action="store_true",
                   help="run memtl bench (on --device; the CPU with one thread) on small configurations and "
                        "compare with the predictions")
    p.add_argument("--geometries", default=",".join(VALIDATE_GEOMETRIES), help="--validate: bench geometries")
    p.add_argument("--shapes", default=",".join(VALIDATE_SHAPES), help="--validate: BxT list, e.g. 8x64,16x128")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="--validate: exit 1 if any |error| is above")
    return p.parse_args(argv)


def _check(args) -> tuple[list[str], list[tuple[int, int]]]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_SPECS]
    if unknown or not methods:
        raise ConfigError(f"unknown method {', '.join(unknown) or '(none)'} in --methods: "
                          f"choose from {', '.join(METHODS)}")
    for bad, what in ((args.batch_size < 1, "--batch-size"), (args.seq_len < 1, "--seq-len"),
                      (args.layers is not None and args.layers < 1, "--layers")):
        if bad:
            raise ConfigError(f"{what} must be >= 1")
    if not args.tolerance >= 0:
        raise ConfigError(f"--tolerance {args.tolerance}: must be >= 0 (a fraction: 0.1 = 10%)")
    shapes = []
    for s in args.shapes.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)\s*", s)
        if not match or min(map(int, match.groups())) < 1:
            raise ConfigError(f"--shapes {args.shapes!r}: give BxT pairs such as 8x64,16x128")
        shapes.append((int(match.group(1)), int(match.group(2))))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{'--validate ' if args.validate else ''}--device cuda: no CUDA device here; use "
                              "--device cpu")
    return methods, shapes


def _check_fits(name: str, config, methods: list[str], seq_len: int) -> None:
    positions = _positions(config)
    if positions is not None and seq_len > positions:
        raise ConfigError(f"--seq-len {seq_len}: {name} has {positions} positions")
    if any(METHOD_SPECS[m][0] == "sherl" for m in methods) and config.num_hidden_layers < 2:
        raise ConfigError(f"--methods sherl: SHERL needs at least 2 layers ({name} has {config.num_hidden_layers})")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        methods, shapes = _check(args)
        if args.validate:
            from memtl.geometries import GEOMETRIES

            geos = [x.strip() for x in args.geometries.split(",") if x.strip()]
            bad = [x for x in geos if x not in GEOMETRIES]
            if bad or not geos:
                raise ConfigError(f"--geometries: unknown {', '.join(bad) or '(none)'}; "
                                  f"choose from {', '.join(GEOMETRIES)}")
            for geo in geos:
                _check_fits(geo, load_backbone(geo, args.layers), methods, max(s for _, s in shapes))
            return _main_validate(geos, shapes, methods, args)
        config = load_backbone(args.backbone, args.layers)
        budget = parse_size(args.budget) if args.budget is not None else None
        _check_fits(args.backbone, config, methods, args.seq_len)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [estimate(config, m, args.batch_size, args.seq_len, args.precision, args.device, args.backbone)
            for m in methods]
    for r in rows:
        r["fits"] = None if budget is None else r["total_bytes"] <= budget
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    mib = lambda n: f"{n / MIB:,.0f}"  # noqa: E731
    print(f"{args.backbone}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}; "
          f"batch {args.batch_size} x {args.seq_len}, precision {args.precision}, on {args.device}")
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
    rows = validate(geos, shapes, methods, args.precision, args.device, args.layers)
    body = [[r["geometry"], str(r["layers"]), f"{r['batch_size']}x{r['seq_len']}", r["precision"], r["device"],
             r["method"], f"{r['measured_mib']:.2f}", f"{r['predicted_mib']:.2f}", f"{100 * r['error']:+.1f}%"]
            for r in rows]
    header = ["geometry", "L", "BxT", "precision", "device", "method", "measured MiB", "predicted MiB", "error"]
    print(format_table(header, body))
    worst = max(abs(r["error"]) for r in rows)
    print(f"max |error| {100 * worst:.1f}% over {len(rows)} configurations (tolerance {100 * args.tolerance:g}%)")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
