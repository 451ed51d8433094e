"""Memory and throughput of real training steps, logged to every logger.

On a few chosen training batches the callback measures one full step (forward +
backward) with ``StepMemoryMeter`` (docs/DESIGN.md §4); on the others it times the step. Grads
are set to None just before a measured step (Lightning would do it before the backward
anyway), so the figure is "relative to just before the step" exactly as in the benchmark.
"""
from __future__ import annotations

import statistics
import time

import lightning as L
import torch

from memtl.memory import StepMemoryMeter, mib


class MemoryMonitor(L.Callback):
    def __init__(self, measure_batches: list[int] = (1, 2), timing_warmup: int = 2):
        # batch 0 is skipped: it pays one-off allocations (optimizer state, caches)
        self.measure_batches = sorted(set(int(b) for b in measure_batches))
        self.timing_warmup = timing_warmup
        self.peak_step_bytes: int | None = None
        self.saved_tensor_bytes: int | None = None
        self.step_times: list[float] = []
        self.batch_size: int | None = None
        self._seen = 0
        self._meter: StepMemoryMeter | None = None
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_size = int(batch["labels"].shape[0]) if isinstance(batch, dict) and "labels" in batch else None
        at_boundary = batch_idx % trainer.accumulate_grad_batches == 0
        if self._seen in self.measure_batches and at_boundary:
            pl_module.zero_grad(set_to_none=True)
            params = [p for p in pl_module.parameters()]
            self._meter = StepMemoryMeter(pl_module.device, params)
            self._meter.start()
        else:
            _sync(pl_module.device)
            self._t0 = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss):
        if self._meter is not None:
            self._meter.mark_backward()

    def on_after_backward(self, trainer, pl_module):
        if self._meter is None:
            return
        meter, self._meter = self._meter, None
        meter.stop()
        peak, saved = meter.peak_step_bytes, meter.saved_tensor_bytes
        self.peak_step_bytes = max(self.peak_step_bytes or 0, peak)
        self.saved_tensor_bytes = max(self.saved_tensor_bytes or 0, saved)
        for logger in trainer.loggers:
            logger.log_metrics(
                {"memory/peak_step_mib": mib(peak), "memory/saved_tensor_mib": mib(saved)}, step=trainer.global_step
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is not None:
            _sync(pl_module.device)
            if self._seen >= self.timing_warmup:
                self.step_times.append(time.perf_counter() - self._t0)
            self._t0 = None
        self._seen += 1

    def on_exception(self, trainer, pl_module, exception):
        # a step that fails while measured: its profiler must stop, or the process that reports
        # the failure ends in a segmentation fault at exit instead of the run's exit code
        if self._meter is not None:
            meter, self._meter = self._meter, None
            meter.stop()

    def on_train_end(self, trainer, pl_module):
        summary = self.summary()
        flat = {f"memory/{k}": v for k, v in summary["memory"].items() if v is not None}
        flat.update({f"throughput/{k}": v for k, v in summary["throughput"].items() if v is not None})
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)

    def summary(self) -> dict:
        step_time = statistics.median(self.step_times) if self.step_times else None
        return {
            "memory": {
                "peak_step_bytes": self.peak_step_bytes,
                "saved_tensor_bytes": self.saved_tensor_bytes,
                "peak_step_mib": mib(self.peak_step_bytes),
                "saved_tensor_mib": mib(self.saved_tensor_bytes),
            },
            "throughput": {
                "step_time_s": step_time,
                "samples_per_s": (self.batch_size / step_time) if step_time and self.batch_size else None,
                "timed_steps": len(self.step_times),
            },
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
