"""Generation with MEFT and SHERL decoders: HF's KV cache works without gradients, and
greedy output with the cache equals greedy output without it."""
from __future__ import annotations

import pytest
import torch
from conftest import REPO, run_cli
from omegaconf import OmegaConf

from memtl.backbones import load_model, load_tokenizer
from memtl.errors import ConfigError
from memtl.methods import apply_method

METHODS = ["meft1", "meft2", "meft3", "sherl"]


def trained_like(backbone: str, method: str):
    """A tiny decoder with the method applied and its trainable weights moved away from
    init (so the method's own modules shape the output), and a left-padded prompt batch."""
    entry = OmegaConf.load(REPO / "conf" / "backbone" / f"{backbone}.yaml")
    tok = load_tokenizer(entry)
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = apply_method(load_model(entry, tokenizer=tok, head="causal_lm"), method).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    batch = dict(tok(["the cat sat on the", "a b"], return_tensors="pt", padding=True))
    batch.pop("token_type_ids", None)
    return model, batch


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backbone", ["tiny_opt", "tiny_llama"])
def test_greedy_with_the_cache_equals_greedy_without(backbone, method):
    model, batch = trained_like(backbone, method)
    fed = []  # tokens fed per forward: the cache feeds one new token per step after the prompt
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: fed.append(args[0].shape[1]))
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**batch, use_cache=True, **kw)
    fed_cached, fed[:] = list(fed), []
    plain = model.generate(**batch, use_cache=False, **kw)
    prompt = batch["input_ids"].shape[1]
    assert fed_cached == [prompt] + [1] * 9 and fed == list(range(prompt, prompt + 10))
    assert torch.equal(cached.sequences, plain.sequences)
    assert not torch.allclose(cached.scores[1], cached.scores[-1])  # each step's scores depend on what came before
    for a, b in zip(cached.scores, plain.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_a_cache_with_gradients_on_is_refused(method):
    model, batch = trained_like("tiny_llama", method)
    with pytest.raises((ValueError, ConfigError), match="inference only.*torch.no_grad"):
        model(**batch, use_cache=True)
    model(**batch)  # use_cache unset: no cache, trains as before


@pytest.mark.parametrize("method", ["meft2", "sherl"])
def test_ask_answers_from_a_run_folder_in_a_fresh_process(tmp_path, method):
    """notebooks/ask.py: a QA run's <run>/model, loaded in a new process, answers a dev question
    by greedy generate() with the same tokens as without the cache; bad input is one line, exit 2."""
    proc = run_cli([f"method={method}", "backbone=tiny_llama", "task=qa/arc_easy", "data.max_train_samples=16",
                    "data.test=false", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
                    "data.max_eval_samples=8", "logger=none", "trainer.enable_progress_bar=false",
                    "callbacks.memory.measure_batches=[1]", "callbacks.memory.timing_warmup=1",
                    f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ask = run_cli([str(tmp_path / "model"), "--question", "3", "--tokens", "6"], script="notebooks/ask.py")
    assert ask.returncode == 0, ask.stderr[-3000:]
    assert f"{method} answers (greedy, KV cache)" in ask.stdout and "same tokens without the cache: True" in ask.stdout
    assert "Question: Planets in the solar system" in ask.stdout  # ARC-Easy dev row 3, as trained
    for args, needle in [(["--question", "9999"], "choose 0..569"), (["--compare-base"], "random backbone"),
                         ([], "no such folder")]:
        folder = tmp_path / "model" if args else tmp_path / "missing"
        bad = run_cli([str(folder), *args], script="notebooks/ask.py")
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and needle in bad.stderr, bad.stderr
