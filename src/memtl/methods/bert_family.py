"""What MEFT and SHERL need to know about a BERT-family model, in one place:
where its encoder layers are, whether it is supported, and which head stays trainable."""
from __future__ import annotations

import torch.nn as nn

from memtl.errors import ConfigError
from memtl.methods import head_parameter_names

SUPPORTED_MODEL_TYPES = ("bert", "roberta")


def find_backbone(model: nn.Module) -> nn.Module | None:
    """The ``BertModel``/``RobertaModel`` inside ``model`` (or ``model`` itself)."""
    if hasattr(model, "embeddings") and hasattr(model, "encoder"):
        return model
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(base, nn.Module) and hasattr(base, "encoder"):
        return base
    return None


def looks_like_bert_layer(layer: nn.Module) -> bool:
    attn = getattr(layer, "attention", None)
    return (all(hasattr(layer, a) for a in ("attention", "intermediate", "output"))
            and hasattr(attn, "self") and hasattr(attn, "output"))


def encoder_layers(model: nn.Module, method: str, label: str,
                   installed: type | None = None) -> tuple[nn.Module, nn.ModuleList]:
    """(backbone, its encoder layers) of a supported, not yet converted encoder model;
    otherwise one ConfigError line. ``installed``: the encoder class the method installs
    (None: the method checks for itself whether it was applied already)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    backbone = find_backbone(model)
    if installed is not None and isinstance(getattr(backbone, "encoder", None), installed):
        raise ConfigError(f"method={method}: {type(model).__name__} already has {label} applied; "
                          "apply a method once, to a fresh pre-trained model")
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if model_type not in SUPPORTED_MODEL_TYPES or layers is None or not all(map(looks_like_bert_layer, layers)):
        raise ConfigError(f"method={method}: model type {model_type!r} ({type(model).__name__}) is not supported; "
                          f"{label} supports {', '.join(SUPPORTED_MODEL_TYPES)} (BERT-family encoders): "
                          "choose such a backbone")
    if config.is_decoder or getattr(config, "add_cross_attention", False):
        raise ConfigError(f"method={method}: {type(model).__name__} is configured as a decoder "
                          f"(is_decoder/add_cross_attention); {label} supports BERT-family encoders only")
    return backbone, layers


def unfreeze_head(model: nn.Module, backbone: nn.Module) -> None:
    """The task head trains in every method (classifier, and BERT's pooler that feeds it)."""
    for name in head_parameter_names(model):
        model.get_submodule(name).requires_grad_(True)
    if getattr(backbone, "pooler", None) is not None:  # bare BertModel: its pooler is the head
        backbone.pooler.requires_grad_(True)
