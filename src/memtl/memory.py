"""Honest memory figures for one training step (docs/DESIGN.md §4).

``StepMemoryMeter`` is started just before a step and stopped right after its backward:

* peak step memory — the peak of live bytes allocated during the step, relative to just
  before it. CUDA: the allocator's peak counter. CPU: the profiler's raw ``[memory]``
  events summed in time order (running maximum).
* saved-for-backward bytes — tensors packed by autograd during the forward (what the
  backward will need), each storage counted once, parameters excluded. Tensors packed
  later, by recomputation inside the backward (reversible layers, checkpointing), are
  transient and not counted: call ``mark_backward()`` between forward and backward. Code that installs its own saved-tensor hooks (non-reentrant
  checkpointing, reversible engines) hides its tensors from this hook, so it is a
  breakdown, not the headline.

The benchmark and the Lightning memory callback both use this class, so the two agree.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile


class StepMemoryMeter:
    def __init__(self, device: torch.device | str = "cpu", params=()):
        self.device = torch.device(device)
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.peak_step_bytes: int | None = None
        self.saved_tensor_bytes: int | None = None
        self.elapsed_s: float | None = None

    # -- saved tensors -------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        if self._in_backward:
            return t
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._param_ptrs and ptr not in self._seen:
                self._seen.add(ptr)
                self._saved += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
            pass
        return t

    # -- start / stop --------------------------------------------------------------
    def start(self) -> None:
        self._seen: set[int] = set()
        self._saved = 0
        self._in_backward = False
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        self._t0 = time.perf_counter()

    def mark_backward(self) -> None:
        """The forward is done: from here on, saved tensors belong to recomputation."""
        self._in_backward = True

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.elapsed_s = time.perf_counter() - self._t0
            self.peak_step_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.elapsed_s = time.perf_counter() - self._t0
            self._prof.__exit__(None, None, None)
            self.peak_step_bytes = cpu_peak_bytes(self._prof)
            del self._prof
        self._hooks.__exit__(None, None, None)
        self.saved_tensor_bytes = self._saved

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def cpu_peak_bytes(prof) -> int:
    """Running maximum of live bytes from the profiler's raw memory events."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20
