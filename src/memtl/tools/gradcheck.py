"""``memtl gradcheck``: how exact is the reversible backward? The tables of the MEFT issues.

For every variant and backbone, the gradients of every trainable parameter with the
reversible backward against plain autograd through the same maths (``num_rev_layers=0``),
as the worst relative error over parameters (‖g_rev − g_plain‖ / ‖g_plain‖), for both
inverses (``exact``: fixed-point streams; ``float``: the paper's division):

* float64, tiny random BERT and RoBERTa (4 layers, hidden 32), BART (2 encoder + 2 decoder
  layers, both stacks reversible: the encoder adapters' gradients come through the
  decoder's encoder-output gradient), OPT (pre-LayerNorm; and the post-LayerNorm OPT-350m
  form with in/out projections) and LLaMA (3 layers each), dropout off, a padded batch:
  all layers reversible, and the bottom half (partial); with dropout on (0.1, same seed,
  so the recompute must replay the forward's masks);
* float32 at depth: the same architectures with 24 layers (BART: 24 + 24), hidden 64,
  Hugging Face's random init, dropout 0.1;
* the pre-trained MiniLM (6 layers) in float32, dropout off — what training here gets;
* with ``--smollm2``: SmolLM2-135M's real weights, all 30 layers, float32.

    memtl gradcheck                    # all but SmolLM2 (~1 min on CPU)
    memtl gradcheck --skip-minilm      # the tiny models only
"""
from __future__ import annotations

import copy
import json
import sys

import torch

from memtl.cli import ArgumentParser, check_out_file
from memtl.errors import ConfigError
from memtl.methods import apply_method
from memtl.methods.meft import meft_stacks, stack_layers

VARIANTS = ("meft1", "meft2", "meft3")
INVERSES = ("exact", "float")
DEPTH = 24


ARCHS = ("bert", "roberta", "bart", "opt", "opt-350m", "llama")


def _set(model, **attrs):
    for stack in meft_stacks(model):
        for k, v in attrs.items():
            setattr(stack, k, v)
    return model


def _grads(model, batch, seed=0, autocast: torch.dtype | None = None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # seeds the CUDA generators too: both runs draw the same dropout masks
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = model(**batch).loss
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_rel_err(a: dict, b: dict) -> float:
    errs = []
    for k in b:
        scale = b[k].norm()
        errs.append(((a[k] - b[k]).norm() / scale).item() if scale > 0 else a[k].abs().max().item())
    return max(errs)


def tiny_model(arch: str, variant: str, dropout: float, layers: int | None = None, hidden: int = 32,
               dtype: torch.dtype = torch.float64, **opts):
    """A small random model of ``arch`` with MEFT ``variant`` applied, in train mode: the
    ``tiny-*`` geometry of ``memtl.geometries`` at width ``hidden`` (FFN ``2 * hidden``), with
    ``dropout`` everywhere, 120 tokens, 64 positions and 3 labels.
    ``layers``: depth of every stack (None: 4 for BERT/RoBERTa, 2 + 2 for BART, 3 otherwise)."""
    import transformers

    from memtl.geometries import build_config

    common = dict(vocab_size=120, max_position_embeddings=64, num_labels=3, pad_token_id=PAD[arch])
    ffn = 2 * hidden
    if arch in ("bert", "roberta"):
        cls = "BertForSequenceClassification" if arch == "bert" else "RobertaForSequenceClassification"
        cfg = build_config(f"tiny-{arch}", layers or 4, hidden_size=hidden, intermediate_size=ffn,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **common)
    elif arch == "bart":
        cls = "BartForSequenceClassification"
        cfg = build_config("tiny-bart", layers or 2, d_model=hidden, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                           dropout=dropout, attention_dropout=dropout, activation_dropout=dropout, bos_token_id=0,
                           eos_token_id=EOS, decoder_start_token_id=EOS, **common)
    elif arch in ("opt", "opt-350m"):  # opt-350m: post-LayerNorm, embeddings projected in and out
        cls = "OPTForSequenceClassification"
        cfg = build_config("tiny-opt", layers or 3, hidden_size=hidden, ffn_dim=ffn, dropout=dropout,
                           attention_dropout=dropout, do_layer_norm_before=arch == "opt",
                           word_embed_proj_dim=hidden // 2 if arch == "opt-350m" else hidden, **common)
    else:  # llama: no hidden dropout; attention dropout (and the adapters') carry the masks
        cls = "LlamaForSequenceClassification"
        cfg = build_config("tiny-llama", layers or 3, hidden_size=hidden, intermediate_size=ffn,
                           attention_dropout=dropout, tie_word_embeddings=False, **common)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg).to(dtype)
    return apply_method(model, variant, **opts).train()


PAD = {"bert": 0, "roberta": 1, "bart": 1, "opt": 1, "opt-350m": 1, "llama": 0}
EOS = 2  # BART classifies from the representation of each row's (single) EOS token


def padded_batch(vocab: int, pad: int, n: int = 4, length: int = 12, labels: int = 3, seed: int = 1,
                 eos: int | None = None):
    """Right-padded rows of different lengths; ``eos``: end each row's real tokens with it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(1, n):
        mask[i, length - 2 * i:] = 0
    if eos is not None:
        ids[torch.arange(n), mask.sum(1) - 1] = eos
    ids[mask == 0] = pad
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % labels}


def rev_vs_plain(model, batch, num_rev: int | None, seed: int = 0) -> float:
    plain = _set(copy.deepcopy(model), num_rev_layers=0)
    deepest = max(len(stack_layers(s)) for s in meft_stacks(model))
    _set(model, num_rev_layers=num_rev if num_rev is not None else deepest)
    return max_rel_err(_grads(model, batch, seed), _grads(plain, batch, seed))


def on_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# what the oracles hold each comparison to (``oracle_rows``): float64 is exact up to
# rounding; float32 at depth sits near 1e-6 on CPU; under bf16 autocast the reversible
# gradients must be no further from float32 plain autograd than plain autograd under bf16 is
TOL_FLOAT64 = 1e-10
TOL_FLOAT32_DEEP = 1e-4
TOL_BF16_RATIO = 1.5


def oracle_rows(device, depth: int = DEPTH, hidden: int = 64, archs=ARCHS, variants=VARIANTS,
                progress=None) -> list[dict]:
    """The reversible backward against plain autograd on ``device``, one row per
    architecture x variant: float64 with dropout 0.1 (masks replayed from the device's RNG)
    for both inverses, then the exact inverse at ``depth`` layers in float32 and under bf16
    autocast. ``pass`` covers the exact inverse; the float inverse's float64 error is
    reported only (MEFT3 on pre-norm decoders divides by 10^6 per layer)."""
    device = torch.device(device)
    rows = []
    for arch in archs:
        batch = on_device(padded_batch(120, PAD[arch], eos=EOS if arch == "bart" else None), device)
        for variant in variants:
            row = {"variant": variant, "arch": arch, "device": str(device)}
            try:
                _oracles(row, arch, variant, batch, device, depth, hidden)
                ok = row["exact float64 dropout"] <= TOL_FLOAT64
                if "exact float32 deep" in row:
                    ok = ok and row["exact float32 deep"] <= TOL_FLOAT32_DEEP
                    ok = ok and row["exact bf16 deep"] <= TOL_BF16_RATIO * row["plain bf16 deep"]
                row["pass"] = bool(ok)  # a NaN fails every comparison above
            except Exception as e:  # one architecture's error must not hide the others' figures
                row.update({"pass": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def _half(model) -> int:
    return max(len(stack_layers(s)) for s in meft_stacks(model)) // 2 or 1


def _oracles(row: dict, arch: str, variant: str, batch: dict, device, depth: int, hidden: int) -> None:
    for inv in INVERSES:
        model = tiny_model(arch, variant, 0.1, adapter_dropout=0.1, inverse=inv).to(device)
        row[f"{inv} float64 dropout"] = rev_vs_plain(model, batch, None)
    if arch == "roberta":  # same stack as BERT's
        return
    model = tiny_model(arch, variant, 0.1, layers=depth, hidden=hidden, dtype=torch.float32,
                       adapter_dropout=0.1).to(device)
    plain = _set(copy.deepcopy(model), num_rev_layers=0)
    _set(model, num_rev_layers=depth)
    ref = _grads(plain, batch)
    row["exact float32 deep"] = max_rel_err(_grads(model, batch), ref)
    row["plain bf16 deep"] = max_rel_err(_grads(plain, batch, autocast=torch.bfloat16), ref)
    row["exact bf16 deep"] = max_rel_err(_grads(model, batch, autocast=torch.bfloat16), ref)


def table(include_minilm: bool = True, include_smollm2: bool = False, depth: int = DEPTH) -> list[dict]:
    rows = []
    for arch in ARCHS:
        batch = padded_batch(120, PAD[arch], eos=EOS if arch == "bart" else None)
        for variant in VARIANTS:
            row = {"variant": variant, "backbone": f"tiny {arch}"}
            for inv in INVERSES:
                row[f"{inv} all"] = rev_vs_plain(tiny_model(arch, variant, 0.0, inverse=inv), batch, None)
                model = tiny_model(arch, variant, 0.0, inverse=inv)
                row[f"{inv} half"] = rev_vs_plain(model, batch, _half(model))
                row[f"{inv} dropout"] = rev_vs_plain(
                    tiny_model(arch, variant, 0.1, adapter_dropout=0.1, inverse=inv), batch, None)
                if arch != "roberta":  # same stack as BERT's
                    row[f"{inv} fp32 deep"] = rev_vs_plain(
                        tiny_model(arch, variant, 0.1, layers=depth, hidden=64, dtype=torch.float32, inverse=inv),
                        batch, None)
            rows.append(row)
    if include_minilm:
        from memtl.tools.bench import build_model, make_batch

        for variant in VARIANTS:
            row = {"variant": variant, "backbone": "MiniLM (6 layers)"}
            for inv in INVERSES:
                model = apply_method(build_model("minilm", None, 0), variant, inverse=inv)
                model.eval()  # dropout off: the error of the arithmetic alone
                row[f"{inv} fp32"] = rev_vs_plain(model, make_batch(model.config.vocab_size, 4, 128, 0, "cpu"), None)
            rows.append(row)
    if include_smollm2:
        rows += smollm2_rows()
    return rows


def smollm2_rows(length: int = 64, inverses=INVERSES) -> list[dict]:
    """SmolLM2-135M, real weights, all 30 layers reversible, float32, causal-LM loss on text."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from memtl.backbones import load_model, load_tokenizer

    entry = OmegaConf.load(Path(__file__).parents[3] / "conf" / "backbone" / "smollm2_135m.yaml")
    tok = load_tokenizer(entry)
    model = load_model(entry, tokenizer=tok, head="causal_lm")
    rows = []
    text = ("Reversible networks reconstruct each layer's inputs from its outputs, so activations need not be "
            "kept. The capital of France is Paris. Water boils at one hundred degrees Celsius at sea level. ") * 4
    ids = tok(text, return_tensors="pt")["input_ids"][:, :length]
    batch = {"input_ids": ids, "labels": ids}
    for variant in VARIANTS:
        row = {"variant": variant, "backbone": "SmolLM2-135M (30 layers)"}
        for inv in inverses:
            m = apply_method(copy.deepcopy(model), variant, inverse=inv).eval()
            row[f"{inv} fp32"] = rev_vs_plain(m, batch, None)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = ArgumentParser(prog="memtl gradcheck", description=__doc__.split("\n")[0])
    p.add_argument("--skip-minilm", action="store_true", help="only the tiny random models")
    p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M's real weights, 30 layers, float32")
    p.add_argument("--depth", type=int, default=DEPTH, help=f"layers of the float32 models (default {DEPTH})")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    try:
        check_out_file(args.out)  # before the minutes of computing, not after
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.depth < 1:
        print(f"error: --depth {args.depth}: must be >= 1", file=sys.stderr)
        return 2
    rows = table(include_minilm=not args.skip_minilm, include_smollm2=args.smollm2, depth=args.depth)
    cols = [f"{inv} {c}" for inv in INVERSES for c in ("all", "half", "dropout", "fp32 deep", "fp32")]
    cols = [c for c in cols if any(c in r for r in rows)]
    print(f"{'variant':8} {'backbone':24} " + " ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(f"{r['variant']:8} {r['backbone']:24} "
              + " ".join(f"{r[c]:>14.1e}" if c in r else f"{'-':>14}" for c in cols))
    print("max relative error of the trainable parameters' gradients, reversible vs plain autograd: float64 tiny "
          f"models (all layers / bottom half / dropout 0.1), float32 at {args.depth} layers (deep) with dropout 0.1, "
          "float32 pre-trained (dropout off)")
    if args.out:
        try:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
        except OSError as e:
            print(f"error: cannot write --out {args.out}: {e.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
