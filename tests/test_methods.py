"""apply_method: trainable sets, parameter counts, option validation, checkpointing equivalence."""
import copy

import pytest
import torch
from conftest import tiny_hf_model

import memtl
from memtl.errors import ConfigError
from memtl.methods import apply_method, available_methods, count_parameters, method_options

H, L, FF = 32, 2, 64


def tiny(kind="bert", num_labels=2, dropout=0.0):
    return tiny_hf_model(kind, layers=L, hidden=H, num_labels=num_labels, dropout=dropout, pad_token_id=0)


def batch(n=4, t=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 8:] = 0  # a padded row
    ids[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def test_public_entry_point_and_registry():
    assert memtl.apply_method is apply_method
    assert {"full", "lora"} <= set(available_methods())


def test_full_trains_everything():
    model = apply_method(tiny(), "full")
    counts = count_parameters(model)
    assert counts["trainable"] == counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_lora_trains_adapters_and_head_only(kind):
    model = apply_method(tiny(kind), "lora", r=4, alpha=8, dropout=0.0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names, "nothing trains"
    for n in names:  # LoRA matrices, the classifier head and BERT's pooler (the head's input)
        assert "lora_" in n or "classifier" in n or "pooler" in n, n
    counts = count_parameters(model)
    lora = L * 2 * (4 * H + H * 4)  # query + value per layer, A: r x H, B: H x r
    head = (H * 2 + 2) + ((H * H + H) if kind == "bert" else (H * H + H))  # bert pooler / roberta dense
    assert counts["trainable"] == lora + head
    assert counts["total"] > counts["trainable"]


def test_lora_custom_targets_change_the_count():
    qv = count_parameters(apply_method(tiny(), "lora", r=4))["trainable"]
    qkv = count_parameters(apply_method(tiny(), "lora", r=4, target_modules=["query", "key", "value"]))["trainable"]
    assert qkv - qv == L * (4 * H + H * 4)


@pytest.mark.parametrize("method,opts", [("full", {}), ("lora", {"r": 4, "dropout": 0.0})])
def test_gradient_checkpointing_gives_the_same_gradients(method, opts):
    """Checkpointing changes memory, never the maths (dropout off)."""
    torch.manual_seed(0)
    base = tiny()
    torch.manual_seed(1)  # LoRA's A matrices are drawn at random: the same draw for both
    plain = apply_method(copy.deepcopy(base), method, **opts)
    torch.manual_seed(1)
    ckpt = apply_method(copy.deepcopy(base), method, gradient_checkpointing=True, **opts)
    hf_model = ckpt.base_model.model if method == "lora" else ckpt
    assert hf_model.is_activation_checkpointing and not getattr(plain, "is_activation_checkpointing", False)
    for m in (plain, ckpt):
        m.train()
        m(**batch()).loss.backward()
    g_plain = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    g_ckpt = {n: p.grad for n, p in ckpt.named_parameters() if p.requires_grad}
    assert g_plain.keys() == g_ckpt.keys()
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name,opts,needle", [
    ("nope", {}, "unknown method 'nope'"),
    ("lora", {"rank": 4}, "no option 'rank'"),
    ("lora", {"r": 0}, "method.r=0"),
    ("lora", {"alpha": -1}, "method.alpha=-1"),
    ("lora", {"dropout": 1.5}, "method.dropout=1.5"),
    ("lora", {"alpha": "abc"}, "method.alpha='abc': the LoRA alpha must be a number > 0"),
    ("lora", {"r": True}, "method.r=True: the LoRA rank must be an integer"),
    ("lora", {"dropout": "x"}, "method.dropout='x'"),
    ("lora", {"gradient_checkpointing": "yes"}, "method.gradient_checkpointing='yes'"),
    ("lora", {"target_modules": ["nonexistent"]}, "no module named 'nonexistent'"),
    ("full", {"gradient_checkpointing": True, "foo": 1}, "no option 'foo'"),
])
def test_bad_options_are_one_clear_error(name, opts, needle):
    with pytest.raises(ConfigError) as e:
        apply_method(tiny(), name, **opts)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_head_only_trains_the_task_head_and_nothing_else(kind):
    """The linear-probe reference: the backbone is frozen, its features get no gradient."""
    model = apply_method(tiny(kind), "head")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("classifier", "bert.pooler")) for n in names), names
    head = (H * 2 + 2) + (H * H + H)  # classifier + BERT's pooler / RoBERTa's dense
    assert count_parameters(model)["trainable"] == head
    model.train()
    model(**batch()).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in names)


def test_head_only_needs_a_task_head():
    from transformers import BertModel

    from memtl.geometries import build_config
    with pytest.raises(ConfigError, match="method=head: BertModel has no separate task head"):
        apply_method(BertModel(build_config("tiny-bert", 1, hidden_size=H, intermediate_size=FF, vocab_size=100)),
                     "head")


def test_list_options_accept_omegaconf_lists():
    """target_modules from a composed config (a ListConfig) is a list of names; a string is not."""
    from omegaconf import OmegaConf

    assert method_options("lora", target_modules=OmegaConf.create(["query"])).target_modules == ["query"]
    with pytest.raises(ConfigError, match=r"method.target_modules='abc'"):
        method_options("lora", target_modules="abc")
