"""Shared fixtures: offline environment, a GLUE folder for every task format, compose/run helpers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite is the CPU's (bit-identical reruns, the profiler's memory figures): the trainer's
# auto default and every subprocess see no GPU; the GPU has its own check (make gpu-check)
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(Path(__file__).parent))  # test-only helper modules (e.g. failing callbacks)


@pytest.fixture(scope="session", autouse=True)
def _tokenized_cache(tmp_path_factory):
    # one tokenization cache for the whole session, never the user's ~/.cache
    os.environ["MEMTL_CACHE"] = str(tmp_path_factory.mktemp("tokenized"))


def _head(path: Path, n: int, skip: int = 0, header: bool = True) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    head = lines[:1] if header else []
    body = lines[1:] if header else lines
    return head + body[skip:skip + n]


@pytest.fixture(scope="session")
def glue_root(tmp_path_factory) -> Path:
    """A folder laid out like ../shared/data with small files for all eight GLUE tasks.

    Tasks present in ../shared/data are cut from the real files; QQP, MNLI and QNLI's train
    split (not available locally) are written in their real GLUE TSV layout.
    """
    real = SHARED_DATA / "glue_data"
    assert real.is_dir(), f"the real GLUE files are missing: expected {real} (see the README)"
    root = tmp_path_factory.mktemp("data")
    glue = root / "glue_data"
    for task, header in (("CoLA", False), ("SST-2", True), ("MRPC", True), ("STS-B", True), ("RTE", True)):
        (glue / task).mkdir(parents=True)
        for split in ("train", "dev"):
            rows = _head(real / task / f"{split}.tsv", 40, header=header)
            (glue / task / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (glue / "QNLI").mkdir()
    qnli_dev = real / "QNLI" / "dev.tsv"
    (glue / "QNLI" / "train.tsv").write_text("\n".join(_head(qnli_dev, 40)) + "\n")
    (glue / "QNLI" / "dev.tsv").write_text("\n".join(_head(qnli_dev, 40, skip=40)) + "\n")

    rte = [line.split("\t") for line in _head(real / "RTE" / "train.tsv", 80)[1:]]
    (glue / "QQP").mkdir()
    qqp = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
    qqp += [f"{i}\t{2 * i}\t{2 * i + 1}\t{r[1]}?\t{r[2]}?\t{i % 2}" for i, r in enumerate(rte)]
    (glue / "QQP" / "train.tsv").write_text("\n".join(qqp[:41]) + "\n")
    (glue / "QQP" / "dev.tsv").write_text("\n".join(qqp[:1] + qqp[41:]) + "\n")

    (glue / "MNLI").mkdir()
    labels = ("entailment", "neutral", "contradiction")
    parse = "( x )"
    train_head = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                  "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
    dev_head = train_head.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")

    def mnli(rows, dev):
        out = []
        for i, r in enumerate(rows):
            lab = labels[i % 3]
            extra = "\t".join([lab] * (5 if dev else 1))
            out.append(f"{i}\t{i}\t{i}e\tfiction\t{parse}\t{parse}\t{parse}\t{parse}\t{r[1]}\t{r[2]}\t{extra}\t{lab}")
        return out

    (glue / "MNLI" / "train.tsv").write_text("\n".join([train_head] + mnli(rte[:40], False)) + "\n")
    (glue / "MNLI" / "dev_matched.tsv").write_text("\n".join([dev_head] + mnli(rte[40:60], True)) + "\n")
    (glue / "MNLI" / "dev_mismatched.tsv").write_text("\n".join([dev_head] + mnli(rte[60:80], True)) + "\n")
    return root


def compose(overrides: list[str], output_dir: Path):
    """The training config as ``train.py`` would see it (no Hydra run dir needed)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, script: str = "train.py"):
    """``python train.py ...`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ},
    )


def tiny_hf_model(arch: str = "bert", layers: int = 4, hidden: int = 32, num_labels: int = 3, dropout: float = 0.0,
                  dtype=None, seed: int = 0, bare: bool = False, **config_kwargs):
    """A small randomly initialised BERT/RoBERTa: the tiny-bert / tiny-roberta geometry at width
    ``hidden`` (FFN ``2 * hidden``), 100 tokens, 64 positions (no download)."""
    import torch
    from transformers import BertForSequenceClassification, BertModel, RobertaForSequenceClassification, RobertaModel

    from memtl.geometries import build_config

    model_cls = {
        "bert": BertModel if bare else BertForSequenceClassification,
        "roberta": RobertaModel if bare else RobertaForSequenceClassification,
    }[arch]
    config = build_config(f"tiny-{arch}", layers, vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden,
                          max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=dropout,
                          attention_probs_dropout_prob=dropout, **config_kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    return model.to(dtype) if dtype is not None else model


# --- shared by the MEFT/SHERL test files -------------------------------------------------


def assert_pretrained_kept(pretrained: dict, model) -> set[str]:
    """Every pre-trained tensor of ``pretrained`` (a state dict taken before a method was
    applied) is in ``model``'s state dict, equal, under its key or, where peft's LoRA wraps
    the module, under ``<module>.base_layer.<name>``; returns the keys it is under now."""
    import torch

    state, now = model.state_dict(), set()
    for k, v in pretrained.items():
        module, _, name = k.rpartition(".")
        key = k if k in state else f"{module}.base_layer.{name}"
        assert key in state and torch.equal(state[key], v), k
        now.add(key)
    return now


def trainable_grads(model, batch, absent_as_zero: bool = False) -> dict:
    """One backward of the model's own loss; a copy of every trainable parameter's grad. A
    parameter outside the graph fails, or with ``absent_as_zero`` counts as a zero grad."""
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not absent_as_zero:
        missing = [n for n, p in params if p.grad is None]
        assert not missing, missing
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for n, p in params}


def max_rel_err(a: dict, b: dict) -> float:
    """Worst relative error (Frobenius) of ``a`` against the reference ``b``, per tensor."""
    assert a.keys() == b.keys()
    errs = []
    for k in a:
        scale = b[k].norm()
        errs.append(((a[k] - b[k]).norm() / scale).item() if scale > 0 else a[k].abs().max().item())
    return max(errs)


def saved_while_inside(modules, run) -> list[tuple]:
    """Shapes of the tensors autograd saved for backward while any of ``modules`` ran,
    during ``run()`` (which does the forward and backward and returns nothing)."""
    inside, packed_inside = [], []

    def enter(mod, args):
        inside.append(mod)

    def leave(mod, args, out):
        inside.pop()

    def pack(t):
        if inside:
            packed_inside.append(tuple(t.shape))
        return t

    handles = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in handles:
            h.remove()
    assert not inside  # every module entered also left
    return packed_inside


class LogRecorder(torch.nn.Module):
    """Stands in for a LightningModule in callback tests: holds the model, records ``log`` calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value
