from memtl.callbacks.checkpoint import LastCheckpoint
from memtl.callbacks.guard import NonFiniteError, NonFiniteGuard
from memtl.callbacks.memory import MemoryMonitor

__all__ = ["LastCheckpoint", "MemoryMonitor", "NonFiniteError", "NonFiniteGuard"]
