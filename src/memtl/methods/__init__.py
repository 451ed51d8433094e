"""Fine-tuning methods, applied to any Hugging Face model through one entry point.

    model = memtl.apply_method(model, "lora", r=8, gradient_checkpointing=True)

A method is a function ``fn(model, **options) -> model`` registered with
``@register_method(name, options_cls)``. ``options_cls`` is a dataclass whose fields
are the method's options, each declared once with its type, default and allowed values
(``memtl.methods.options``: checked on construction, listed by ``memtl options``); unknown
option names are rejected with the list of valid ones. Afterwards exactly the parameters the method
trains have ``requires_grad=True``.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch.nn as nn

from memtl.errors import ConfigError

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], type]] = {}


def register_method(name: str, options_cls: type):
    def deco(fn):
        _REGISTRY[name] = (fn, options_cls)
        return fn

    return deco


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def method_options(name: str, **options: Any):
    """Build and validate the options dataclass of method ``name``."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(sorted(_REGISTRY))}")
    _, options_cls = _REGISTRY[name]
    valid = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(
            f"method '{name}' has no option {', '.join(repr(u) for u in unknown)}: "
            f"valid options are {', '.join(sorted(valid))}"
        )
    return options_cls(**options)


def method_defaults(name: str) -> dict[str, Any]:
    """The default of every option of method ``name`` (``{}`` for an unknown method)."""
    _load_builtin()
    if name not in _REGISTRY:
        return {}
    return {f.name: f.default for f in dataclasses.fields(_REGISTRY[name][1])
            if f.default is not dataclasses.MISSING}


def default_lr(name: str, model_type: str | None) -> float:
    """``method.lr: null``: the method's learning rate for a backbone of ``model_type``."""
    _load_builtin()
    options_cls = _REGISTRY[name][1] if name in _REGISTRY else None
    if not hasattr(options_cls, "default_lr"):
        raise ConfigError(f"method.lr=null: method {name!r} has no family-dependent learning rate; "
                          "set method.lr to a number")
    return options_cls.default_lr(model_type)


def apply_method(model: nn.Module, name: str, **options: Any) -> nn.Module:
    """Prepare ``model`` for fine-tuning with method ``name``; returns the model to train.

    The returned object may be a wrapper (e.g. a ``peft`` model for LoRA); always use
    the return value.
    """
    config = getattr(model, "config", None)
    opts = resolved_options(name, config, **options)
    fn, _ = _REGISTRY[name]
    model = fn(model, opts)
    # options: what memtl.save_pretrained records, so that from_pretrained can rebuild the model;
    # defaults: what they would have been on this backbone, so a report can tell a choice from a default
    model.memtl_method = {"name": name, "options": dataclasses.asdict(opts),
                          "defaults": dataclasses.asdict(resolved_options(name, config))}
    return model


def resolved_options(name: str, config, **options: Any):
    """The options dataclass of method ``name`` with every family-dependent default (``None``)
    resolved for a backbone of ``config`` (a transformers config, or None)."""
    opts = method_options(name, **options)
    return opts.for_model(config, name) if hasattr(opts, "for_model") else opts


def plain_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as a config file writes them (tuples as lists), so they compare with one."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def supported_model_type(model: nn.Module, architectures, method: str) -> str:
    """``model``'s ``config.model_type`` if ``architectures`` (a mapping keyed by model type)
    has it, else one ConfigError line naming the supported types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in architectures:
        raise ConfigError(f"method={method}: model type {model_type!r} ({type(model).__name__}) is not supported; "
                          f"{method.upper().rstrip('123')} supports {', '.join(sorted(architectures))}: "
                          "choose such a backbone")
    return model_type


def architecture_module(model: nn.Module, package: str, architectures: dict[str, str], method: str):
    """The module of ``package`` that ``architectures`` maps ``model``'s ``config.model_type``
    to (MEFT has one per architecture family), or ``supported_model_type``'s error."""
    return importlib.import_module(f"{package}.{architectures[supported_model_type(model, architectures, method)]}")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (shared tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total}


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the task-head modules of a HF model (kept trainable by every method)."""
    names = []
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(base, nn.Module) and isinstance(getattr(base, "pooler", None), nn.Module):
        names.append(f"{model.base_model_prefix}.pooler")  # BERT's pooler feeds its classifier
    for attr in ("classifier", "classification_head", "score", "qa_outputs"):
        if isinstance(getattr(model, attr, None), nn.Module):
            names.append(attr)
    return names


_loaded = False


def _load_builtin() -> None:
    # import for the side effect of registration; lazy so `import memtl` stays light
    global _loaded
    if _loaded:
        return
    _loaded = True
    from memtl.methods import full, head, lora, meft, sherl  # noqa: F401
