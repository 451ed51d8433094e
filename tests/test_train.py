"""End-to-end runs of the real training stack: Hydra config -> data -> method -> Lightning -> results.json."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED_DATA, compose, run_cli

from memtl.data import get_task
from memtl.data.glue import read_glue_split
from memtl.run import run

SMOKE = ["trainer.limit_train_batches=3", "trainer.max_epochs=1", "data.max_eval_samples=24", "logger=none",
         "callbacks.memory.measure_batches=[1]", "callbacks.memory.timing_warmup=1", "trainer.enable_progress_bar=false"]


def read(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"])
def test_tiny_bert_on_every_glue_format(task, glue_root, tmp_path):
    cfg = compose(["backbone=tiny_bert", "method=full", f"task=glue/{task}", f"data.root={glue_root}",
                   "data.batch_size=8", *SMOKE], tmp_path)
    res = run(cfg)
    on_disk = read(tmp_path)
    assert on_disk["status"] == res["status"] == "completed"
    assert set(on_disk["metrics"]) == set(get_task(task).metric_keys)
    assert on_disk["best"]["metric"] == get_task(task).main_metric
    assert on_disk["trainer"]["global_step"] == 3
    assert on_disk["params"]["trainable"] == on_disk["params"]["total"] > 0
    assert on_disk["memory"]["peak_step_bytes"] > 0 and on_disk["memory"]["saved_tensor_bytes"] > 0
    assert on_disk["throughput"]["step_time_s"] > 0 and on_disk["throughput"]["samples_per_s"] > 0
    assert on_disk["config"]["task"]["name"] == task
    if task == "mnli":
        assert {"accuracy", "mm_accuracy"} <= set(on_disk["metrics"])
    if task == "stsb":
        assert on_disk["baseline"] is None
    else:  # the floor, from the real files: the train split's majority label on the dev rows scored
        train = [r["label"] for r in read_glue_split(task, "train", glue_root)]
        majority = max(set(train), key=train.count)
        dev = [r["label"] for r in read_glue_split(task, get_task(task).eval_splits[0], glue_root)]
        dev = dev[:cfg.data.max_eval_samples] if cfg.data.max_eval_samples else dev
        assert on_disk["baseline"]["label"] == majority
        if task == "cola":  # Matthews correlation of a constant prediction
            assert on_disk["baseline"]["metrics"] == {"mcc": 0.0}
        else:
            assert on_disk["baseline"]["metrics"]["accuracy"] == pytest.approx(dev.count(majority) / len(dev))


def test_evaluation_after_max_steps_belongs_to_the_epoch_it_trained_in(glue_root, tmp_path):
    # 3 steps of a 4-batch epoch: the only evaluation runs after fit, when Lightning's
    # current_epoch has already moved to 1
    cfg = compose(["backbone=tiny_bert", "method=full", "task=glue/rte", f"data.root={glue_root}",
                   "data.batch_size=8", "data.max_train_samples=32", "trainer.max_steps=3", "trainer.max_epochs=5",
                   *SMOKE[2:]], tmp_path)
    run(cfg)
    res = read(tmp_path)
    assert res["trainer"]["global_step"] == 3
    assert [(h["epoch"], h["step"]) for h in res["history"]] == [(0, 3)]
    assert res["best"]["epoch"] == 0


def test_minilm_lora_on_real_rte_through_the_cli(tmp_path):
    """The README's main job, shrunk: real MiniLM, real RTE files, found without data.root."""
    assert (SHARED_DATA / "glue_data" / "RTE" / "train.tsv").is_file()
    out = tmp_path / "run"
    proc = run_cli(["method=lora", "task=glue/rte", "data.max_train_samples=48", "data.max_eval_samples=32",
                    "trainer.max_steps=4", "logger=csv", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read(out)
    assert res["status"] == "completed" and res["config"]["backbone"]["name"] == "minilm"
    assert 0 <= res["metrics"]["accuracy"] <= 1
    assert 0 < res["params"]["trainable"] < res["params"]["total"] / 50
    # metrics and memory reached the CSV logger too
    csv_text = (out / "csv" / "metrics.csv").read_text()
    assert "memory/peak_step_mib" in csv_text and "val/accuracy" in csv_text
    # the checkpoint holds the trainable weights only, plus the config to rebuild the model
    ckpt = torch.load(res["checkpoint"], map_location="cpu", weights_only=False)
    n_trainable = sum(v.numel() for v in ckpt["state_dict"].values())
    assert n_trainable == res["params"]["trainable"]
    assert ckpt["memtl"]["config"]["method"]["name"] == "lora"


def test_checkpoint_reloads_onto_the_pretrained_backbone(glue_root, tmp_path):
    from hydra.utils import instantiate  # noqa: F401  (config is plain dicts)

    from memtl.backbones import load_model, load_tokenizer
    from memtl.methods import apply_method

    cfg = compose(["backbone=tiny_bert", "method=lora", "task=glue/rte", f"data.root={glue_root}", *SMOKE,
                   "optim.lr=1e-2"], tmp_path)
    res = run(cfg)
    ckpt = torch.load(res["checkpoint"], map_location="cpu", weights_only=False)
    conf = ckpt["memtl"]["config"]

    def rebuild():
        torch.manual_seed(conf["seed"])  # the random tiny backbone is rebuilt from its seed
        tok = load_tokenizer(conf["backbone"])
        model = load_model(conf["backbone"], 2, tok)
        opts = {k: v for k, v in conf["method"].items() if k not in ("name", "lr")}
        return apply_method(model, conf["method"]["name"], **opts).eval()

    fresh, restored = rebuild(), rebuild()
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = restored.load_state_dict(state, strict=False)
    assert not unexpected
    ids = torch.randint(1000, 2000, (2, 10))
    with torch.no_grad():
        a, b = fresh(input_ids=ids).logits, restored(input_ids=ids).logits
    assert not torch.allclose(a, b), "loading the trained weights changed nothing"


def test_two_job_multirun(glue_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "method=full,lora", "backbone=tiny_bert", "task=glue/rte", f"data.root={glue_root}",
                    *SMOKE, f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2
    methods = {json.loads(p.read_text())["run"]["method"] for p in results}
    assert methods == {"full", "lora"}
    assert all(json.loads(p.read_text())["status"] == "completed" for p in results)


def test_wandb_offline_run_logs_memory(glue_root, tmp_path):
    import wandb

    cfg = compose(["backbone=tiny_bert", "method=lora", "task=glue/rte", f"data.root={glue_root}",
                   *[s for s in SMOKE if not s.startswith("logger")], "logger=wandb"], tmp_path)
    res = run(cfg)
    assert wandb.run is None  # finished: a sweep's next job must start its own run
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "no offline run file written"
    record, summary, exits = _wandb_run(files[0])
    # logged through Lightning's WandbLogger (history); the summary keeps each key's last value
    assert summary["memory/peak_step_mib"] == pytest.approx(res["memory"]["peak_step_mib"])
    assert summary["memory/saved_tensor_mib"] > 0
    assert summary["throughput/step_time_s"] > 0
    assert "val/accuracy" in summary and summary["params/trainable"] == res["params"]["trainable"]
    assert summary["status"] == "completed" and exits == [0]
    assert set(record.tags) == {"lora", "tiny_bert", "rte"}


def test_bf16_mixed_precision_trains(glue_root, tmp_path):
    cfg = compose(["backbone=tiny_bert", "method=full", "task=glue/rte", f"data.root={glue_root}", *SMOKE,
                   "trainer.precision=bf16-mixed"], tmp_path)
    assert run(cfg)["status"] == "completed"


@pytest.mark.parametrize("interrupt", [False, True])
def test_results_written_when_the_run_breaks(glue_root, tmp_path, interrupt):
    cfg = compose(["backbone=tiny_bert", "method=full", "task=glue/rte", f"data.root={glue_root}", *SMOKE,
                   "+callbacks.fail._target_=failing_callback.FailAtBatch", f"+callbacks.fail.interrupt={interrupt}"],
                  tmp_path)
    with pytest.raises((RuntimeError, SystemExit, KeyboardInterrupt)):
        run(cfg)
    assert not torch.autograd.profiler._is_profiler_enabled  # batch 1 was being measured
    res = read(tmp_path)
    assert res["status"] == ("interrupted" if interrupt else "failed")
    assert res["config"]["method"]["name"] == "full" and res["params"]["trainable"] > 0
    if not interrupt:
        assert "planned failure" in res["error"]


def test_a_run_that_fails_in_a_measured_step_exits_with_code_1(glue_root, tmp_path, monkeypatch):
    """The memory profiler of the failed step is stopped: no segmentation fault at exit (139)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = run_cli(["backbone=tiny_bert", "method=full", "task=glue/rte", f"data.root={glue_root}", *SMOKE,
                    "+callbacks.fail._target_=failing_callback.FailAtBatch", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "planned failure at batch 1" in proc.stderr and read(tmp_path)["status"] == "failed"


def test_rerun_in_the_same_folder_keeps_earlier_results(glue_root, tmp_path):
    cfg = compose(["backbone=tiny_bert", "method=full", "task=glue/rte", f"data.root={glue_root}", *SMOKE], tmp_path)
    run(cfg)
    first = (tmp_path / "results.json").read_text()
    run(cfg)
    kept = list(tmp_path.glob("results.previous-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == first


def test_pretrained_backbone_trains_with_dropout_on(tmp_path):
    """from_pretrained hands back eval mode and Lightning keeps module modes as found."""
    from memtl.run import build

    cfg = compose(["backbone=minilm", "method=lora", "task=glue/rte", "data.max_train_samples=16",
                   "data.max_eval_samples=16", "logger=none"], tmp_path)
    trainer, module, *_ = build(cfg)
    dropouts = [m for m in module.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.training for m in dropouts)


def test_meft_with_the_reconstruction_monitor_through_the_cli(glue_root, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["backbone=tiny_bert", "method=meft2", "task=glue/rte", f"data.root={glue_root}", *SMOKE[:-1],
                    "logger=csv", "callbacks=[default,meft_recon]", "callbacks.meft_recon.every_n_steps=1",
                    "trainer.log_every_n_steps=1",
                    f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read(out)
    assert res["status"] == "completed" and res["run"]["method"] == "meft2"
    assert res["params"]["trainable"] < res["params"]["total"] / 2
    csv_text = (out / "csv" / "metrics.csv").read_text()
    assert "meft/recon_err_max" in csv_text and "meft/recon_err/layer_0" in csv_text


def test_head_only_run_trains_the_head_and_leaves_the_backbone_as_loaded(glue_root, tmp_path):
    """method=head (the linear-probe reference) through the whole stack: only the head's
    weights change; the embeddings and layers end as they were loaded."""
    from memtl.run import build
    cfg = compose(["backbone=tiny_bert", "method=head", "task=glue/rte", f"data.root={glue_root}", *SMOKE], tmp_path)
    trainer, module, datamodule, *_ = build(cfg)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, datamodule=datamodule)
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(("classifier.", "bert.pooler.")) for n in moved), moved
    res = run(compose(["backbone=tiny_bert", "method=head", "task=glue/rte", f"data.root={glue_root}", *SMOKE],
                      tmp_path / "run"))
    assert res["status"] == "completed" and res["run"]["method"] == "head"
    assert res["params"]["trainable"] == 32 * 32 + 32 + 32 * 2 + 2  # tiny_bert: pooler + classifier


def test_ladder_side_tuning_protocol_scores_the_test_split(glue_root, tmp_path):
    """protocol=lst: select on a split carved from the data, report the untouched test split."""
    cfg = compose(["backbone=tiny_bert", "method=sherl", "task=glue/mrpc", f"data.root={glue_root}", *SMOKE,
                   "data.protocol=lst", "data.max_eval_samples=null"], tmp_path)
    res = run(cfg)
    assert res["status"] == "completed"
    assert set(res["test"]) == {"accuracy", "f1"} and set(res["metrics"]) == {"accuracy", "f1"}
    assert read(tmp_path)["test"] == res["test"]


def test_sherl_skip_gate_is_reported(glue_root, tmp_path):
    """SHERL's skip-gate opening tanh(g/T) is logged at each evaluation and written to
    results.json: 0 at init, the trained gate's value after training; other methods have none."""
    from memtl.methods.sherl.side import SideModule
    from memtl.run import build
    overrides = ["backbone=tiny_bert", "method=sherl", "task=glue/rte", f"data.root={glue_root}", *SMOKE,
                 "method.gate_temperature=0.5", "optim.lr=1e-2"]
    trainer, module, datamodule, *_ = build(compose(overrides, tmp_path))
    side = next(m for m in module.model.modules() if isinstance(m, SideModule))
    assert module.diagnostics() == {"sherl_skip_gate": 0.0}
    trainer.fit(module, datamodule=datamodule)
    gate = math.tanh(side.gate.item() / 0.5)
    assert gate != 0.0 and module.diagnostics()["sherl_skip_gate"] == pytest.approx(gate, rel=1e-6)
    assert trainer.logged_metrics["sherl/skip_gate"].item() == pytest.approx(gate, rel=1e-6)
    res = run(compose(overrides, tmp_path / "run"))
    assert res["status"] == "completed" and -1 < res["diagnostics"]["sherl_skip_gate"] < 1
    assert read(tmp_path / "run")["diagnostics"] == res["diagnostics"]
    kept = run(compose([*overrides[:-2], "optim.lr=1e-2", "method.preserve_start=true", "method.start_form=scale"],
                       tmp_path / "kept"))  # the kept starting point reports its side scale α (0 at init)
    assert kept["status"] == "completed" and kept["diagnostics"]["sherl_side_scale"] != 0.0
    plain = run(compose(["backbone=tiny_bert", "method=lora", "task=glue/rte", f"data.root={glue_root}", *SMOKE],
                        tmp_path / "lora"))
    assert plain["status"] == "completed" and "diagnostics" not in plain


def _wandb_records(run_file: Path) -> list:
    """The records of an offline ``run-*.wandb`` file: a
    LevelDB-style log (7-byte file header; records with a 7-byte header - crc, length,
    type full/first/middle/last - in 32 KiB blocks) of W&B protobuf ``Record`` messages."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, part, block, records = run_file.read_bytes(), 7, b"", 32768, []
    assert data.startswith(b":W&B"), f"{run_file} is not a W&B run file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            records.append(rec)
    return records


def _wandb_run(run_file: Path):
    """(run record: name, group, tags...; final summary as a dict; exit code) of an offline run."""
    records = _wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    return run, summary, exits


def test_sweep_runs_share_one_wandb_group(glue_root, tmp_path):
    sweep = tmp_path / "sweep"
    smoke = [s for s in SMOKE if not s.startswith("logger")]
    proc = run_cli(["-m", "method=full,lora", "backbone=tiny_bert", "task=glue/rte", f"data.root={glue_root}",
                    *smoke, "logger=wandb", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [_wandb_run(f)[0] for f in sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))]
    assert len(records) == 2
    assert {r.run_group for r in records} == {str(sweep)}
    assert {tuple(sorted(r.tags)) for r in records} == {("full", "rte", "tiny_bert"), ("lora", "rte", "tiny_bert")}


def test_a_smoke_sweep_runs_end_to_end(glue_root, tmp_path):
    # the smoke variant of the MEFT paper grid: 3 variants x 2 learning rates, 4 steps each
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "+sweep=smoke/meft_glue_paper", "backbone=tiny_bert", f"data.root={glue_root}",
                    "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [read(p.parent) for p in sorted(sweep.glob("*/results.json"))]
    assert {(r["run"]["method"], r["config"]["optim"]["lr"]) for r in results} == {
        (m, lr) for m in ("meft1", "meft2", "meft3") for lr in (3e-4, 5e-4)}
    assert all(r["status"] == "completed" and 0 < r["trainer"]["global_step"] <= 4 for r in results)  # max_steps 4


def test_lr_warms_up_from_zero_then_decays_to_zero(glue_root, tmp_path):
    """transformers' linear schedule: step t of T with w warm-up steps trains at lr·t/w, then
    lr·(T−t)/(T−w); the first step's lr is 0."""
    import lightning as L

    from memtl.run import build

    class Record(L.Callback):
        lrs = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    smoke = [o for o in SMOKE if not o.startswith("trainer.limit_train_batches")]
    cfg = compose(["backbone=tiny_bert", "method=full", "task=glue/rte", f"data.root={glue_root}", *smoke,
                   "trainer.limit_train_batches=8", "data.batch_size=2", "optim.warmup_steps=2", "optim.lr=1e-3"], tmp_path)
    trainer, module, datamodule, _, _ = build(cfg, resuming=False)
    trainer.callbacks.append(Record())
    trainer.fit(module, datamodule=datamodule)
    expected = [1e-3 * t / 2 for t in (0, 1)] + [1e-3 * (8 - t) / 6 for t in range(2, 8)]
    assert Record.lrs == pytest.approx(expected)
