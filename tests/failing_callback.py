"""A callback that breaks a run on purpose (tests of the failure/interrupt paths)."""
import os
import signal
from pathlib import Path

import lightning as L
import torch


class FailAtBatch(L.Callback):
    def __init__(self, batch: int = 1, interrupt: bool = False):
        self.batch, self.interrupt = batch, interrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            raise KeyboardInterrupt() if self.interrupt else RuntimeError(f"planned failure at batch {batch_idx}")


class NonFiniteAt(L.Callback):
    """Make the loss (``what=loss``: the model output's loss times NaN) or one gradient
    (``what=grad``: inf in the first trainable parameter's grad) non-finite at batch ``batch``.
    Records the trainable weights before and after that batch in ``NonFiniteAt.weights``."""

    weights: dict[str, dict] = {}

    def __init__(self, batch: int = 1, what: str = "loss"):
        self.batch, self.what = batch, what
        self._hook = None

    def _trainable(self, pl_module):
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx != self.batch:
            return
        NonFiniteAt.weights["before"] = self._trainable(pl_module)
        if self.what == "loss":
            def poison(module, args, kwargs, out):
                out.loss = out.loss * float("nan")
                return out
            self._hook = pl_module.model.register_forward_hook(poison, with_kwargs=True)

    def on_after_backward(self, trainer, pl_module):
        if self.what == "grad" and trainer.fit_loop.epoch_loop.batch_idx == self.batch:
            p = next(p for p in pl_module.parameters() if p.requires_grad)
            p.grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            NonFiniteAt.weights["after"] = self._trainable(pl_module)
            if self._hook is not None:
                self._hook.remove()


class StopOnceAt(L.Callback):
    """At the start of the batch that finds ``trainer.global_step == step``, send this
    process SIGTERM (``how=sigterm``) or crash (``how=crash``) -- once: ``marker`` (a file)
    remembers it, so rerunning the very same command then runs through."""

    def __init__(self, step: int, marker: str, how: str = "sigterm"):
        self.step, self.marker, self.how = step, Path(marker), how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.touch()
        if self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning finishes this batch, then stops
        else:
            raise RuntimeError(f"planned crash at global step {self.step}")


class DumpFirstStep(L.Callback):
    """Write this rank's trainable gradients (as the optimizer sees them: under DDP after the
    all-reduce) and weights after the first optimizer step to ``<dirpath>/rank<r>.pt``."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.grads: dict | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
            self.dirpath.mkdir(parents=True, exist_ok=True)
            torch.save({"grads": self.grads, "weights": weights, "batch": batch["labels"].numel(),
                        "world": trainer.world_size}, self.dirpath / f"rank{trainer.global_rank}.pt")


class FailInJob(L.Callback):
    """Breaks only job ``num`` of a Hydra multirun (a failed trial amid good ones)."""

    def __init__(self, num: int = 1):
        self.num = num

    def on_train_start(self, trainer, pl_module):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num == self.num:
            raise RuntimeError(f"planned failure in job {self.num}")
