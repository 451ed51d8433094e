"""``memtl gradcheck``: how exact is the reversible backward? The table of the MEFT issue.

For every variant and backbone, the gradients of every trainable parameter with the
reversible backward against plain autograd through the same maths (``num_rev_layers=0``),
as the worst relative error over parameters (‖g_rev − g_plain‖ / ‖g_plain‖):

* tiny random BERT and RoBERTa (4 layers, hidden 32) in float64, dropout off, a padded
  batch: all layers reversible, and 2 of 4 (partial); with dropout on (0.1, same seed,
  so the recompute must replay the forward's masks);
* the pre-trained MiniLM (6 layers) in float32, dropout off — what training here gets —
  and with ``stream_dtype=float64`` or ``anchor_every`` = 2 / 1 (exact streams kept
  every 2 layers / every layer).

    memtl gradcheck                    # all of it (~1 min on CPU)
    memtl gradcheck --skip-minilm      # the float64 oracle only
"""
from __future__ import annotations

import copy
import json
import sys

import torch

from memtl.cli import ArgumentParser, check_out_file
from memtl.errors import ConfigError
from memtl.methods import apply_method

VARIANTS = ("meft1", "meft2", "meft3")


def _encoder(model):
    from memtl.methods.meft.bert import MeftEncoder

    return next(m for m in model.modules() if isinstance(m, MeftEncoder))


def _grads(model, batch, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_rel_err(a: dict, b: dict) -> float:
    errs = []
    for k in b:
        scale = b[k].norm()
        errs.append(((a[k] - b[k]).norm() / scale).item() if scale > 0 else a[k].abs().max().item())
    return max(errs)


def tiny_model(arch: str, variant: str, dropout: float, **opts):
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    cls, cfg_cls = ((BertForSequenceClassification, BertConfig) if arch == "bert"
                    else (RobertaForSequenceClassification, RobertaConfig))
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, num_labels=3, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, pad_token_id=1 if arch == "roberta" else 0)
    model = cls(cfg).to(torch.float64)
    return apply_method(model, variant, **opts).train()


def padded_batch(vocab: int, pad: int, n: int = 4, length: int = 12, labels: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(1, n):
        mask[i, length - 2 * i:] = 0
    ids[mask == 0] = pad
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % labels}


def rev_vs_plain(model, batch, num_rev: int | None) -> float:
    plain = copy.deepcopy(model)
    _encoder(plain).num_rev_layers = 0
    _encoder(model).num_rev_layers = num_rev
    return max_rel_err(_grads(model, batch), _grads(plain, batch))


def table(include_minilm: bool = True) -> list[dict]:
    rows = []
    for arch in ("bert", "roberta"):
        batch = padded_batch(120, 1 if arch == "roberta" else 0)
        for variant in VARIANTS:
            row = {"variant": variant, "backbone": f"tiny {arch}", "dtype": "float64"}
            row["all layers"] = rev_vs_plain(tiny_model(arch, variant, 0.0), batch, None)
            row["2 of 4 layers"] = rev_vs_plain(tiny_model(arch, variant, 0.0), batch, 2)
            row["dropout 0.1"] = rev_vs_plain(tiny_model(arch, variant, 0.1, adapter_dropout=0.1), batch, None)
            row["anchor every 2"] = rev_vs_plain(tiny_model(arch, variant, 0.0, anchor_every=2), batch, None)
            rows.append(row)
    if include_minilm:
        from memtl.bench import build_model, make_batch

        for variant in VARIANTS:
            row = {"variant": variant, "backbone": "MiniLM (6 layers)", "dtype": "float32"}
            for label, opts in (("all layers", {}), ("stream float64", {"stream_dtype": "float64"}),
                                ("anchor every 2", {"anchor_every": 2}), ("anchor every 1", {"anchor_every": 1})):
                model = apply_method(build_model("minilm", None, 0), variant, **opts)
                model.eval()  # dropout off: the error of the arithmetic alone
                batch = make_batch(model.config.vocab_size, 4, 128, 0, "cpu")
                row[label] = rev_vs_plain(model, batch, None)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = ArgumentParser(prog="memtl gradcheck", description=__doc__.split("\n")[0])
    p.add_argument("--skip-minilm", action="store_true", help="only the float64 tiny-model oracle")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    try:
        check_out_file(args.out)  # before the minutes of computing, not after
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = table(include_minilm=not args.skip_minilm)
    cols = ["all layers", "2 of 4 layers", "dropout 0.1", "stream float64", "anchor every 2", "anchor every 1"]
    print(f"{'variant':8} {'backbone':18} {'dtype':8} " + " ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(f"{r['variant']:8} {r['backbone']:18} {r['dtype']:8} "
              + " ".join(f"{r[c]:>14.1e}" if c in r else f"{'-':>14}" for c in cols))
    print("max relative error of the trainable parameters' gradients, reversible vs plain autograd")
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
