from memtl.callbacks.guard import NonFiniteError, NonFiniteGuard
from memtl.callbacks.memory import MemoryMonitor

__all__ = ["MemoryMonitor", "NonFiniteError", "NonFiniteGuard"]
