"""Stop (or skip) a training step whose loss or gradients are not finite.

Checked once per optimizer step, after backward and before the optimizer (and before
gradient clipping, which would smear one NaN over every parameter):

- ``stop``: raise ``NonFiniteError``, one line naming the global step and the loss or the
  first parameter whose gradient is NaN/inf; the run ends ``failed`` with that reason.
- ``skip``: drop the gradients (``grad = None``) so the optimizer leaves the weights and its
  own state untouched; the batch still counts as a step (the LR schedule moves on).
  Skipped steps are counted in ``results.json`` (``guard``).

Under DDP gradients are already all-reduced (a NaN on one rank reaches all of them) and
the loss flag is reduced across ranks, so every rank takes the same decision.
With fp16 loss scaling (``16-mixed``) inf gradients are routine: the scaler skips those
steps itself, so only the loss is checked there.
"""
from __future__ import annotations

import logging

import lightning as L
import torch

from memtl.errors import RunError

log = logging.getLogger("memtl")
MODES = ("stop", "skip")  # = memtl.run.GUARD_MODES (kept there import-free for the CLI check)


class NonFiniteError(RunError):
    pass


class NonFiniteGuard(L.Callback):
    def __init__(self, mode: str = "stop"):
        if mode not in MODES:
            raise ValueError(f"guard.nonfinite={mode}: choose one of {', '.join(MODES)}")
        self.mode = mode
        self.skipped: list[int] = []  # global steps whose update was skipped
        self._bad_loss: float | None = None  # first non-finite loss since the last optimizer step

    def on_before_backward(self, trainer, pl_module, loss):
        if self._bad_loss is None and not torch.isfinite(loss.detach()).all():
            self._bad_loss = loss.detach().float().mean().item()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        bad_loss, self._bad_loss = self._bad_loss, None
        # one collective per step under DDP; a no-op on one device
        loss_bad = trainer.strategy.reduce_boolean_decision(bad_loss is not None, all=False)
        bad_grads: list[str] = []
        if not loss_bad and getattr(trainer.precision_plugin, "scaler", None) is None:
            named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
            if named:
                finite = torch.stack([torch.isfinite(g).all() for _, g in named])
                if not bool(finite.all()):  # one sync; names only on the rare bad step
                    bad_grads = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
        if not (loss_bad or bad_grads):
            return

        where = f"at global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx})"
        if loss_bad:
            what = f"non-finite loss ({bad_loss})" if bad_loss is not None else "non-finite loss (on another rank)"
        else:
            more = f" and {len(bad_grads) - 1} more" if len(bad_grads) > 1 else ""
            what = f"non-finite gradient in {bad_grads[0]}{more}"
        if self.mode == "stop":
            raise NonFiniteError(f"{what} {where}: run stopped (guard.nonfinite=skip skips such steps instead)")
        for p in pl_module.parameters():
            p.grad = None  # AdamW skips parameters without grad: weights and moments unchanged
        self.skipped.append(trainer.global_step)
        log.warning("%s %s: step skipped (%d so far)", what, where, len(self.skipped))

    def summary(self) -> dict:
        return {"nonfinite": self.mode, "skipped_steps": len(self.skipped), "skipped_at": self.skipped}

    # the count survives a resume
    def state_dict(self) -> dict:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = list(state_dict.get("skipped", []))
