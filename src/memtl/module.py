"""The LightningModule: one for every method, every GLUE task and multiple-choice QA.

The wrapped model is whatever ``apply_method`` returned (a plain HF model, a peft model,
a reversible model ...), for QA inside ``memtl.scoring.MultipleChoiceModel`` (logits =
one score per choice): the module only calls it with the batch and reads ``loss`` and
``logits``. Model selection tracks the task's main metric on the first eval split.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
import torch.nn as nn

from memtl.metrics import GlueMetrics

log = logging.getLogger("memtl")

class FineTuneModule(L.LightningModule):
    def __init__(self, model: nn.Module, task, optim: dict[str, Any], config: dict | None = None):
        super().__init__()
        self.model = model
        self.task = task
        self.main_metric = task.main_metric
        self.optim = dict(optim)
        self.run_config = config  # stored in checkpoints so they can be reloaded
        self.val_metrics = nn.ModuleList([GlueMetrics(task) for _ in task.eval_splits])
        self.test_metrics = nn.ModuleList([GlueMetrics(task) for _ in task.eval_splits])
        self.test_results: dict[str, float] | None = None  # the LST protocol's held-out test split
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.history: list[dict[str, float]] = []  # one entry per completed evaluation
        self.best: dict[str, Any] | None = None
        # epoch of the last training step: an evaluation after fit (max_steps reached mid-epoch)
        # belongs to it, while Lightning's current_epoch has already moved on
        self.last_train_epoch: int | None = None

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        self.last_train_epoch = self.current_epoch
        out = self.model(**batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return out.loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        out = self.model(**batch)
        self.val_metrics[dataloader_idx].update(out.logits.detach(), batch["labels"])

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        out = self.model(**batch)
        self.test_metrics[dataloader_idx].update(out.logits.detach(), batch["labels"])

    def _compute(self, metric_list) -> dict[str, float]:
        values: dict[str, float] = {}
        # one metrics object per eval split; MNLI's mismatched keys carry the prefix "mm_"
        for prefix, metrics in zip(self.task.eval_prefixes, metric_list):
            if metrics.update_called:
                for name, value in metrics.compute().items():
                    values[prefix + name] = float(value)
            metrics.reset()
        return values

    def on_test_epoch_end(self):
        self.test_results = self._compute(self.test_metrics)
        for k, v in self.test_results.items():
            self.log(f"test/{k}", v, sync_dist=True)

    def on_validation_epoch_end(self):
        values = self._compute(self.val_metrics)
        for k, v in values.items():  # torchmetrics already synced them: averaging equal values is a no-op
            self.log(f"val/{k}", v, prog_bar=k == self.main_metric, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        for k, v in self.diagnostics().items():
            self.log(k.replace("_", "/", 1), v, sync_dist=True)  # equal on every rank: a no-op
        after_fit = self.trainer.state.fn == "validate" and self.last_train_epoch is not None
        epoch = self.last_train_epoch if after_fit else self.current_epoch
        entry = {"epoch": epoch, "step": self.global_step, **values}
        self.history.append(entry)
        value = values[self.main_metric]
        if self.best is None or (not math.isnan(value) and (math.isnan(self.best["value"]) or value > self.best["value"])):
            self.best = {
                "metric": self.main_metric,
                "value": value,
                "epoch": epoch,
                "step": self.global_step,
                "metrics": values,
            }
        log.info("epoch %d step %d: %s (best %s=%.4f at epoch %d)", epoch, self.global_step,
                 " ".join(f"{k}={v:.4f}" for k, v in values.items()), self.main_metric, self.best["value"],
                 self.best["epoch"])

    def diagnostics(self) -> dict[str, float]:
        """Method state worth watching beside the metrics (logged at each evaluation, the
        final values in results.json): SHERL's skip-gate opening or side-output scale."""
        from memtl.methods.sherl.side import SideModule

        sides = [m for m in self.model.modules() if isinstance(m, SideModule)]
        return sides[0].diagnostics() if sides else {}

    # -- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # the usual transformer recipe: no weight decay on biases and LayerNorm weights
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"],
            betas=tuple(o["betas"]),
            eps=o["eps"],
        )
        from transformers import get_linear_schedule_with_warmup

        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = o.get("warmup_steps") or int(round(o.get("warmup_ratio", 0.0) * total))
        # linear warm-up from 0 (the first step's lr is 0) to the lr at step `warmup`, then linear decay to 0
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: trainable weights only ----------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from memtl.methods import plain_options
        from memtl.pretrained import unwrap

        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["memtl"] = {
            "contents": "trainable weights only (+ optimizer/scheduler/loop state), to resume training: rerun the "
            "same command into the same output folder. To use the trained model, load the run's model/ folder "
            "(a completed run writes its best weights there): memtl.from_pretrained('<run>/model')",
            "trainable_keys": len(checkpoint["state_dict"]),
            "config": self.run_config,
            # the method's options as resolved for this backbone: a resume compares them, as a
            # default that changes between versions leaves the config the same
            "method": plain_options(unwrap(self.model)[0].memtl_method["options"]),
            # what a resumed run needs to continue exactly where this one stands
            "history": self.history,
            "best": self.best,
            "rng": _rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from memtl.pretrained import peft_key_names

        # a checkpoint from before SHERL's late LoRA went through peft: its keys, renamed
        names = {f"model.{k}": None for k in self.model.state_dict()}
        checkpoint["state_dict"] = peft_key_names(checkpoint["state_dict"], names)
        state = checkpoint.get("memtl", {})
        if self.trainer.state.fn != "fit":
            return  # e.g. testing the best checkpoint: keep this run's history
        self.history = list(state.get("history", []))
        self.best = state.get("best")
        self._rng_to_restore = state.get("rng")

    def on_train_start(self) -> None:
        # Resuming: the data position. Lightning hands the train loader its saved state only
        # when it creates the loader, which configure_optimizers (estimated_stepping_batches)
        # already did before the loop state was restored; no batch has been drawn yet. A private
        # call, kept: without it the saved position never reaches the loader (tests/test_resume.py)
        self.trainer.fit_loop._load_combined_loader_states()
        # the RNG: here rather than on load, as nothing in between may draw from it
        rng, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if rng is not None:
            _set_rng_states(rng[self.global_rank] if isinstance(rng, list) else rng)


def _rng_states():
    """This process's generators (dropout draws from them); under DDP every rank's, in rank order."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain values only: Lightning loads checkpoints with weights_only=True
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)  # every rank saves (Lightning calls this on all of them)
        return states
    return state


def _set_rng_states(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
