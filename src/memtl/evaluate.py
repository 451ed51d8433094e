"""Evaluate a saved model again: what ``eval.py`` calls.

    python eval.py run_dir=outputs/rte/lora/<time>            # dev metrics of <run>/model
    python eval.py run_dir=outputs/rte/lora/<time> split=test # predictions on the test split
    python eval.py model_dir=path/to/saved/folder             # a save_pretrained folder

The data are rebuilt with the settings the model was trained with (the run's results.json,
or the folder's ``memtl.json``), so the dev metrics equal results.json's ``best``.
``split=test``: GLUE, the files the GLUE server takes (``RTE.tsv``; MNLI: ``MNLI-m.tsv`` and
``MNLI-mm.tsv``; columns ``index`` and ``prediction``, labels as GLUE writes them, STS-B
scores clipped to 0-5); QA, ``predictions.jsonl`` (one line per question: id, predicted
choice, the answer where the split has labels) and the accuracy where it has labels.
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

SPLITS = ("dev", "test")


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
    qa = getattr(task, "family", "glue") == "qa"
    if qa:
        model = MultipleChoiceModel(model, head, task.length_norm)
    target = Path(out) if out is not None else default_out
    if split == "test":
        report = {"model_dir": str(folder), "split": split, "task": cfg.task.name}
        precision = str(cfg.trainer.get("precision", "32"))
        report.update((predict_qa if qa else predict_glue)(model, datamodule, target, precision))
        (target / "test.json").write_text(json.dumps(report, indent=2) + "\n")
        report["written"] = str(target)
        return report
    module = FineTuneModule(model, task, {"lr": 0.0})
    trainer = L.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1,
                        precision=cfg.trainer.get("precision", "32"), logger=False, enable_checkpointing=False,
                        enable_progress_bar=True, enable_model_summary=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: v for k, v in module.history[-1].items() if k not in ("epoch", "step")}
    report = {"model_dir": str(folder), "split": split, "task": cfg.task.name, "metrics": metrics}
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{split}.json").write_text(json.dumps(report, indent=2) + "\n")
    report["written"] = str(target / f"{split}.json")
    return report


def _logits(model, loader, precision: str):
    """The model's logits over ``loader``, in order, without gradients (CPU, or the first GPU
    where the run trained on one), under bf16 autocast where the run trained so."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=str(precision).startswith("bf16"))
    out = []
    with torch.no_grad(), autocast:
        for batch in loader:
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            out.append(model(**batch).logits.float().cpu())
    return out


def predict_glue(model, datamodule, target: Path, precision: str) -> dict[str, Any]:
    """One TSV per test split, as the GLUE server takes them."""
    import torch

    task = datamodule.task
    files = {}
    rows = []
    for stem, indices, ds in datamodule.test_predict_sets():
        logits = torch.cat(_logits(model, datamodule._loader(ds, datamodule.eval_batch_size, shuffle=False),
                                   precision))
        if task.is_regression:
            labels = [f"{v:.3f}" for v in logits.squeeze(-1).clamp(0.0, 5.0).tolist()]
        else:
            labels = [task.file_labels[i] for i in logits.argmax(-1).tolist()]
        rows.append((stem, indices, labels))
    target.mkdir(parents=True, exist_ok=True)  # written only once every split is predicted
    for stem, indices, labels in rows:
        path = target / f"{stem}.tsv"
        path.write_text("index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in zip(indices, labels)))
        files[stem] = {"file": str(path), "rows": len(indices)}
    return {"files": files}


def predict_qa(model, datamodule, target: Path, precision: str) -> dict[str, Any]:
    """predictions.jsonl: one line per question of the test split (validation where the task
    has none), and the accuracy."""
    import torch

    from memtl.data.qa import read_qa_split

    split = "test" if datamodule.has_test else "validation"
    rows = read_qa_split(datamodule.task, split, datamodule.root)[:datamodule.max_eval_samples]
    ds = datamodule._load(split)
    logits = _logits(model, datamodule._loader(ds, datamodule.eval_batch_size, shuffle=False), precision)
    predicted = [int(i) for part in logits for i in part.argmax(-1)]
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "predictions.jsonl", "w") as f:
        for row, p in zip(rows, predicted):
            f.write(json.dumps({"id": row.get("id"), "prediction": p, "choice": row["choices"][p],
                                "answer": row.get("label")}) + "\n")
    labels = torch.tensor([r["label"] for r in rows])
    accuracy = float((torch.tensor(predicted) == labels).float().mean())
    return {"qa_split": split, "questions": len(rows), "accuracy": accuracy,
            "predictions": str(target / "predictions.jsonl")}
