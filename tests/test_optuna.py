"""Optuna search of the learning rate (sweeps/optuna_lr.yaml) through hydra-optuna-sweeper:
a real 3-trial study on tiny BERT, one trial broken on purpose; the objective's contract."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna  # the optional extra `optuna`: a missing package fails here, loudly
import pytest
from conftest import REPO, run_cli
from omegaconf import OmegaConf

from memtl.errors import ConfigError
from memtl.preflight import preflight
from memtl.run import objective

LR_RANGE = (1e-5, 1e-2)


@pytest.fixture(scope="module")
def study(glue_root, tmp_path_factory):
    """3 trials of `+sweep=optuna_lr` kept in a SQLite study; trial 1 breaks."""
    out = tmp_path_factory.mktemp("optuna") / "study"
    with pytest.MonkeyPatch.context() as mp:  # the subprocess imports tests/failing_callback.py
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
        proc = run_cli(["-m", "+sweep=optuna_lr", "method=full", "backbone=tiny_bert", "task=glue/rte",
                        f"data.root={glue_root}", "trainer.limit_train_batches=3", "trainer.max_epochs=1",
                        "data.max_eval_samples=24", "logger=none", "trainer.enable_progress_bar=false",
                        "callbacks.memory.measure_batches=[1]", "callbacks.memory.timing_warmup=1",
                        "+callbacks.fail._target_=failing_callback.FailInJob", "+callbacks.fail.num=1",
                        "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage=sqlite:///{out}.db",
                        f"hydra.sweep.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_each_trial_ran_with_its_own_lr_in_range(study):
    runs = {int(p.parent.name): json.loads(p.read_text()) for p in study.glob("*/results.json")}
    assert sorted(runs) == [0, 1, 2]
    lrs = [r["config"]["optim"]["lr"] for r in runs.values()]
    assert len(set(lrs)) == 3 and all(LR_RANGE[0] <= lr <= LR_RANGE[1] for lr in lrs)
    for num, r in runs.items():
        assert f"optim.lr={r['config']['optim']['lr']}" in (study / str(num) / ".hydra" / "overrides.yaml").read_text()
    # the broken trial is recorded as failed and the study went on
    assert runs[1]["status"] == "failed" and "planned failure in job 1" in runs[1]["error"]
    assert runs[0]["status"] == runs[2]["status"] == "completed"


def test_best_is_the_best_trials_lr_and_value(study):
    runs = [json.loads((study / str(n) / "results.json").read_text()) for n in (0, 2)]
    best = OmegaConf.load(study / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(r["best"]["value"] for r in runs))
    assert best.best_params["optim.lr"] in [r["config"]["optim"]["lr"] for r in runs
                                           if r["best"]["value"] == pytest.approx(best.best_value)]
    # the SQLite study holds every trial: value = the run's best dev value, the broken one failed
    trials = optuna.load_study(study_name="optuna_lr-full-rte", storage=f"sqlite:///{study}.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert [trials[0].value, trials[2].value] == pytest.approx([r["best"]["value"] for r in runs])
    assert [trials[0].params["optim.lr"], trials[2].params["optim.lr"]] == [r["config"]["optim"]["lr"] for r in runs]


def test_objective_is_a_finite_float_or_none():
    assert objective({"best": {"value": 0.75}}) == 0.75
    for results in ({"best": {"value": math.nan}}, {"best": None}, {}):
        assert objective(results) is None


def test_the_sweeper_fails_a_trial_on_none_and_goes_on(tmp_path):
    """hydra-optuna-sweeper records None as a failed trial (a NaN would crash the study)."""
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import hydra
        from hydra.core.hydra_config import HydraConfig
        from memtl.run import objective

        @hydra.main(config_path=".", config_name="config", version_base="1.3")
        def main(cfg):
            nan = HydraConfig.get().job.num == 1
            return objective({"best": {"value": float("nan") if nan else cfg.x}})

        main()
    """))
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""
        defaults:
          - override hydra/sweeper: optuna
        x: 0.5
        hydra:
          sweeper: {direction: maximize, n_trials: 3, n_jobs: 1, max_failure_rate: 1.0, params: {x: "interval(0, 1)"}}
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "app.py", "-m", "hydra.sweep.dir=out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Failed experiment" in proc.stderr + proc.stdout
    assert 0 <= OmegaConf.load(tmp_path / "out" / "optimization_results.yaml").best_value <= 1


def test_the_optuna_sweep_is_configured_as_documented():
    sweep = OmegaConf.load(REPO / "sweeps" / "optuna_lr.yaml")
    assert "override /hydra/sweeper" in OmegaConf.to_container(sweep.defaults[0])
    s = sweep.hydra.sweeper
    assert s.direction == "maximize" and s.n_jobs == 1 and s.n_trials == 20
    assert s.sampler._target_ == "optuna.samplers.TPESampler" and s.sampler.seed is not None
    assert s.params["optim.lr"] == "tag(log, interval(1e-5, 1e-2))"


@pytest.mark.parametrize("lr,ok", [("tag(log, interval(1e-4, 1e-3))", True), ("interval(-1, 1e-3)", False)])
def test_preflight_checks_a_search_range_on_the_command_line(lr, ok):
    argv = ["-m", "+sweep=optuna_lr", f"optim.lr={lr}"]
    if ok:
        preflight(argv, REPO / "conf")
    else:
        with pytest.raises(ConfigError, match="learning rate must be > 0"):
            preflight(argv, REPO / "conf")
