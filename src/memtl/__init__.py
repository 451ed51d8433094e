"""memtl: memory-efficient fine-tuning of pre-trained transformers.

    import memtl
    model = memtl.apply_method(hf_model, "lora", r=8)
    ...  # train
    memtl.save_pretrained(model, "out/model", tokenizer=tokenizer)
    model = memtl.from_pretrained("out/model")
"""
from memtl.errors import ConfigError
from memtl.methods import apply_method, available_methods, count_parameters
from memtl.pretrained import from_pretrained, save_pretrained

__all__ = ["apply_method", "available_methods", "count_parameters", "ConfigError", "from_pretrained",
           "save_pretrained"]
__version__ = "0.1.0"
