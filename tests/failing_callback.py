"""A callback that breaks a run on purpose (tests of the failure/interrupt paths)."""
import lightning as L


class FailAtBatch(L.Callback):
    def __init__(self, batch: int = 1, interrupt: bool = False):
        self.batch, self.interrupt = batch, interrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            raise KeyboardInterrupt() if self.interrupt else RuntimeError(f"planned failure at batch {batch_idx}")


class FailInJob(L.Callback):
    """Breaks only job ``num`` of a Hydra multirun (a failed trial amid good ones)."""

    def __init__(self, num: int = 1):
        self.num = num

    def on_train_start(self, trainer, pl_module):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num == self.num:
            raise RuntimeError(f"planned failure in job {self.num}")
