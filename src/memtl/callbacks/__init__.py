from memtl.callbacks.memory import MemoryMonitor

__all__ = ["MemoryMonitor"]
