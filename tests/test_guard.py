"""Numerical guards: a NaN/inf loss or gradient stops the run naming the step, or skips that update."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import REPO, compose, run_cli
from failing_callback import NonFiniteAt

from memtl.callbacks import NonFiniteError
from memtl.run import run

SMOKE = ["backbone=tiny_bert", "method=full", "task=glue/rte", "trainer.limit_train_batches=3", "trainer.max_epochs=1",
         "data.batch_size=8", "data.max_eval_samples=16", "logger=none", "callbacks.memory.measure_batches=[0]",
         "trainer.enable_progress_bar=false"]


def poison(what: str, batch: int = 1) -> list[str]:
    return ["+callbacks.nan._target_=failing_callback.NonFiniteAt", f"+callbacks.nan.batch={batch}",
            f"+callbacks.nan.what={what}"]


def test_nan_loss_stops_the_run_with_one_line_naming_the_step(glue_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "run"
    proc = run_cli([*SMOKE, f"data.root={glue_root}", *poison("loss"), f"hydra.run.dir={out}"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "non-finite loss (nan) at global step 1 (epoch 0, batch 1)" in errors[0]
    assert "Traceback" not in proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and res["error"] == errors[0].removeprefix("error: ")
    assert res["trainer"]["global_step"] == 1 and res["guard"]["skipped_steps"] == 0


def test_inf_gradient_stop_names_the_parameter(glue_root, tmp_path):
    cfg = compose([*SMOKE, f"data.root={glue_root}", *poison("grad", batch=2)], tmp_path)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient in model\.bert\.embeddings\.word_embeddings\.weight "
                                             r"at global step 2 \(epoch 0, batch 2\)"):
        run(cfg)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "failed" and "word_embeddings" in res["error"] and "traceback" not in res


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_skip_drops_the_update_and_counts_it(what, glue_root, tmp_path):
    cfg = compose([*SMOKE, f"data.root={glue_root}", "guard.nonfinite=skip", *poison(what)], tmp_path)
    res = run(cfg)
    assert res["status"] == "completed" and res["trainer"]["global_step"] == 3
    assert res["guard"] == {"nonfinite": "skip", "skipped_steps": 1, "skipped_at": [1]}
    assert json.loads((tmp_path / "results.json").read_text())["guard"]["skipped_steps"] == 1
    before, after = NonFiniteAt.weights["before"], NonFiniteAt.weights["after"]
    assert all(torch.equal(before[k], after[k]) for k in before), "the skipped step changed the weights"
    ckpt = torch.load(res["checkpoint"], map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
