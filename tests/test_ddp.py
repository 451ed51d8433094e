"""DDP (trainer=ddp) on CPU: two gloo processes, every method, MEFT included.

After one optimizer step over a global batch of 8 (4 per rank), the trainable gradients
and weights are identical on both ranks and equal a single process's over the same 8
examples (float64, dropout off). Each DDP run starts two processes from the command line,
as a user does (Lightning relaunches train.py for rank 1).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import REPO, compose, run_cli

from memtl.methods import available_methods
from memtl.run import run

METHODS = [m for m in available_methods() if m != "head"]  # every method but the linear probe
COMMON = ["backbone=tiny_bert", "task=glue/mrpc", "trainer.max_steps=1", "trainer.precision=64-true",
          "+backbone.config.hidden_dropout_prob=0.0", "+backbone.config.attention_probs_dropout_prob=0.0",
          "data.max_eval_samples=8", "logger=none", "trainer.enable_progress_bar=false", "optim.lr=1e-2"]


def dump(path) -> list[str]:
    return ["+callbacks.dump._target_=failing_callback.DumpFirstStep", f"+callbacks.dump.dirpath={path}"]


@pytest.mark.parametrize("method,strategy", [(m, []) for m in METHODS]
                         + [("meft2", ["trainer.strategy.static_graph=true"])], ids=[*METHODS, "meft2-static_graph"])
def test_ddp_two_processes_equal_one_process(method, strategy, glue_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    args = [*COMMON, f"method={method}", f"data.root={glue_root}"] + (["method.dropout=0.0"] if method == "lora" else [])
    out = tmp_path / "ddp"
    proc = run_cli([*args, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4",
                    *strategy, *dump(out / "dump"), f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["trainer"]["global_step"] == 1

    single = tmp_path / "single"
    run(compose([*args, "data.batch_size=8", *dump(single / "dump")], single))

    r0, r1, one = (torch.load(p, weights_only=False) for p in
                   (out / "dump" / "rank0.pt", out / "dump" / "rank1.pt", single / "dump" / "rank0.pt"))
    assert (r0["world"], r0["batch"], one["world"], one["batch"]) == (2, 4, 1, 8)
    for kind in ("grads", "weights"):
        assert r0[kind].keys() == r1[kind].keys() == one[kind].keys() and r0[kind]
        for name in r0[kind]:
            assert torch.equal(r0[kind][name], r1[kind][name]), f"ranks differ: {kind} {name}"
        # relative to the largest entry overall: some gradients are zero up to rounding
        # (e.g. attention key biases: softmax ignores a constant shift)
        scale = max(v.abs().max().item() for v in one[kind].values())
        err = max((r0[kind][n] - one[kind][n]).abs().max().item() for n in one[kind]) / scale
        print(f"{method}: {kind} max relative difference DDP vs one process: {err:.2e}")
        assert err < 1e-9, f"{kind}: DDP differs from one process by {err:.2e}"
    # the step moved the weights (else equal weights would prove nothing)
    assert any(g.abs().max() > 0 for g in one["grads"].values())
