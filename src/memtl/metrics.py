"""GLUE metrics on torchmetrics (so they sync across DDP ranks), exactly as GLUE defines them:
CoLA Matthews correlation, STS-B Pearson + Spearman, MRPC/QQP accuracy + F1 of class 1,
accuracy elsewhere. Multiple-choice QA: accuracy over the (batch, choices) scores.

Keys returned by `compute()`: the task's `metrics` names, prefixed with `prefix`
(use `task.eval_prefixes[dataloader_idx]`: "" for the first eval split, "mm_" for MNLI
mismatched), e.g. {"accuracy": .., "f1": ..} for MRPC, {"mm_accuracy": ..} for MNLI-mm.
"""

import warnings

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from memtl.data import get_task
from memtl.data.glue import GlueTask


def main_metric_mode(name: str) -> str:
    """"max" or "min" for checkpointing / early stopping on `name` (every GLUE metric is max)."""
    return "min" if name.split("/")[-1].endswith("loss") else "max"


class MatthewsCorrCoef(Metric):
    """Binary MCC from a summed confusion matrix, 0 when undefined (e.g. a constant
    prediction) as in sklearn/GLUE. torchmetrics' own returns an eps-based non-zero value
    there, which would mislead model selection early in CoLA training."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("confmat", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        self.confmat += torch.bincount(labels * 2 + preds, minlength=4)  # tn, fp, fn, tp

    def compute(self) -> torch.Tensor:
        tn, fp, fn, tp = self.confmat.double()
        denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).sqrt()
        return (tp * tn - fp * fn) / denom if denom > 0 else denom.new_zeros(())


class GlueMetrics(nn.Module):
    """update(logits_or_preds, labels) per batch, compute() -> {key: float}, reset() per epoch."""

    def __init__(self, task: GlueTask | str, prefix: str = "", sync: bool = True):  # or a memtl.data.qa.QATask
        # sync=False: compute() stays on this process (no DDP collective), for data every rank holds whole
        super().__init__()
        self.task, self.prefix = get_task(task), prefix
        kw = {"sync_on_compute": sync}
        make = {
            "accuracy": lambda: MulticlassAccuracy(num_classes=self.task.num_labels, average="micro", **kw),
            "f1": lambda: BinaryF1Score(**kw),  # positive class = label 1 (equivalent / duplicate)
            "mcc": lambda: MatthewsCorrCoef(**kw),
            "pearson": lambda: PearsonCorrCoef(**kw),
            "spearman": lambda: SpearmanCorrCoef(**kw),
        }
        with warnings.catch_warnings():  # Spearman warns that it keeps all preds: 1.5k floats here
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions")
            self.metrics = MetricCollection({name: make[name]() for name in self.task.metrics})

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.prefix + name for name in self.task.metrics)

    @property
    def update_called(self) -> bool:
        return any(m.update_called for m in self.metrics.values())

    @torch.no_grad()
    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        preds, labels = preds.detach(), labels.detach()
        if self.task.is_regression:  # (B, 1) or (B,) scores; float32 also for bf16/fp16 logits
            preds, labels = preds.reshape(-1).float(), labels.reshape(-1).float()
        else:
            if preds.ndim == labels.ndim + 1:  # logits (B, C) -> class ids
                preds = preds.argmax(-1)
            preds, labels = preds.long(), labels.long()
        self.metrics.update(preds, labels)

    def compute(self) -> dict[str, float]:
        return {self.prefix + k: float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()

    def forward(self, preds, labels):  # module-call = update, so `metrics(logits, labels)` works
        self.update(preds, labels)


def majority_class_baseline(task: GlueTask | str, train_labels: torch.Tensor,
                            eval_labels: list[torch.Tensor]) -> dict | None:
    """The dev scores of always predicting the training split's most frequent label, with the
    task's own metrics: the floor a fine-tuned model has to clear (RTE dev: 52.7% accuracy,
    MRPC: 68.4%). One metrics dict per eval split, keys prefixed as in training. None for a
    regression task (a constant has no correlation)."""
    task = get_task(task)
    if task.is_regression:
        return None
    label = int(torch.bincount(train_labels.long(), minlength=task.num_labels).argmax())
    scores = {}
    for prefix, labels in zip(task.eval_prefixes, eval_labels):
        metrics = GlueMetrics(task, prefix=prefix, sync=False)  # every rank holds the whole dev split
        metrics.update(torch.full_like(labels.long(), label), labels)
        scores.update(metrics.compute())
    return {"predictor": "majority class of the training split", "label": label, "metrics": scores}
