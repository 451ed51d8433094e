"""Resume: a run stopped mid-epoch (SIGTERM or a crash) and rerun with the same command
continues from checkpoints/last.ckpt and ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose, run_cli

from memtl.errors import ConfigError
from memtl.run import run

# 2 epochs x 5 batches, last.ckpt every 2 steps, dropout on (tiny_bert: 0.1)
ARGS = ["backbone=tiny_bert", "task=glue/mrpc", "data.batch_size=8", "data.max_eval_samples=16", "trainer.max_epochs=2",
        "callbacks.last_checkpoint.every_n_steps=2", "callbacks.memory.measure_batches=[1]",
        "trainer.enable_progress_bar=false", "optim.lr=1e-3"]


def stop_once(step: int, marker: Path, how: str) -> list[str]:
    return ["+callbacks.stop._target_=failing_callback.StopOnceAt", f"+callbacks.stop.step={step}",
            f"+callbacks.stop.marker={marker}", f"+callbacks.stop.how={how}"]


def read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def final_weights(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]  # resumable: optimizer + scheduler state
    return ckpt["state_dict"]


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = read(a), read(b)
    assert ra["status"] == rb["status"] == "completed"
    assert ra["trainer"]["global_step"] == rb["trainer"]["global_step"] == 10
    assert ra["history"] == rb["history"] and len(ra["history"]) >= 2  # exact float equality
    assert ra["best"] == rb["best"] and ra["metrics"] == rb["metrics"]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"


def test_sigterm_mid_epoch_then_the_same_command_resumes(glue_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    common = ["method=lora", f"data.root={glue_root}", *ARGS, "logger=csv"]
    whole, out = tmp_path / "whole", tmp_path / "run"
    proc = run_cli([*common, f"hydra.run.dir={whole}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    command = [*common, *stop_once(2, tmp_path / "signalled", "sigterm"), f"hydra.run.dir={out}"]
    proc = run_cli(command)
    assert proc.returncode == 143, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: interrupted (SIGTERM) at global step 3: rerun the same command to resume"], \
        proc.stderr[-3000:]
    first = read(out)
    assert first["status"] == "interrupted" and first["trainer"]["global_step"] == 3  # mid-epoch 0 (5 batches)
    assert first["last_checkpoint"] == str(out / "checkpoints" / "last.ckpt")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and "rerun the same command" in ckpt["memtl"]["contents"]
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == first["params"]["trainable"]

    proc = run_cli(command)  # the very same command
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read(out)
    assert res["resumed"] == {"from": str(out / "checkpoints" / "last.ckpt"), "global_step": 3, "epoch": 0,
                              "previous_status": "interrupted"}
    assert res["last_checkpoint"] is None and not (out / "checkpoints" / "last.ckpt").exists()
    assert [json.loads(p.read_text())["status"] for p in out.glob("results.previous-*.json")] == ["interrupted"]
    assert list((out / "csv").glob("metrics.previous-*.csv")), "the first part's CSV metrics were lost"
    assert_same_run(whole, out)


# meft2: dropout replayed in the reversible backward. The second: batches of 4, two per
# step, evaluation mid-epoch in the middle of an accumulation, length-grouped order.
CRASH = {"meft2": (["method=meft2"], 7, 1),
         "accumulate": (["method=lora", "data.batch_size=4", "trainer.accumulate_grad_batches=2",
                         "trainer.val_check_interval=0.5", "data.group_by_length=true",
                         "callbacks.last_checkpoint.every_n_steps=3"], 8, 1)}


@pytest.mark.parametrize("case", CRASH)
def test_crash_then_rerun_resumes_from_the_last_periodic_checkpoint(case, glue_root, tmp_path):
    extra, resumed_at, epoch = CRASH[case]
    common = [f"data.root={glue_root}", *ARGS, *extra, "logger=none"]
    run(compose(common, tmp_path / "whole"))
    cfg = compose([*common, *stop_once(8, tmp_path / "crashed", "crash")], tmp_path / "run")
    with pytest.raises(RuntimeError, match="planned crash at global step 8"):
        run(cfg)
    assert read(tmp_path / "run")["status"] == "failed"
    res = run(cfg)  # from last.ckpt, mid-epoch 1
    assert res["resumed"]["global_step"] == resumed_at and res["resumed"]["epoch"] == epoch
    assert res["resumed"]["previous_status"] == "failed"
    assert_same_run(tmp_path / "whole", tmp_path / "run")


def test_resume_refuses_other_settings_and_never_starts_over(glue_root, tmp_path):
    common = ["method=lora", f"data.root={glue_root}", *ARGS, "logger=none", *stop_once(2, tmp_path / "m", "crash")]
    with pytest.raises(RuntimeError):
        run(compose(common, tmp_path))
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ConfigError, match=r"last\.ckpt is an unfinished run with other settings "
                                          r"\(optim\.lr: 0\.001 -> 0\.002\): .* resume=never to start over"):
        run(compose([*common, "optim.lr=2e-3"], tmp_path))
    assert (tmp_path / "results.json").read_text() == before  # nothing moved or lost
    res = run(compose([*common, "optim.lr=2e-3", "resume=never"], tmp_path))
    assert res["status"] == "completed" and res["resumed"] is None and res["trainer"]["global_step"] == 10


def test_a_resumed_run_continues_the_same_wandb_run(glue_root, tmp_path):
    """The W&B run id is kept in the run folder; the resumed part logs to the same run
    (read back from the offline run files)."""
    import wandb
    from test_train import _wandb_run

    if wandb.run is not None:  # a run left open in this process: Lightning's logger would log into it
        wandb.finish()
    common = ["method=lora", f"data.root={glue_root}", *ARGS, "logger=wandb", *stop_once(2, tmp_path / "m", "crash")]
    with pytest.raises(RuntimeError):
        run(compose(common, tmp_path))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert run(compose(common, tmp_path))["status"] == "completed"
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    # both parts can start in the same second: W&B then names the second folder "...-<id>-1"
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    assert [_wandb_run(f)[0].run_id for f in files] == [run_id, run_id]
    run(compose(common, tmp_path))  # the same command after completion: a new run into the same folder
    assert (tmp_path / "wandb_run_id").read_text().strip() != run_id  # ... and a new W&B run


MEFT1_DECODER = ["backbone=tiny_llama", "method=meft1", "logger=none"]


def _unfinished_meft1(glue_root, tmp_path, *, as_before_the_change: bool, keep_resolved: bool) -> tuple[list[str], Path]:
    """A MEFT1 decoder run (method.output=mean) stopped at step 2. ``as_before_the_change``: its
    last.ckpt as the version before MEFT1's decoder default changed wrote it, the option left at
    its default (null) in the config and resolved to the streams' average. ``keep_resolved``
    false: a checkpoint from before the resolved options were recorded. Returns the command
    that rerun resumes it (the default output where ``as_before_the_change``) and last.ckpt."""
    common = [f"data.root={glue_root}", *ARGS, *MEFT1_DECODER, *stop_once(2, tmp_path / "m", "crash")]
    with pytest.raises(RuntimeError, match="planned crash"):
        run(compose([*common, "method.output=mean"], tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["memtl"]["method"]["output"] == ckpt["memtl"]["config"]["method"]["output"] == "mean"
    if as_before_the_change:
        ckpt["memtl"]["config"]["method"]["output"] = None
    if not keep_resolved:
        del ckpt["memtl"]["method"]
    torch.save(ckpt, last)
    return (common if as_before_the_change else [*common, "method.output=mean"]), last


def test_resume_across_a_changed_default_names_the_option_to_pin(glue_root, tmp_path):
    """The same command, but this version resolves a default otherwise (MEFT1's output on
    pre-norm decoders: once the streams' average, now the chain stream, which freezes the last
    G adapter): refused before anything is written, with the option to pin; a wrong pin is
    refused too; pinned, the run resumes and ends as an uninterrupted run ends."""
    run(compose([f"data.root={glue_root}", *ARGS, *MEFT1_DECODER, "method.output=mean"], tmp_path / "whole"))
    out = tmp_path / "run"
    common, last = _unfinished_meft1(glue_root, out, as_before_the_change=True, keep_resolved=True)
    written = {p: p.read_bytes() for p in (last, out / "results.json")}
    with pytest.raises(ConfigError, match=r"last\.ckpt is an unfinished run whose method options this version "
                                          r"resolves otherwise \(method\.output: mean -> chain; a default may have "
                                          r"changed\): add method\.output=mean to resume it, or add resume=never "
                                          r"to start over"):
        run(compose(common, out))
    with pytest.raises(ConfigError, match=r"last\.ckpt is an unfinished run with other settings \(method\.output: "
                                          r"None \(resolved mean\) -> chain\): rerun it with the same settings"):
        run(compose([*common, "method.output=chain"], out))
    assert {p: p.read_bytes() for p in written} == written  # nothing moved or lost
    res = run(compose([*common, "method.output=mean"], out))
    assert res["resumed"]["global_step"] == 2 and res["resumed"]["previous_status"] == "failed"  # the crash's
    assert res["method"]["options"]["output"] == "mean"
    assert_same_run(tmp_path / "whole", out)


def test_resume_refuses_a_checkpoint_with_other_trainable_weights(glue_root, tmp_path):
    """A checkpoint that records no resolved options, written before the default changed: its
    trainable weights are compared once the model is built, one line instead of the optimizer's
    error on a parameter-group mismatch; the run's results.json records it."""
    common, last = _unfinished_meft1(glue_root, tmp_path, as_before_the_change=True, keep_resolved=False)
    written = last.read_bytes()
    with pytest.raises(ConfigError, match=r"last\.ckpt is an unfinished run with other trainable weights than this "
                                          r"version builds \(4 only in the run, 0 only here, 0 of another shape; "
                                          r"e\.g\. model\.model\.layers\.1\.rev_adapter\.down\.bias\): resume it "
                                          r"with the memtl version that wrote it, or add resume=never to start over"):
        run(compose(common, tmp_path))
    assert last.read_bytes() == written
    assert read(tmp_path)["status"] == "failed" and "other trainable weights" in read(tmp_path)["error"]
    assert [json.loads(p.read_text())["status"] for p in tmp_path.glob("results.previous-*.json")] == ["failed"]
    res = run(compose([*common, "resume=never"], tmp_path))
    assert res["status"] == "completed" and res["resumed"] is None


def test_a_checkpoint_without_resolved_options_resumes_on_the_same_version(glue_root, tmp_path):
    common, _ = _unfinished_meft1(glue_root, tmp_path, as_before_the_change=False, keep_resolved=False)
    res = run(compose(common, tmp_path))
    assert res["status"] == "completed" and res["resumed"]["global_step"] == 2
    assert res["trainer"]["global_step"] == 10
