"""``memtl gradcheck``: how exact is the reversible backward? The table of the MEFT issue.

For every variant and backbone, the gradients of every trainable parameter with the
reversible backward against plain autograd through the same maths (``num_rev_layers=0``),
as the worst relative error over parameters (‖g_rev − g_plain‖ / ‖g_plain‖):

* tiny random BERT and RoBERTa (4 layers, hidden 32), BART (2 encoder + 2 decoder layers,
  both stacks reversible: the encoder adapters' gradients come through the decoder's
  encoder-output gradient), OPT (pre-LayerNorm; and the post-LayerNorm OPT-350m form with
  in/out projections) and LLaMA (3 layers each) in float64, dropout off, a padded batch:
  all layers reversible, and the bottom half (partial); with dropout on (0.1, same seed,
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
from memtl.methods.meft import meft_stacks, stack_layers

VARIANTS = ("meft1", "meft2", "meft3")


ARCHS = ("bert", "roberta", "bart", "opt", "opt-350m", "llama")


def _set(model, **attrs):
    for stack in meft_stacks(model):
        for k, v in attrs.items():
            setattr(stack, k, v)
    return model


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
    import transformers

    common = dict(vocab_size=120, max_position_embeddings=64, num_labels=3)
    if arch in ("bert", "roberta"):
        cls = "BertForSequenceClassification" if arch == "bert" else "RobertaForSequenceClassification"
        cfg = getattr(transformers, "BertConfig" if arch == "bert" else "RobertaConfig")(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=PAD[arch], **common)
    elif arch == "bart":
        cls = "BartForSequenceClassification"
        cfg = transformers.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                      dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
                                      pad_token_id=PAD[arch], bos_token_id=0, eos_token_id=EOS,
                                      decoder_start_token_id=EOS, **common)
    elif arch in ("opt", "opt-350m"):
        cls = "OPTForSequenceClassification"
        cfg = transformers.OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
                                     dropout=dropout, attention_dropout=dropout, pad_token_id=PAD[arch],
                                     do_layer_norm_before=arch == "opt",
                                     word_embed_proj_dim=16 if arch == "opt-350m" else 32, **common)
    else:  # llama: no hidden dropout; attention dropout (and the adapters') carry the masks
        cls = "LlamaForSequenceClassification"
        cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, attention_dropout=dropout,
                                       pad_token_id=PAD[arch], **common)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg).to(torch.float64)
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


def rev_vs_plain(model, batch, num_rev: int | None) -> float:
    plain = _set(copy.deepcopy(model), num_rev_layers=0)
    deepest = max(len(stack_layers(s)) for s in meft_stacks(model))
    _set(model, num_rev_layers=num_rev if num_rev is not None else deepest)
    return max_rel_err(_grads(model, batch), _grads(plain, batch))


def _half(model) -> int:
    return max(len(stack_layers(s)) for s in meft_stacks(model)) // 2 or 1


def table(include_minilm: bool = True) -> list[dict]:
    rows = []
    for arch in ARCHS:
        batch = padded_batch(120, PAD[arch], eos=EOS if arch == "bart" else None)
        for variant in VARIANTS:
            row = {"variant": variant, "backbone": f"tiny {arch}", "dtype": "float64"}
            row["all layers"] = rev_vs_plain(tiny_model(arch, variant, 0.0), batch, None)
            model = tiny_model(arch, variant, 0.0)
            row["bottom half"] = rev_vs_plain(model, batch, _half(model))
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
    cols = ["all layers", "bottom half", "dropout 0.1", "stream float64", "anchor every 2", "anchor every 1"]
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
