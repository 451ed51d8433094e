"""Evaluate a saved model again: what ``eval.py`` calls.

    python eval.py run_dir=outputs/rte/lora/<time>            # dev metrics of <run>/model
    python eval.py model_dir=path/to/saved/folder             # a save_pretrained folder

The data are rebuilt with the settings the model was trained with (the run's results.json,
or the folder's ``memtl.json``), so the dev metrics equal results.json's ``best``.
Every check of the input runs before anything is loaded or written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from memtl.errors import ConfigError
from memtl.pretrained import read_manifest
from memtl.results import RESULTS_FILE

SPLITS = ("dev",)


def resolve(run_dir: str | None, model_dir: str | None) -> tuple[Path, dict[str, Any], Path]:
    """(the saved model folder, the training config, the default output folder)."""
    if (run_dir is None) == (model_dir is None):
        raise ConfigError("give one of run_dir=<a training run's folder> or model_dir=<a saved model folder>")
    if run_dir is not None:
        run = Path(run_dir)
        results_path = run / RESULTS_FILE
        if not results_path.is_file():
            raise ConfigError(f"run_dir={run_dir}: no {RESULTS_FILE} there: give the folder of a training run")
        try:
            results = json.loads(results_path.read_text())
        except ValueError as e:
            raise ConfigError(f"{results_path} is not valid JSON ({e})") from None
        folder = run / "model"
        if not folder.is_dir():
            raise ConfigError(f"run_dir={run_dir} has no model/ (the run's status is {results.get('status')!r}): "
                              "only a completed run saves its model; rerun the training command to finish it")
        read_manifest(folder)
        return folder, results["config"], run / "eval"
    folder = Path(model_dir)
    manifest = read_manifest(folder)
    if not manifest.get("training"):
        raise ConfigError(f"model_dir={model_dir} does not say what it was trained on (memtl.json has no "
                          "'training'): evaluate it through its run_dir, or save it from a training run")
    return folder, manifest["training"], folder.resolve().parent / f"{folder.resolve().name}-eval"


def evaluate(run_dir: str | None = None, model_dir: str | None = None, split: str = "dev",
             out: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Metrics of the saved model on ``split``; written to ``<out>/<split>.json``."""
    if split not in SPLITS:
        raise ConfigError(f"split={split}: choose one of {', '.join(SPLITS)}")
    folder, training, default_out = resolve(run_dir, model_dir)
    cfg = OmegaConf.create(training)
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise ConfigError(f"data_root={data_root} is not a folder: point it at a folder laid out like ../shared/data")
        cfg.data.root = data_root

    import lightning as L

    from memtl.module import FineTuneModule
    from memtl.pretrained import from_pretrained
    from memtl.run import _quiet_duplicate_logs, build_data
    from memtl.scoring import MultipleChoiceModel

    _quiet_duplicate_logs()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    task, head, datamodule = build_data(cfg, tokenizer)
    model = from_pretrained(folder)
    if getattr(task, "family", "glue") == "qa":
        model = MultipleChoiceModel(model, head, task.length_norm)
    module = FineTuneModule(model, task, {"lr": 0.0})
    trainer = L.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1,
                        precision=cfg.trainer.get("precision", "32"), logger=False, enable_checkpointing=False,
                        enable_progress_bar=True, enable_model_summary=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: v for k, v in module.history[-1].items() if k not in ("epoch", "step")}
    report = {"model_dir": str(folder), "split": split, "task": cfg.task.name, "metrics": metrics}
    target = Path(out) if out is not None else default_out
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{split}.json").write_text(json.dumps(report, indent=2) + "\n")
    report["written"] = str(target / f"{split}.json")
    return report
