"""Save a fine-tuned model as a small folder and load it back, the Hugging Face way.

    memtl.save_pretrained(model, "runs/rte/model", tokenizer=tokenizer)
    model = memtl.from_pretrained("runs/rte/model")       # a fresh process is fine

The folder (what inference needs, and what ``huggingface_hub.upload_folder`` takes as is):

- ``memtl.json``: the folder's format, the memtl version, the method and its options, the
  backbone (its config entry: name, source, path; the head and label count) and, for a
  siamese pair model, the pair head;
- ``config.json``: the backbone's Hugging Face config;
- the trained weights: ``model.safetensors`` with the trainable parameters only (every
  parameter for a backbone built at random, which no path can reload); LoRA: peft's own
  ``adapter_config.json`` + ``adapter_model.safetensors``, so ``PeftModel.from_pretrained``
  loads it too;
- the tokenizer's files, and ``README.md``, the model card.

``from_pretrained`` loads the backbone, applies the method with the saved options and loads
the weights: in eval mode its outputs equal the saved model's bit for bit. It returns what
``apply_method`` returns (a transformers model, or peft's wrapper of one for LoRA; a
``SiameseModel`` for a siamese pair model).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from memtl.errors import ConfigError

MANIFEST = "memtl.json"
WEIGHTS = "model.safetensors"
LORA_WEIGHTS = "adapter_model.safetensors"
FORMAT = 1  # what this memtl writes and the newest it reads


def _version() -> str:
    import memtl

    return memtl.__version__


def unwrap(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The model ``apply_method`` returned, and the pair head around it (or None)."""
    from memtl.scoring import MultipleChoiceModel
    from memtl.siamese import SiameseModel

    if isinstance(model, MultipleChoiceModel):  # scoring only: the LM / multiple-choice model is what trains
        model = model.model
    if isinstance(model, SiameseModel):
        return model.model, "siamese"
    return model, None


def _hf(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_pretrained(model: nn.Module, folder: str | Path, tokenizer=None, card: Mapping[str, Any] | None = None,
                    training: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (what ``apply_method`` returned, or a siamese / multiple-choice wrapper
    of it) to ``folder``; returns the folder. ``card``: what the model card should say
    beyond the method and backbone (task, dev metrics, peak memory, command).
    ``training``: the run's config (task, data, ...), kept so that ``eval.py`` can rebuild
    the data the model was selected on."""
    inner, pair = unwrap(model)
    stamp = getattr(inner, "memtl_method", None)
    if stamp is None:
        raise ConfigError(f"save_pretrained: {type(model).__name__} was not prepared by memtl.apply_method; "
                          "apply a method first (method 'full' trains every weight)")
    hf = _hf(inner)
    backbone = dict(getattr(hf, "memtl_backbone", None) or
                    {"name": hf.config.name_or_path, "source": "hub", "path": hf.config.name_or_path})
    if backbone.get("source") != "random" and not backbone.get("path"):
        raise ConfigError("save_pretrained: the backbone has no path to reload it from (config.name_or_path is "
                          "empty): load it with from_pretrained(<path>) before applying the method")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (WEIGHTS, LORA_WEIGHTS, "adapter_config.json"):  # an earlier save's other format
        (folder / stale).unlink(missing_ok=True)
    hf.config.save_pretrained(folder)
    everything = backbone.get("source") == "random"
    if stamp["name"] == "lora" and not everything:
        inner.save_pretrained(folder)  # peft's format: adapter_config.json + adapter_model.safetensors
        weights = LORA_WEIGHTS
    else:
        from safetensors.torch import save_file

        state = _state(model if pair else inner, everything)
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        weights = WEIGHTS
    manifest = {
        "format": FORMAT,
        "memtl_version": _version(),
        "method": stamp["name"],
        "options": stamp["options"],
        "backbone": backbone,
        "head": getattr(hf, "memtl_head", None) or _head_of(hf),
        "num_labels": hf.config.num_labels,
        "pair_head": pair,
        "weights": weights,
        "weights_cover": "all" if everything else "trainable",
        "dtype": str(next(hf.parameters()).dtype).removeprefix("torch."),
        "training": dict(training) if training is not None else None,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(manifest, card or {}))
    return folder


def _state(model: nn.Module, everything: bool) -> dict[str, torch.Tensor]:
    """The trainable parameters (or every parameter and buffer), contiguous and unshared."""
    if everything:
        named = list(model.state_dict(keep_vars=True).items())
    else:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {n: t.detach().clone().contiguous() for n, t in named}


def _head_of(hf: nn.Module) -> str:
    """The ``memtl.backbones.HEADS`` kind of a transformers model, from its class name."""
    name = type(hf).__name__
    for suffix, head in (("ForSequenceClassification", "sequence_classification"),
                         ("ForMultipleChoice", "multiple_choice"), ("ForCausalLM", "causal_lm"),
                         ("ForConditionalGeneration", "seq2seq_lm")):
        if name.endswith(suffix):
            return head
    raise ConfigError(f"save_pretrained: {name} has none of the heads memtl loads (sequence classification, "
                      "multiple choice, causal LM, seq2seq LM)")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """``memtl.json`` of a saved folder, checked: one ConfigError line for a missing or
    incomplete folder and for a format this memtl cannot read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder: give a folder written by memtl.save_pretrained "
                          "(a training run writes one as <run>/model)")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder} has no {MANIFEST}: it is not a folder written by memtl.save_pretrained "
                          "(a training run writes one as <run>/model)") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): save the model again") from None
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise ConfigError(f"{folder} was written by memtl {manifest.get('memtl_version', '?')} in format {fmt}; "
                          f"this memtl ({_version()}) reads format <= {FORMAT}: upgrade memtl")
    missing = [k for k in ("method", "options", "backbone", "head", "num_labels", "weights") if k not in manifest]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}: the folder is incomplete; save the model again")
    if not (folder / manifest["weights"]).is_file():
        raise ConfigError(f"{folder} has no {manifest['weights']}: the folder is incomplete; save the model again")
    return manifest


def from_pretrained(folder: str | Path, backbone: str | Mapping[str, Any] | None = None) -> nn.Module:
    """Rebuild the model saved in ``folder`` (``save_pretrained``), in eval mode.

    ``backbone``: where to load the pre-trained weights from instead of the saved entry: a
    local folder or hub id, or a backbone entry (``conf/backbone/*.yaml`` as a mapping)."""
    from memtl.backbones import HEADS, load_model
    from memtl.methods import apply_method
    from memtl.siamese import SiameseModel, siamese_head

    folder = Path(folder)
    m = read_manifest(folder)
    entry = dict(m["backbone"])
    if isinstance(backbone, str):
        entry = {"name": backbone, "source": "hub", "path": backbone}
    elif backbone is not None:
        entry = dict(backbone)
    if entry.get("source") == "random":
        if m.get("weights_cover") != "all":
            raise ConfigError(f"{folder} holds the trainable weights only, and backbone {entry.get('name')!r} is built "
                              "at random (its frozen weights would be random): a random backbone needs every weight "
                              "saved; load it with the backbone it was trained on")
        import transformers

        # the architecture from the saved config; every weight is overwritten below
        config = transformers.AutoConfig.from_pretrained(folder)
        # config.json leaves out a label count equal to PretrainedConfig's default (2), which
        # BartConfig then reads back as its own default (3): the manifest's count is the truth
        config.num_labels = m["num_labels"]
        model = getattr(transformers, HEADS[m["head"]]).from_config(config)
    else:
        model = load_model(entry, m["num_labels"], _tokenizer(folder), head=m["head"])
    model.to(getattr(torch, m.get("dtype", "float32")))
    if m.get("pair_head") == "siamese":
        model = siamese_head(model)
    options = dict(m["options"])
    if m["method"] in ("meft1", "meft2", "meft3"):
        options.setdefault("output", "mean")  # a folder saved before method.output: the streams' average
    model = apply_method(model, m["method"], **options)
    wrapped = SiameseModel(model) if m.get("pair_head") == "siamese" else model
    _load_weights(wrapped, model, folder, m)
    return wrapped.eval()


def _tokenizer(folder: Path):
    """The saved tokenizer (it sets a decoder classifier's pad id, as at training), if any."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _load_weights(wrapped: nn.Module, model: nn.Module, folder: Path, m: Mapping[str, Any]) -> None:
    if m["weights"] == LORA_WEIGHTS:
        from peft import load_peft_weights, set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        expected = [n for n, p in model.named_parameters() if p.requires_grad]
        missing = [k for k in getattr(result, "missing_keys", []) or [] if k in expected]
        _fit(folder, missing, unexpected)
        return
    from safetensors.torch import load_file

    target = wrapped.state_dict(keep_vars=True)
    state = peft_key_names(load_file(str(folder / m["weights"])), target)
    expected = set(target) if m.get("weights_cover") == "all" else \
        {n for n, p in wrapped.named_parameters() if p.requires_grad}
    unexpected = sorted(set(state) - set(target))
    missing = sorted(expected - set(state))
    wrong = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    _fit(folder, missing, unexpected, wrong)
    with torch.no_grad():
        for k, v in state.items():
            target[k].copy_(v)


def peft_key_names(state: dict, target: Mapping[str, Any]) -> dict:
    """``state`` with keys saved before a layer was wrapped by peft's LoRA (SHERL's late LoRA
    was hand-written: ``q_proj.weight``, ``q_proj.lora_A.weight``) renamed to the keys they
    have in ``target`` now (``q_proj.base_layer.weight``, ``q_proj.lora_A.default.weight``)."""
    plain = {k.replace(".base_layer.", ".").replace(".default.", "."): k for k in target
             if ".base_layer." in k or ".lora_" in k}
    return {(plain[k] if k not in target and k in plain else k): v for k, v in state.items()}


def _fit(folder: Path, missing: list[str], unexpected: list[str], wrong: list[str] = ()) -> None:
    if not (missing or unexpected or wrong):
        return
    what = [f"{len(x)} {kind} (e.g. {x[0]})" for x, kind in ((missing, "missing"), (unexpected, "unexpected"),
                                                              (wrong, "of another shape")) if x]
    raise ConfigError(f"{folder}: the saved weights do not fit the backbone and method ({'; '.join(what)}): "
                      "load it with the backbone it was trained on (from_pretrained(folder, backbone=...))")


def model_card(manifest: Mapping[str, Any], card: Mapping[str, Any]) -> str:
    """README.md for the folder (the Hub shows it): base model, method, data, metrics,
    memory, command."""
    b = manifest["backbone"]
    base = b.get("path") or b.get("name")
    options = ", ".join(f"{k}={v}" for k, v in manifest["options"].items())
    lines = ["---", "library_name: " + ("peft" if manifest["method"] == "lora" else "transformers"),
             *([f"base_model: {base}"] if b.get("source") == "hub" else []),
             "tags: [memtl, " + manifest["method"] + "]", "---", "",
             f"# {b.get('name', base)} fine-tuned with {manifest['method']} (memtl)", "",
             f"- base model: {base} ({b.get('source')}), head: {manifest['head']}"
             + (f", pair head: {manifest['pair_head']}" if manifest.get("pair_head") else ""),
             f"- method: {manifest['method']} ({options})",
             f"- weights in this folder: {manifest['weights']} ({manifest['weights_cover']} parameters)"]
    for key, label in (("task", "data"), ("dev", "dev metrics (best)"), ("peak_step_memory", "peak step memory"),
                       ("command", "trained with")):
        if card.get(key) is not None:
            lines.append(f"- {label}: {card[key]}")
    lines += ["", "Load it:", "", "```python", "import memtl", "model = memtl.from_pretrained(\"<this folder>\")",
              "```", "", f"memtl {manifest['memtl_version']}, folder format {manifest['format']}.", ""]
    return "\n".join(lines)
