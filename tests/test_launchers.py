"""Cluster sweeps through Hydra's submitit launcher (extra `cluster`): a real two-job multirun
with hydra/launcher=local (submitit local jobs, each its own process) whose results.json files
`memtl report` reads, the Slurm launcher's resources from `cluster:`, preflight of the choice."""
from __future__ import annotations

import json
import os
import time

import hydra_plugins.hydra_submitit_launcher  # noqa: F401  the extra `cluster`: a missing plugin fails here, loudly
import pytest
import submitit
from conftest import REPO, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memtl.errors import ConfigError
from memtl.preflight import preflight
from memtl.tools.report import main as report_main

TINY = ["backbone=tiny_bert", "task=glue/rte", "trainer.limit_train_batches=3", "trainer.max_epochs=1",
        "data.max_eval_samples=24", "logger=none", "callbacks.memory.measure_batches=[1]",
        "callbacks.memory.timing_warmup=1", "trainer.enable_progress_bar=false"]


def hydra_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.fixture(scope="module")
def local_sweep(glue_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("submitit") / "sweep"
    started = time.time()
    proc = run_cli(["-m", "hydra/launcher=local", "method=full,lora", *TINY, f"data.root={glue_root}",
                    f"hydra.sweep.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"submitit local sweep: {time.time() - started:.0f}s")
    return out


@pytest.mark.slow
def test_local_submitit_jobs_write_results_where_report_reads_them(local_sweep, tmp_path):
    runs = {p.parent.name: json.loads(p.read_text()) for p in local_sweep.glob("*/results.json")}
    assert sorted(runs) == ["0", "1"]
    assert {r["run"]["method"] for r in runs.values()} == {"full", "lora"}
    assert all(r["status"] == "completed" and r["best"]["value"] is not None for r in runs.values())
    # the jobs really went through submitit: one folder per job id (pickled job and result, logs)
    jobs = [d for d in (local_sweep / ".submitit").iterdir() if d.name.isdigit()]
    assert len(jobs) == 2 and all(list(d.glob("*_log.out")) for d in jobs)
    # the job's own Hydra record names the launcher
    saved = OmegaConf.load(local_sweep / "0" / ".hydra" / "hydra.yaml")
    assert saved.hydra.runtime.choices["hydra/launcher"] == "local"
    assert not list((local_sweep / ".submitit").rglob("results.json"))

    assert report_main([str(local_sweep), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| full |" in md and "| lora |" in md
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {r["method"] for r in data["tables"]["scores"]} == {"full", "lora", "majority class"}


def test_slurm_launcher_takes_its_resources_from_the_cluster_block():
    cfg = hydra_cfg(["hydra/launcher=slurm"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    c = cfg.cluster
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min, launcher.mem_gb) == \
           (c.partition, c.gpus, c.time_min, c.mem_gb) == (None, 1, 240, 64)
    assert (launcher.cpus_per_task, launcher.nodes, launcher.tasks_per_node) == (c.cpus, c.nodes, c.tasks_per_node)
    # submitit's own files go under the sweep folder; job outputs stay <sweep dir>/<job num>/
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"

    cfg = hydra_cfg(["hydra/launcher=slurm", "cluster.partition=a100", "cluster.gpus=4", "cluster.time_min=30",
                     "cluster.mem_gb=128", "hydra.launcher.account=proj"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["timeout_min"], launcher["mem_gb"],
            launcher["account"]) == ("a100", 4, 30, 128, "proj")
    # a launcher key given directly wins over the block
    assert hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher.partition == "gpu"


def test_local_launcher_and_default():
    local = hydra_cfg(["hydra/launcher=local"]).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher") and local.timeout_min == 240
    assert hydra_cfg([]).hydra.launcher._target_.endswith("BasicLauncher")


def test_preflight_checks_the_launcher_choice():
    conf = REPO / "conf"
    for ok in (["hydra/launcher=slurm", "+sweep=meft_glue_paper", "cluster.partition=gpu"],
               ["hydra/launcher=local"], ["hydra/launcher=submitit_slurm"], ["hydra/launcher=basic"]):
        preflight(["-m", *ok], conf)
    with pytest.raises(ConfigError, match=r"^unknown hydra/launcher 'slrum': choose one of basic, local, slurm,"):
        preflight(["-m", "hydra/launcher=slrum"], conf)
    with pytest.raises(ConfigError, match=r"unknown key 'cluster.gpu': the keys under 'cluster' are"):
        preflight(["-m", "hydra/launcher=slurm", "cluster.gpu=2"], conf)
    proc = run_cli(["-m", "hydra/launcher=slrum", "method=full"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown hydra/launcher 'slrum'")


def test_slurm_sbatch_script_asks_for_the_cluster_resources(tmp_path, monkeypatch):
    """The plugin's own launch() up to the submission: the sbatch script submitit would send
    (no Slurm here: a stand-in `srun` on PATH passes submitit's check, submission is stopped)."""
    import hydra

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    submitted = {}

    class Submitted(Exception):
        pass

    def map_array(self, fn, *args):
        submitted.update(executor=self, jobs=list(zip(*args)))
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    sweep = tmp_path / "sweep"
    cfg = hydra_cfg(["hydra/launcher=slurm", "cluster.partition=a100", "cluster.gpus=2", "cluster.time_min=90",
                     "cluster.mem_gb=32", "cluster.cpus=6", "hydra.launcher.account=proj", "hydra.job.name=train",
                     f"hydra.sweep.dir={sweep}"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["method=full"], ["method=lora"]], initial_job_idx=0)
    assert [job[:3] for job in submitted["jobs"]] == [(["method=full"], "hydra.sweep.dir", 0),
                                                     (["method=lora"], "hydra.sweep.dir", 1)]
    script = submitted["executor"]._executor._make_submission_file_text("python -u job", "uid")
    for line in ("--partition=a100", "--gpus-per-node=2", "--time=90", "--mem=32GB", "--cpus-per-task=6",
                 "--nodes=1", "--ntasks-per-node=1", "--account=proj", "--job-name=train",
                 f"--output={sweep}/.submitit/%j/%j_0_log.out"):
        assert f"#SBATCH {line}\n" in script, line
