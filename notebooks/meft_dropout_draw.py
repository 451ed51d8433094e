"""MEFT's CPU dropout draw, and what full fine-tuning would gain from the same draw.

MEFT's BERT layers draw dropout masks with ``memtl.methods.meft.dropout`` on CPU (MEFT
draws every mask twice: forward and recompute). This measures, in one process with
interleaved steps, full fine-tuning as Hugging Face runs it, MEFT1/2/3, and full
fine-tuning with every ``F.dropout`` call replaced by the same cheaper draw. All models
use eager attention here, so that the attention-probability dropout of full fine-tuning
goes through ``F.dropout`` too.

    python notebooks/meft_dropout_draw.py                 # MiniLM 16 x 128, 9 steps
    python notebooks/meft_dropout_draw.py --steps 5 --geometry minilm-random
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F

import memtl.bench as bench
from memtl.methods.meft.dropout import dropout as cheap_dropout

TORCH_DROPOUT = F.dropout


@contextlib.contextmanager
def cheap_draws():
    """Every F.dropout call (nn.Dropout, eager attention) takes MEFT's CPU draw."""
    F.dropout = lambda x, p=0.5, training=True, inplace=False: cheap_dropout(x, p, training)
    try:
        yield
    finally:
        F.dropout = TORCH_DROPOUT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="minilm", help="as memtl bench --geometry")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=9)
    args = ap.parse_args()

    build = bench.build_model

    def eager(*a, **k):
        model = build(*a, **k)
        model.config._attn_implementation = "eager"
        return model

    bench.build_model = eager
    shape = (args.geometry, None, args.batch_size, args.seq_len, torch.device("cpu"), "32", 0)
    runs = {s: bench.MethodUnderTest(s, *shape) for s in ("full", "meft1", "meft2", "meft3")}
    with cheap_draws():
        runs["full, cheap draws"] = bench.MethodUnderTest("full", *shape)
    for _ in range(args.steps):
        for name, m in runs.items():
            with cheap_draws() if name == "full, cheap draws" else contextlib.nullcontext():
                m.timed_step()
    full = statistics.median(runs["full"].wall)
    print(f"{'method':18s} {'step s':>7s} {'/ full':>7s} {'/ full, cheap draws':>20s}")
    cheap = statistics.median(runs["full, cheap draws"].wall)
    for name, m in runs.items():
        t = statistics.median(m.wall)
        print(f"{name:18s} {t:7.3f} {t / full:7.2f} {t / cheap:20.2f}")


if __name__ == "__main__":
    main()
