"""Ask a saved decoder a multiple-choice question, by greedy ``generate()`` with the KV cache.

Loads ``<model folder>`` (a ``<run>/model`` folder, or any ``memtl.save_pretrained`` one) with
``memtl.from_pretrained`` in this fresh process, builds the prompt the QA task trained on
(ARC: "Question: ...\\nAnswer:", the choices listed before it so that free text can name
one), and prints the greedy continuation. It checks that greedy decoding with the cache
gives the same tokens as without it. ``--compare-base`` also prints what the pre-trained
backbone says to the same prompt.

    python notebooks/ask.py outputs/<run>/model --question 0 [--split validation] [--tokens 24] [--compare-base]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def prompt_of(row: dict, task) -> str:
    letters = "ABCDEFGH"
    listed = " ".join(f"({letters[i]}) {c}" for i, c in enumerate(row["choices"]))
    return f"{task.prompt(row).removesuffix('Answer:')}Choices: {listed}\nAnswer:"


def greedy(model, tok, text: str, tokens: int, use_cache: bool) -> torch.Tensor:
    batch = tok(text, return_tensors="pt")
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, use_cache=use_cache,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return out[0, batch["input_ids"].shape[1]:]


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    import memtl
    from memtl.backbones import load_model, load_tokenizer
    from memtl.data.qa import get_qa_task, read_qa_split
    from memtl.errors import ConfigError
    from memtl.pretrained import read_manifest

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="a saved model folder (<run>/model)")
    p.add_argument("--task", default=None, help="QA task whose split to read (default: the one it trained on)")
    p.add_argument("--split", default="validation")
    p.add_argument("--question", type=int, default=0, help="row index in the split")
    p.add_argument("--tokens", type=int, default=24, help="new tokens to generate")
    p.add_argument("--compare-base", action="store_true", help="also ask the pre-trained backbone")
    args = p.parse_args(argv)
    try:
        folder = Path(args.model_dir)
        manifest = read_manifest(folder)
        name = args.task or ((manifest.get("training") or {}).get("task") or {}).get("name")
        if name is None:
            raise ConfigError(f"{folder}: no training task recorded; pass --task (e.g. arc_easy)")
        task = get_qa_task(name)
        rows = read_qa_split(task, args.split)
        if not 0 <= args.question < len(rows):
            raise ConfigError(f"--question={args.question}: the {name} {args.split} split has {len(rows)} rows; "
                              f"choose 0..{len(rows) - 1}")
        if args.compare_base and manifest["backbone"].get("source") == "random":
            raise ConfigError(f"--compare-base: {manifest['backbone'].get('name')} is a random backbone, there is no "
                              "pre-trained model to ask; leave the flag out")
        started = time.time()
        model = memtl.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)  # the folder holds the tokenizer it trained with
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    row = rows[args.question]
    text = prompt_of(row, task)
    print(f"model: {folder} ({manifest['method']} on {manifest['backbone']['name']}), loaded in "
          f"{time.time() - started:.1f} s", flush=True)
    print(f"--- prompt ({name} {args.split} #{args.question}; gold: {row['choices'][row['label']]!r})\n{text}")
    cached = greedy(model, tok, text, args.tokens, use_cache=True)
    uncached = greedy(model, tok, text, args.tokens, use_cache=False)
    print(f"--- {manifest['method']} answers (greedy, KV cache):\n{tok.decode(cached)!r}")
    print(f"--- same tokens without the cache: {torch.equal(cached, uncached)}")
    if args.compare_base:
        entry = manifest["backbone"]
        base = load_model(entry, 2, load_tokenizer(entry), head="causal_lm").eval()
        answer = greedy(base, tok, text, args.tokens, use_cache=True)
        print(f"--- the pre-trained {entry['name']} answers:\n{tok.decode(answer)!r}")
    return 0 if torch.equal(cached, uncached) else 1


if __name__ == "__main__":
    sys.exit(main())
