"""``memtl recon``: MEFT's reconstruction error against depth, precision and inverse.

Builds random-init models of ``memtl bench``'s geometries, applies each MEFT variant and
measures every reversible stack with ``memtl.methods.meft.diagnostics.reconstruction_report``.
"""
from __future__ import annotations

import contextlib
import itertools

import torch

from memtl.methods.meft import meft_stacks, stack_layers
from memtl.methods.meft.diagnostics import reconstruction_report

def depth_table(variants, depths, precisions, batch_size=4, seq_len=128, seed=0, lam=None, beta=None,
                geometry="minilm-random", inverses=("exact", "float")) -> list[dict]:
    """Worst relative reconstruction error (over layers) per variant x depth x precision, on a
    random-init model of one of ``memtl bench``'s geometries (default: MiniLM-geometry BERT,
    hidden 384, plus the pre-trained MiniLM at depth 6; e.g. bart-base, opt-125m,
    smollm2-random). BART: depth of each stack, one row per stack (``stack`` key). One row
    per inverse (exact | float) of each."""
    from memtl.tools.bench import build_model, make_batch
    from memtl.methods import apply_method

    rows = []
    for variant, inverse in itertools.product(variants, inverses):
        for depth in depths:
            for geo in (["minilm"] if depth == 6 and geometry == "minilm-random" else []) + [geometry]:
                model = build_model(geo, None if geo == "minilm" else depth, seed)
                opts = {k: v for k, v in (("lam", lam), ("beta", beta)) if v is not None}
                # no dropout: the error of the arithmetic alone
                model = apply_method(model, variant, inverse=inverse, **opts).eval()
                cfg = model.config
                eos = cfg.eos_token_id if cfg.model_type == "bart" else None  # BART classifies from its EOS
                batch = make_batch(cfg.vocab_size, batch_size, seq_len, seed, "cpu", eos_token_id=eos)
                stacks = meft_stacks(model)
                for precision in precisions:
                    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed"
                           else contextlib.nullcontext())
                    with ctx:
                        report = reconstruction_report(model, batch)
                    for stack in stacks:
                        label = stack.label if len(stacks) > 1 else None
                        part = [r for r in report if r.get("stack") == label]
                        first = stack_layers(stack)[0]
                        row = {"variant": variant, "inverse": inverse, "geometry": geo,
                               **({"stack": label} if label else {}),
                               "layers": depth, "precision": precision, "lam": first.lam, "beta": first.beta,
                               "worst_rel": max(r["rel"] for r in part), "bottom_rel": part[0]["rel"],
                               "top_rel": part[-1]["rel"]}
                        rows.append(row)
    return rows


def main(argv=None) -> int:
    import json
    import sys

    from memtl.geometries import GEOMETRIES
    from memtl.tools.bench import int_list
    from memtl.cli import ArgumentParser, check_out_file
    from memtl.errors import ConfigError

    p = ArgumentParser(prog="memtl recon", description="MEFT reconstruction error vs depth and precision")
    p.add_argument("--variants", default="meft1,meft2,meft3")
    p.add_argument("--layers", default="6,12,24")
    p.add_argument("--precisions", default="32,bf16-mixed")
    p.add_argument("--inverses", default="exact,float", help="exact (fixed-point streams) and/or float (the paper's)")
    p.add_argument("--lam", type=float, default=None, help="override lambda (default: the variant's)")
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--geometry", default="minilm-random", choices=list(GEOMETRIES),
                   help="random-init model shape from memtl.geometries (minilm-random, the default, adds the "
                        "pre-trained MiniLM at 6 layers)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in ("meft1", "meft2", "meft3")]
    if bad or not variants:
        print(f"error: unknown variant {', '.join(bad) or '(none)'} in --variants: choose from meft1, meft2, meft3",
              file=sys.stderr)
        return 2
    inverses = [x for x in args.inverses.split(",") if x]
    if not inverses or any(x not in ("exact", "float") for x in inverses):
        print("error: --inverses takes exact and/or float", file=sys.stderr)
        return 2
    precisions = [x for x in args.precisions.split(",") if x]
    if not precisions or any(x not in ("32", "bf16-mixed") for x in precisions):
        print("error: --precisions takes 32 and/or bf16-mixed", file=sys.stderr)
        return 2
    try:
        depths = int_list(args.layers, "--layers")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        check_out_file(args.out)
        rows = depth_table(variants, depths, precisions, lam=args.lam, beta=args.beta, geometry=args.geometry,
                           inverses=inverses)
    except ConfigError as e:  # e.g. --lam 0
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [r["geometry"] + (f"/{r['stack']}" if "stack" in r else "") for r in rows]  # bart-base/decoder
    w = max([14, *map(len, names)])
    print(f"{'variant':8} {'inverse':7} {'backbone':{w}} {'L':>3} {'precision':10} {'lam':>5} {'beta':>5} "
          f"{'top layer':>10} {'bottom layer':>12} {'worst':>10}")
    for r, name in zip(rows, names):
        print(f"{r['variant']:8} {r['inverse']:7} {name:{w}} {r['layers']:>3} {r['precision']:10} {r['lam']:>5} "
              f"{r['beta']:>5} "
              f"{r['top_rel']:>10.2e} {r['bottom_rel']:>12.2e} {r['worst_rel']:>10.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
