"""MEFT's starting point on SmolLM2-135M (30 layers, pre-RMSNorm) for λ/β in {0.1, 0.01, 0.001}.

For each variant and factor, the model as MEFT leaves it at initialisation: zero-shot
ARC-Easy dev accuracy (all 570 questions, char-normalised choice log-likelihood, the
training path's scorer) and the cosine of its final hidden states to the pre-trained
model's (mean over the real tokens of the dev prompts). MEFT1 scales x1 by λ (β = 1),
MEFT2 scales x2 by β (λ = 1), MEFT3 both (λ = β). The forward in eval is the same for both
inverses, so this measures the factors alone. ``--output chain`` measures MEFT's
``method.output=chain`` (the stream holding the last pre-trained layer's output) instead of
the streams' average.

    python notebooks/meft_starting_point.py [--questions 570] [--variants meft1,meft2,meft3]
        [--factors 0.1,0.01,0.001] [--output mean|chain] [--out docs/figures/meft_starting_point.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from memtl.backbones import load_model, load_tokenizer
    from memtl.data.qa import QACollate, get_qa_task, read_qa_split, tokenize_qa
    from memtl.methods import apply_method
    from memtl.scoring import MultipleChoiceModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=570, help="first N ARC-Easy dev questions (all: 570)")
    p.add_argument("--factors", default="0.1,0.01,0.001")
    p.add_argument("--variants", default="meft1,meft2,meft3")
    p.add_argument("--output", default="mean", choices=("mean", "chain"), help="method.output")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    entry = OmegaConf.load(REPO / "conf" / "backbone" / "smollm2_135m.yaml")
    tok = load_tokenizer(entry)
    base = load_model(entry, tokenizer=tok, head="causal_lm").eval()
    task = get_qa_task("arc_easy")
    rows = read_qa_split(task, "validation", REPO.parent / "shared" / "data")[: args.questions]
    data = tokenize_qa(rows, task, tok, "causal_lm", 256)
    collate = QACollate(tok, "causal_lm")
    batches = [collate([data[i] for i in range(s, min(s + args.batch, len(data)))])
               for s in range(0, len(data), args.batch)]

    def evaluate(model) -> tuple[float, torch.Tensor]:
        """Accuracy, and the final hidden states (before the LM head) of every batch's real tokens."""
        scorer = MultipleChoiceModel(model, "causal_lm", "char")
        correct, states = 0, []
        hook = model.model.norm.register_forward_hook(lambda m, a, out: states.append(out))
        try:
            with torch.no_grad():
                for b in batches:
                    out = scorer(**b)
                    correct += (out.logits.argmax(-1) == b["labels"]).sum().item()
        finally:
            hook.remove()
        masks = [b["attention_mask"].bool() for b in batches]
        return 100 * correct / len(rows), [s[m] for s, m in zip(states, masks)]

    t0 = time.time()
    acc0, ref = evaluate(base)
    table = [{"variant": "pre-trained", "lam": None, "beta": None, "accuracy": acc0, "cosine": 1.0}]
    print(f"pre-trained: ARC-Easy dev {acc0:.1f} ({time.time() - t0:.0f} s)", flush=True)
    for variant in args.variants.split(","):
        for factor in (float(f) for f in args.factors.split(",")):
            opts = {"meft1": {"lam": factor}, "meft2": {"beta": factor}, "meft3": {"lam": factor, "beta": factor}}
            torch.manual_seed(0)
            model = apply_method(copy.deepcopy(base), variant, output=args.output, **opts[variant]).eval()
            acc, states = evaluate(model)
            cos = torch.cat([F.cosine_similarity(a, b, dim=-1) for a, b in zip(states, ref)]).mean().item()
            layer = model.model.layers[0]
            table.append({"variant": variant, "lam": layer.lam, "beta": layer.beta, "output": args.output,
                          "accuracy": acc, "cosine": cos})
            print(f"{variant} λ {layer.lam:g} β {layer.beta:g}: ARC-Easy dev {acc:.1f}, cosine {cos:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    print(f"\n| variant | λ | β | ARC-Easy dev ({len(rows)} q) | cosine to the PLM |\n|---|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['variant']} | {r['lam'] if r['lam'] is not None else '–'} | "
              f"{r['beta'] if r['beta'] is not None else '–'} | {r['accuracy']:.1f} | {r['cosine']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
