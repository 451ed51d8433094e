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
        self._losses: list[torch.Tensor] = []  # this step's (micro-batch) losses

    def on_before_backward(self, trainer, pl_module, loss):
        self._losses.append(loss.detach().float().reshape(-1)[:1])  # checked with the grads: one sync per step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        losses, self._losses = self._losses, []
        check_grads = getattr(trainer.precision_plugin, "scaler", None) is None
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None] if check_grads else []
        checks = [torch.isfinite(x).all() for x in losses] + [torch.isfinite(g).all() for _, g in named]
        flags = torch.stack(checks) if checks else torch.ones(0, dtype=torch.bool)
        if bool(flags.all()) and trainer.world_size == 1:
            return
        # under DDP the ranks decide together (a NaN loss may be on one rank only)
        loss_ok = flags[: len(losses)].tolist()
        loss_bad = trainer.strategy.reduce_boolean_decision(not all(loss_ok), all=False)
        bad_grads = [n for (n, _), ok in zip(named, flags[len(losses):].tolist()) if not ok]
        if not (loss_bad or bad_grads):
            return

        loop = trainer.fit_loop.epoch_loop
        where = f"at global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {loop.batch_idx})"
        if loss_bad:
            bad = [x.item() for x, ok in zip(losses, loss_ok) if not ok]
            what = f"non-finite loss ({bad[0]})" if bad else "non-finite loss (on another rank)"
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
