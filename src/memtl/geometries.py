"""Every model shape memtl builds with random weights, in one table: the tiny models of the
tests and of ``conf/backbone/tiny_*``, and the random-init stand-ins for real models that
``memtl bench``, ``memtl estimate``, ``memtl recon`` and ``memtl gradcheck`` measure.

A geometry is a model type and the ``transformers`` config keywords of its shape. Token ids
(vocabulary, pad, BOS/EOS) are left to whoever builds the model, except where a stand-in
needs its real vocabulary. Kept free of torch, so that the estimator stays light.
"""
from __future__ import annotations

from typing import Any

# model_type -> transformers config class
CONFIG_CLASSES = {"bert": "BertConfig", "roberta": "RobertaConfig", "bart": "BartConfig", "opt": "OPTConfig",
                  "llama": "LlamaConfig"}
# the keys that set a model's depth (every stack's: BART's encoder and decoder alike)
DEPTH_KEYS = {"bart": ("encoder_layers", "decoder_layers")}

GEOMETRIES: dict[str, tuple[str, dict[str, Any]]] = {
    # tests and smoke runs
    "tiny-bert": ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
    "tiny-roberta": ("roberta", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=514)),
    "tiny-bart": ("bart", dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)),
    "tiny-opt": ("opt", dict(hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=4,
                             ffn_dim=64)),
    # grouped-query attention like SmolLM2's
    "tiny-llama": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, tie_word_embeddings=True)),
    # stand-ins for real models
    "minilm-random": ("bert", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                   intermediate_size=1536)),
    "bert-base": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072)),
    # BERT-base with 2048 learned positions: sequence-length sweeps past BERT's 512
    "bert-base-2k": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, max_position_embeddings=2048)),
    "bart-base": ("bart", dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                               decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)),
    "opt-125m": ("opt", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072)),
    # post-LayerNorm, embeddings of width 512 projected in and out of the 1024-wide stack
    "opt-350m": ("opt", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                             word_embed_proj_dim=512, do_layer_norm_before=False)),
    "smollm2-random": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                     num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                     tie_word_embeddings=True, pad_token_id=0)),
}


def geometry(name: str, layers: int | None = None, **overrides) -> tuple[str, dict[str, Any]]:
    """``(model_type, config keywords)`` of the named geometry; ``layers`` sets the depth of
    every stack, ``overrides`` replace or add config keywords."""
    if name not in GEOMETRIES:
        from memtl.errors import ConfigError

        raise ConfigError(f"unknown geometry {name!r}: choose one of {', '.join(GEOMETRIES)}")
    model_type, kwargs = GEOMETRIES[name]
    kwargs = dict(kwargs)
    if layers:
        kwargs.update({k: layers for k in DEPTH_KEYS.get(model_type, ("num_hidden_layers",))})
    kwargs.update(overrides)
    return model_type, kwargs


def build_config(name: str, layers: int | None = None, **overrides):
    """The named geometry as a ``transformers`` config object."""
    import transformers

    model_type, kwargs = geometry(name, layers, **overrides)
    return getattr(transformers, CONFIG_CLASSES[model_type])(**kwargs)
