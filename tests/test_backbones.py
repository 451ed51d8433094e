"""The BART / OPT / LLaMA backbones: configs, the heads each builds, sequence classification as
Hugging Face does it (BART: the decoder's last EOS state; decoders: the last non-pad token),
and GLUE end to end with full fine-tuning and LoRA."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, compose, run_cli
from omegaconf import OmegaConf

from memtl.backbones import load_model, load_tokenizer, max_positions, model_type, qa_head
from memtl.errors import ConfigError
from memtl.geometries import GEOMETRIES, geometry
from memtl.run import run

TINY = ["tiny_bart", "tiny_opt", "tiny_llama"]
SMOKE = ["trainer.limit_train_batches=3", "trainer.max_epochs=1", "data.max_eval_samples=16", "logger=none",
         "data.batch_size=8", "callbacks.memory.measure_batches=[1]", "callbacks.memory.timing_warmup=1",
         "trainer.enable_progress_bar=false"]


def entry(name):
    return OmegaConf.load(REPO / "conf" / "backbone" / f"{name}.yaml")


def test_backbone_entries_name_their_architecture():
    expect = {"bart_base": ("hub", "bart"), "bart_large": ("hub", "bart"), "opt_125m": ("hub", "opt"),
              "opt_350m": ("hub", "opt"), "opt_1_3b": ("hub", "opt"), "smollm2_135m": ("package", "llama"),
              "tiny_bart": ("random", "bart"), "tiny_opt": ("random", "opt"), "tiny_llama": ("random", "llama")}
    for name, (source, arch) in expect.items():
        e = entry(name)
        assert e.name == name and e.source == source and model_type(e) == arch
    assert entry("opt_1_3b").path == "facebook/opt-1.3b" and entry("bart_large").path == "facebook/bart-large"
    assert [qa_head(a) for a in ("bert", "roberta", "bart", "opt", "llama")] == \
           ["multiple_choice", "multiple_choice", "seq2seq_lm", "causal_lm", "causal_lm"]


def test_random_entries_take_their_shape_from_the_geometries(monkeypatch):
    """A random entry's shape is its ``memtl.geometries`` entry; the borrowed tokenizer's ids go
    on top of it, and the entry's ``config:`` on top of both."""
    tok = load_tokenizer(entry("tiny_bert"))
    for name in ["tiny_bert", "tiny_roberta", *TINY]:
        e = entry(name)
        arch, shape = geometry(e.geometry)
        assert arch == e.model_type == model_type(OmegaConf.merge(e, {"model_type": None}))
        config = load_model(e, 2, tok).config
        assert {k: getattr(config, k) for k in shape} == {**shape, **{k: v for k, v in (e.get("config") or {}).items()
                                                                     if k in shape}}
        assert config.vocab_size == len(tok) and config.pad_token_id == tok.pad_token_id
    monkeypatch.setitem(GEOMETRIES, "ids", ("bert", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                         intermediate_size=64, vocab_size=50, pad_token_id=7)))
    e = {"name": "x", "source": "random", "geometry": "ids"}
    config = load_model(e, 2, tok).config
    assert (config.vocab_size, config.pad_token_id, config.num_hidden_layers) == (len(tok), tok.pad_token_id, 1)
    config = load_model({**e, "config": {"pad_token_id": 5, "num_hidden_layers": 3}}, 2, tok).config
    assert (config.vocab_size, config.pad_token_id, config.num_hidden_layers) == (len(tok), 5, 3)
    with pytest.raises(ConfigError, match="backbone.geometry=nope: unknown; choose one of tiny-bert, "):
        load_model({**e, "geometry": "nope"}, 2, tok)
    with pytest.raises(ConfigError, match="backbone.geometry=ids has model type bert, but backbone.model_type=opt"):
        load_model({**e, "model_type": "opt"}, 2, tok)


@pytest.mark.parametrize("name", TINY)
def test_sequence_classification_reads_the_right_token(name):
    """A sentence's logits do not change when it is batched with a longer one (padding is
    skipped: pad_token_id reached the config), and BART's equal the classification head
    applied to the decoder state at the last EOS ([SEP] with the borrowed tokenizer)."""
    tok = load_tokenizer(entry(name))
    torch.manual_seed(0)
    model = load_model(entry(name), 3, tok).eval()
    assert model.config.pad_token_id == tok.pad_token_id and model.config.num_labels == 3
    pair = (["a short one", "a much longer sentence with many more words in it"], ["yes", "no it is not"])
    batch = tok(*pair, padding=True, return_tensors="pt")
    alone = tok(pair[0][0], pair[1][0], return_tensors="pt")
    with torch.no_grad():
        both, single = model(**batch).logits, model(**alone).logits
    torch.testing.assert_close(both[0], single[0], rtol=1e-5, atol=1e-5)
    if name == "tiny_bart":
        with torch.no_grad():
            hidden = model.model(**alone).last_hidden_state[0]
            last_eos = (alone["input_ids"][0] == tok.sep_token_id).nonzero()[-1].item()
            by_hand = model.classification_head(hidden[last_eos][None])
        torch.testing.assert_close(single, by_hand)


@pytest.mark.parametrize("name", TINY)
def test_every_head_builds(name):
    tok = load_tokenizer(entry(name))
    arch = model_type(entry(name))
    model = load_model(entry(name), 2, tok, head=qa_head(arch))
    assert type(model).__name__.endswith("ForCausalLM" if arch != "bart" else "ForConditionalGeneration")
    assert max_positions(model) == 512
    with pytest.raises(ConfigError, match="has no multiple_choice head"):
        load_model(entry(name), 2, tok, head="multiple_choice")


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("name", TINY)
def test_glue_end_to_end(name, method, glue_root, tmp_path):
    task = "rte" if method == "full" else "sst2"  # pairs and single sentences
    cfg = compose([f"backbone={name}", f"method={method}", f"task=glue/{task}", f"data.root={glue_root}", *SMOKE],
                  tmp_path)
    res = run(cfg)
    assert res["status"] == "completed" and res["trainer"]["global_step"] == 3
    assert 0 <= res["metrics"]["accuracy"] <= 1
    p = res["params"]
    if method == "full":
        assert p["trainable"] == p["total"]
    else:  # LoRA on q_proj/v_proj + the classification head
        assert 0 < p["trainable"] < p["total"] / 10


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"])
def test_bart_on_every_glue_format(task, glue_root, tmp_path):
    """BART classifies (and regresses, STS-B) from its last EOS: single sentences and pairs
    carry the same number of EOS tokens within a task, as BartForSequenceClassification requires."""
    from memtl.data import get_task

    cfg = compose(["backbone=tiny_bart", "method=full", f"task=glue/{task}", f"data.root={glue_root}", *SMOKE],
                  tmp_path)
    res = run(cfg)
    assert res["status"] == "completed" and set(res["metrics"]) == set(get_task(task).metric_keys)


def test_glue_through_the_cli_on_stsb(glue_root, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["backbone=tiny_opt", "method=lora", "task=glue/stsb", f"data.root={glue_root}", *SMOKE,
                    f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and set(res["metrics"]) == {"pearson", "spearman"}
