"""Same seed + same config -> bit-identical metrics and weights on CPU; results.json says what ran."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import REPO, compose

from memtl.run import run

SMOKE = ["backbone=tiny_bert", "task=glue/mrpc", "trainer.limit_train_batches=4", "trainer.max_epochs=2",
         "data.batch_size=8", "logger=none", "callbacks.memory.measure_batches=[1]",
         "trainer.enable_progress_bar=false", "optim.lr=1e-3"]


@pytest.mark.parametrize("method", ["full", "meft2"])  # meft2: dropout replayed in the reversible recompute
def test_same_seed_twice_is_bit_identical(method, glue_root, tmp_path):
    runs = []
    for i in range(2):
        cfg = compose([*SMOKE, f"method={method}", f"data.root={glue_root}"], tmp_path / str(i))
        res = run(cfg)
        state = torch.load(res["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
        runs.append((res, state))
    (a, wa), (b, wb) = runs
    assert a["status"] == b["status"] == "completed" and len(a["history"]) == 2
    assert a["history"] == b["history"] and a["best"] == b["best"]  # exact float equality
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # and a different seed gives different numbers (the test would pass vacuously otherwise)
    res = run(compose([*SMOKE, f"method={method}", f"data.root={glue_root}", "seed=7"], tmp_path / "other"))
    state = torch.load(res["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert not all(torch.equal(state[k], wa[k]) for k in wa)


def test_results_record_versions_and_commit(glue_root, tmp_path):
    run(compose([*SMOKE, "method=lora", f"data.root={glue_root}", "trainer.max_epochs=1"], tmp_path))
    env = json.loads((tmp_path / "results.json").read_text())["environment"]
    for lib in ("python", "torch", "transformers", "lightning", "peft", "torchmetrics", "tokenizers", "numpy"):
        assert env[lib], lib
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert env["git_commit"] == head and isinstance(env["git_dirty"], bool)
    assert env["accelerator"] == "cpu" and env["device"]  # the trainer's auto default, on this GPU-less machine
