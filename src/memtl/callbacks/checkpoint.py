"""``last.ckpt``: the state a rerun of the same command resumes from (``resume=auto``).

Saved every ``every_n_steps`` optimizer steps, after every evaluation, at every epoch
end, and when SIGTERM arrives (Lightning then stops at the end of that batch). Like every
memtl checkpoint it holds only the trainable weights, plus optimizer/scheduler state, loop
and data-order state, the RNG state and the run's config (``FineTuneModule.on_save_checkpoint``).

A step right before an evaluation is not saved on its own: the checkpoint follows the
evaluation, so a resumed run never re-runs nor loses one; nor is a step in the middle of
gradient accumulation (SIGTERM there stops without saving: the run resumes from the
previous save). The file is written beside and then renamed, so a crash mid-write leaves
the previous one intact.

Why not Lightning's ``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` (Lightning
2.6): it saves only when ``global_step % N == 0`` at a batch end, not N steps after the
previous save; with a step trigger it saves neither after an evaluation nor at an epoch
end (both are skipped unless that step was just saved), so a resume re-runs the
evaluations since; and it saves on SIGTERM only through ``save_on_exception``, which also
saves on any crash, where the data position already counts the batch that was never
trained. tests/test_resume.py fails with it (which steps resume, SIGTERM's step lost,
and with ``save_on_exception`` a run resumed mid-accumulation ends a step short).
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L


class LastCheckpoint(L.Callback):
    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str, every_n_steps: int = 100):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be >= 1")
        self.path = Path(dirpath) / self.FILENAME
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def save(self, trainer) -> None:
        if trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        tmp = self.path.with_name(self.FILENAME + ".tmp")
        trainer.save_checkpoint(tmp)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self._saved_step = trainer.global_step

    def on_train_start(self, trainer, pl_module):
        self._saved_step = trainer.global_step  # a resumed run has just loaded this step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loop = trainer.fit_loop.epoch_loop
        if loop.batch_progress.is_last_batch or loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            return  # an evaluation (or the epoch end) follows: save after it instead
        if loop._should_accumulate():
            return  # mid-accumulation the partial gradients are not saved: a resume would lose them
        if trainer.received_sigterm or trainer.global_step - self._saved_step >= self.every_n_steps:
            self.save(trainer)

    def on_validation_end(self, trainer, pl_module):
        loop = trainer.fit_loop.epoch_loop
        if trainer.state.fn == "fit" and not loop.batch_progress.is_last_batch and not loop._should_accumulate():
            self.save(trainer)  # a mid-epoch evaluation (val_check_interval < 1)

    def on_train_epoch_end(self, trainer, pl_module):
        self.save(trainer)
