"""memtl: memory-efficient fine-tuning of pre-trained transformers.

    import memtl
    model = memtl.apply_method(hf_model, "lora", r=8)
"""
from memtl.errors import ConfigError
from memtl.methods import apply_method, available_methods, count_parameters

__all__ = ["apply_method", "available_methods", "count_parameters", "ConfigError"]
__version__ = "0.1.0"
