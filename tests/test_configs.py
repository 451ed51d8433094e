"""Every config group option composes; every combination of every sweep grid resolves."""
import itertools
from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from omegaconf import OmegaConf

from memtl.data import get_task
from memtl.run import validate

CONF = REPO / "conf"
GROUPS = ["backbone", "method", "task", "trainer", "logger", "callbacks", "experiment", "debug"]


def options(group: str) -> list[str]:
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def test_the_groups_the_framework_promises_exist():
    assert set(options("task")) == ({f"glue/{t}" for t in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")}
                                    | {f"qa/{t}" for t in ("openbookqa", "piqa", "arc_easy", "arc_challenge", "sciq")})
    assert {"minilm", "bert_base", "roberta_base", "roberta_large", "tiny_bert", "tiny_roberta", "bart_base",
            "bart_large", "opt_125m", "opt_350m", "opt_1_3b", "smollm2_135m", "tiny_bart", "tiny_opt",
            "tiny_llama"} <= set(options("backbone"))
    assert {"full", "lora"} <= set(options("method"))
    assert set(options("trainer")) == {"auto", "cpu", "gpu", "ddp"}
    assert set(options("logger")) == {"wandb", "csv", "none"}


def test_the_trainer_default_uses_the_accelerator_that_exists(tmp_path):
    """``python train.py`` trains on a GPU where there is one (Lightning's auto); cpu and gpu pin it
    and keep every other setting of the default."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default, cpu, gpu, ddp = (compose("train", overrides=[*o, f"paths.output_dir={tmp_path}"]).trainer
                                  for o in ([], ["trainer=cpu"], ["trainer=gpu"], ["trainer=ddp"]))
    assert (default.accelerator, cpu.accelerator, gpu.accelerator, ddp.accelerator) == ("auto", "cpu", "gpu", "auto")
    rest = lambda t: {k: v for k, v in t.items() if k not in ("accelerator", "devices", "strategy")}  # noqa: E731
    assert rest(default) == rest(cpu) == rest(gpu) == rest(ddp)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={option}", f"paths.output_dir={tmp_path}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)
    if group == "task":
        assert cfg.task.main_metric == get_task(cfg.task.name).main_metric


def test_method_yaml_is_the_options_dataclass():
    """conf/method/<m>.yaml holds exactly the options of method m (memtl.methods.options) plus the
    run keys name and lr, with the dataclass's defaults: the YAML cannot drift from them."""
    import dataclasses

    from memtl.methods import available_methods, method_options
    from memtl.run import RUN_KEYS

    assert set(options("method")) == set(available_methods())
    for name in available_methods():
        yaml = OmegaConf.to_container(OmegaConf.load(CONF / "method" / f"{name}.yaml"))
        assert yaml["name"] == name and set(RUN_KEYS) <= set(yaml), name
        defaults = {f.name: f.default for f in dataclasses.fields(method_options(name))}
        assert {k: v for k, v in yaml.items() if k not in RUN_KEYS} == defaults, name
        for k, v in defaults.items():  # 16 == 16.0 and False == 0 above: the types must match too
            assert type(yaml[k]) is type(v), (name, k, yaml[k], v)


def sweep_params(path: Path) -> dict:
    """The grid of a sweep file, with the grids of the sweeps it builds on (its defaults
    list's ``/sweep/...`` entries, as the smoke variants do) merged underneath."""
    cfg = OmegaConf.load(path)
    params = {}
    for entry in cfg.get("defaults") or []:
        if isinstance(entry, str) and entry.startswith("/sweep/"):
            params.update(sweep_params(SWEEP_DIR / f"{entry[len('/sweep/'):]}.yaml"))
    params.update(OmegaConf.select(cfg, "hydra.sweeper.params", default={}) or {})
    return params


def sweep_grid(path: Path) -> list[list[str]]:
    """Every combination of the grid's values; an Optuna search range (``interval(lo, hi)``) adds its two ends."""
    axes = []
    for k, vals in sweep_params(path).items():
        value = OverridesParser.create().parse_override(f"{k}={vals}").value()
        ends = [value.start, value.end] if isinstance(value, IntervalSweep) else None
        axes.append([f"{k}={v}" for v in (ends or str(vals).split(","))])
    return [list(c) for c in itertools.product(*axes)]


SWEEP_DIR = REPO / "sweeps"
SWEEPS = sorted(SWEEP_DIR.rglob("*.yaml"))
SWEEP_NAMES = [str(p.relative_to(SWEEP_DIR).with_suffix("")) for p in SWEEPS]
WITH_SMOKE = ["meft_glue_paper", "meft_glue_authors", "sherl_glue_authors", "minilm_accuracy", "minilm_siamese",
              "opt_qa", "smollm2_arc_easy"]


def test_sweeps_exist_each_with_a_small_smoke_variant():
    assert {"meft_glue_paper", "meft_glue_authors", "sherl_glue_authors", "sherl_glue_authors_large"} <= set(SWEEP_NAMES)
    for name in WITH_SMOKE:
        full, smoke = sweep_grid(SWEEP_DIR / f"{name}.yaml"), sweep_grid(SWEEP_DIR / "smoke" / f"{name}.yaml")
        assert len(smoke) <= 14 and len(smoke) <= len(full), name  # e.g. 7 methods x 2 tasks
        assert {kv.split("=")[0] for kv in smoke[0]} == {kv.split("=")[0] for kv in full[0]}, name
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"+sweep=smoke/{name}"])
        assert cfg.trainer.max_steps == 4 and cfg.data.max_train_samples == 64, name  # minutes, not hours


@pytest.mark.parametrize("sweep", SWEEPS, ids=SWEEP_NAMES)
def test_every_combination_of_a_sweep_resolves(sweep, tmp_path):
    sweep_name = str(sweep.relative_to(SWEEP_DIR).with_suffix(""))
    grid = sweep_grid(sweep)
    assert len(grid) > 1
    groups = {k for k in ("method", "task", "backbone") if any(kv.startswith(k + "=") for kv in grid[0])}
    composed = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for combo in grid:
            # Hydra composes each choice of config groups; plain values are then set as a
            # command-line override would set them (composition per combination is too slow)
            choice = tuple(kv for kv in combo if kv.split("=")[0] in groups)
            if choice not in composed:
                composed[choice] = compose("train", overrides=[f"+sweep={sweep_name}", *choice,
                                                               f"paths.output_dir={tmp_path}"])
            cfg = composed[choice].copy()
            for kv in combo:
                key, value = kv.split("=", 1)
                if key in groups:
                    assert value.split("/")[-1].startswith(cfg[key].name), (key, value)
                else:
                    assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key
                    OmegaConf.update(cfg, key, OverridesParser.create().parse_override(kv).value())  # as Hydra parses it
            validate(cfg)


def test_meft_paper_grid_is_the_papers():
    grid = OmegaConf.load(REPO / "sweeps" / "meft_glue_paper.yaml").hydra.sweeper.params
    assert str(grid["optim.lr"]) == "3e-4,4e-4,5e-4"
    assert str(grid["data.batch_size"]) == "16,32" and str(grid["trainer.max_epochs"]) == "10,20"
    authors = OmegaConf.load(REPO / "sweeps" / "meft_glue_authors.yaml")
    assert str(authors.hydra.sweeper.params["optim.lr"]) == "5e-4,6e-4,7e-4,8e-4"
    assert authors.seed == 3407 and list(authors.optim.betas) == [0.9, 0.98] and authors.data.max_length == 512
