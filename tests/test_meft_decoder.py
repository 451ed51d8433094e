"""MEFT1/2/3 on decoder-only models: tiny random OPT (pre-LN; post-LN with project_in/out as
OPT-350m) and LLaMA (RMSNorm, rotary, grouped KV heads), no downloads.

The oracle is ``num_rev_layers=0``: the same maths through plain autograd. The tiny models
have 3 layers: MEFT3 divides by λβ = 0.01 per reversible layer going down, so in float64
its gradient error grows ~100x per layer (measured on the post-LN OPT: 5e-12, 6e-10, 6e-8
at 2, 3, 4 reversible layers); 3 keeps every variant well inside 1e-8.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    OPTForCausalLM,
    OPTForSequenceClassification,
    OPTModel,
)

from conftest import max_rel_err, trainable_grads

from memtl.errors import ConfigError
from memtl.geometries import build_config
from memtl.methods import apply_method, count_parameters
from memtl.methods.meft import stack_layers
from memtl.methods.meft.adapters import Adapter
from memtl.methods.meft.decoder import MeftDecoderStack

VARIANTS = ["meft1", "meft2", "meft3"]
ARCHS = ["opt", "opt350", "llama"]  # opt350: post-LN, word_embed_proj_dim 16 != hidden 32
HIDDEN, BOTTLENECK, LAYERS, LABELS = 32, 8, 3, 3
PAD = {"opt": 1, "opt350": 1, "llama": 0}
CLASSES = {
    "opt": (OPTModel, OPTForSequenceClassification, OPTForCausalLM),
    "llama": (LlamaModel, LlamaForSequenceClassification, LlamaForCausalLM),
}


# --- helpers -----------------------------------------------------------------------------


def tiny_decoder(arch="opt", head="seq", dropout=0.0, dtype=torch.float64, seed=0, layers=LAYERS):
    """A random decoder; ``head``: seq (sequence classification), lm (causal LM) or bare."""
    common = dict(vocab_size=100, hidden_size=HIDDEN, max_position_embeddings=64, pad_token_id=PAD[arch],
                  num_labels=LABELS)
    if arch == "llama":  # untied embeddings (the tiny-llama geometry ties them, as SmolLM2)
        config = build_config("tiny-llama", layers, intermediate_size=2 * HIDDEN, attention_dropout=dropout,
                              tie_word_embeddings=False, **common)
    else:
        config = build_config("tiny-opt", layers, ffn_dim=2 * HIDDEN, dropout=dropout, attention_dropout=dropout,
                              do_layer_norm_before=arch == "opt",
                              word_embed_proj_dim=16 if arch == "opt350" else HIDDEN, **common)
    bare, seq, lm = CLASSES["llama" if arch == "llama" else "opt"]
    torch.manual_seed(seed)
    return {"bare": bare, "seq": seq, "lm": lm}[head](config).to(dtype)


def meft_decoder(arch="opt", variant="meft1", head="seq", dropout=0.0, dtype=torch.float64, layers=LAYERS, **opts):
    return apply_method(tiny_decoder(arch, head, dropout, dtype, layers=layers), variant, **opts)


def make_batch(arch="opt", head="seq", n=4, length=9, seed=1):
    """Right-padded batch: rows of different lengths, pad ids where the mask is 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(1, n):
        mask[i, length - 2 * i:] = 0
    ids[mask == 0] = PAD[arch]
    labels = torch.arange(n) % LABELS if head == "seq" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def stack(model) -> MeftDecoderStack:
    return next(m for m in model.modules() if isinstance(m, MeftDecoderStack))


def set_num_rev(model, k):
    stack(model).num_rev_layers = k
    return model


# --- exact gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("head", ["seq", "lm"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_reversible_grads_equal_plain_autograd(variant, arch, head):
    model = meft_decoder(arch, variant, head).train()
    batch = make_batch(arch, head)
    reference = trainable_grads(set_num_rev(model, 0), batch)
    assert all(g.abs().max() > 0 for g in reference.values())  # every adapter/head param gets signal
    for k in (LAYERS, 2, 1):  # all layers reversible; partial
        grads = trainable_grads(set_num_rev(model, k), batch)
        assert max_rel_err(grads, reference) <= 1e-8, (variant, arch, head, k)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_masks_replayed_in_recompute(variant, arch):
    # OPT: hidden + attention dropout from its config, adapters inherit config.dropout;
    # LLaMA has only attention dropout, adapters get theirs explicitly
    opts = {"adapter_dropout": 0.1} if arch == "llama" else {}
    model = meft_decoder(arch, variant, "lm", dropout=0.1, **opts).train()
    assert all(a.dropout.p == 0.1 for a in model.modules() if isinstance(a, Adapter))
    plain = set_num_rev(copy.deepcopy(model), 0)  # same weights, plain autograd
    batch = make_batch(arch, "lm")
    torch.manual_seed(123)
    rev_grads = trainable_grads(model, batch)
    torch.manual_seed(123)
    ref_grads = trainable_grads(plain, batch)
    assert max_rel_err(rev_grads, ref_grads) <= 1e-8
    # dropout really is active: another seed draws other masks and other grads
    torch.manual_seed(7)
    assert max_rel_err(trainable_grads(model, batch), ref_grads) > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_depth_independent_saved_memory(arch):
    """The reversible stack saves the same bytes for backward at 2 and 6 layers."""

    def saved_bytes(layers, reversible):
        model = set_num_rev(meft_decoder(arch, "meft2", "lm", dtype=torch.float32, layers=layers),
                            layers if reversible else 0).train()
        total = 0

        def pack(t):
            nonlocal total
            if not isinstance(t, torch.nn.Parameter):
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**make_batch(arch, "lm", n=8, length=16)).loss
        loss.backward()
        return total

    assert saved_bytes(6, True) == saved_bytes(2, True)
    assert saved_bytes(6, False) > 2 * saved_bytes(2, False)


# --- what trains, keys, forward paths ------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_only_adapters_and_score_train_and_keys_are_kept(variant, arch):
    for head in ("seq", "lm"):
        base = tiny_decoder(arch, head)
        pretrained = base.state_dict()
        total_before = count_parameters(base)["total"]
        model = apply_method(base, variant)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        head_names = {"score.weight"} if head == "seq" else set()  # LM head stays frozen (tied)
        assert {n for n in names if "adapter" not in n} == head_names, names
        adapter = 2 * HIDDEN * BOTTLENECK + BOTTLENECK + HIDDEN
        adapters = 2 * LAYERS * adapter  # FFN + (F/G or attention)
        # MEFT1 on pre-norm decoders returns its chain stream, which the last G adapter does not reach: frozen
        frozen = adapter if variant == "meft1" and arch != "opt350" else 0
        score = HIDDEN * LABELS if arch != "opt350" else 16 * LABELS  # OPT-350m scores after project_out
        assert count_parameters(model) == {"trainable": adapters - frozen + (score if head == "seq" else 0),
                                           "total": total_before + adapters}
        # a pre-trained checkpoint loads unchanged: only the adapters are new
        missing, unexpected = model.load_state_dict(pretrained, strict=False)
        assert unexpected == [] and missing and all("adapter" in k for k in missing)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_equals_train_without_dropout(variant, arch):
    model = meft_decoder(arch, variant, "lm").train()
    batch = make_batch(arch, "lm")
    train_logits = model(**batch).logits  # grad enabled: the reversible Function runs
    with torch.no_grad():
        eval_logits = model.eval()(**batch).logits
        plain = set_num_rev(copy.deepcopy(model), 0).train()(**batch).logits
    torch.testing.assert_close(train_logits.detach(), eval_logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain, eval_logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_plm_chain_is_the_unmodified_model_as_the_scales_vanish(variant, arch):
    """Forward wiring (masks, positions, rotary, norms, project_in/out) checked exactly: with
    zero adapters and λ/β -> 0, output=chain (the stream carrying the PLM chain) is the
    unmodified model; the paper's average is not (the other stream lags one block behind)."""
    small = {"meft1": {"lam": 1e-9}, "meft2": {"beta": 1e-9}, "meft3": {"lam": 1e-9, "beta": 1e-9}}[variant]
    small["inverse"] = "float"  # 1e-9 is no p/q with q <= 2^16; the forward is the same for both inverses
    ref = tiny_decoder(arch, "bare").eval()
    batch = make_batch(arch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        h_ref = ref(**inputs).last_hidden_state
    errors = {}
    for output in ("chain", "mean"):
        model = apply_method(copy.deepcopy(ref), variant, adapter_init="zero", output=output, **small).eval()
        with torch.no_grad():
            errors[output] = ((model(**inputs).last_hidden_state - h_ref).abs().max() / h_ref.abs().max()).item()
    # LLaMA's RMSNorm computes in float32 even in a float64 model: ~1e-7 from rounding
    assert errors["chain"] <= 1e-6 and errors["mean"] > 1e-3, errors


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_chain_output_gradients_equal_plain_autograd(variant, arch):
    model = meft_decoder(arch, variant, output="chain").train()
    batch = make_batch(arch)
    # MEFT1's last G adapter writes only to the stream that output=chain drops: it is frozen
    last_g = stack_layers(stack(model))[-1].rev_adapter
    assert (last_g is not None and not any(p.requires_grad for p in last_g.parameters())) == (variant == "meft1")
    reference = trainable_grads(set_num_rev(model, 0), batch)
    assert all(g.abs().max() > 0 for g in reference.values())  # every trainable parameter learns
    assert max_rel_err(trainable_grads(set_num_rev(model, LAYERS), batch), reference) <= 1e-8


@pytest.mark.parametrize("arch", ARCHS)
def test_one_stream_ablation_is_the_unmodified_model_plus_adapters(arch):
    """streams=one with zero-started adapters is the unmodified model, logits equal bit for bit;
    it trains the same adapters (plain autograd: nothing is reversible)."""
    ref = tiny_decoder(arch, "seq").eval()
    batch = make_batch(arch)
    model = apply_method(copy.deepcopy(ref), "meft3", streams="one", adapter_init="zero").eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
    assert stack(model).num_rev_layers == 0 and stack(model).streams == "one"
    grads = trainable_grads(model.train(), batch)
    assert all(g.abs().max() > 0 for n, g in grads.items() if "up.weight" in n or n.startswith("score"))


@pytest.mark.parametrize("arch", ARCHS)
def test_starting_point_close_to_the_unmodified_model(arch):
    """At init (adapters ~ 0) the last hidden states stay close to the pre-trained model's:
    each layer's PLM output lands in the stream the next PLM block reads (docs/DESIGN.md §1.3).
    Weights ~ N(0, 0.15²) instead of HF's 0.02 so that the layers really move the hidden
    states (without them the cosine drops to ~0.1-0.4), else the check would be trivial."""
    batch = make_batch(arch, "seq")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    valid = batch["attention_mask"].bool()

    def cos(model):
        with torch.no_grad():
            h = model(**inputs).last_hidden_state
        return F.cosine_similarity(h, h_ref, dim=-1)[valid].mean().item()

    ref = tiny_decoder(arch, "bare").eval()
    torch.manual_seed(0)
    for p in ref.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.15)
    with torch.no_grad():
        h_ref = ref(**inputs).last_hidden_state
    no_layers = copy.deepcopy(ref)
    (no_layers if arch == "llama" else no_layers.decoder).layers = torch.nn.ModuleList()
    assert cos(no_layers) < 0.5
    for variant in VARIANTS:
        similarity = cos(apply_method(copy.deepcopy(ref), variant).eval())
        print(f"{arch} {variant}: cos(MEFT last hidden state, unmodified) = {similarity:.4f}")
        assert similarity > 0.9, (arch, variant, similarity)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast(arch):
    for variant in VARIANTS:
        model = meft_decoder(arch, variant, "seq", dropout=0.1, dtype=torch.float32).train()
        batch = make_batch(arch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # float32 model: the model's dtype outside the (fixed-point) stack, near-exact gradients
    model = meft_decoder(arch, "meft3", "lm", dtype=torch.float32).train()
    batch = make_batch(arch, "lm")
    assert model(**batch).logits.dtype == torch.float32
    rev = trainable_grads(model, batch)
    assert max_rel_err(rev, trainable_grads(set_num_rev(copy.deepcopy(model), 0), batch)) <= 1e-4


def test_bare_models_and_sequence_classification_pooling():
    for arch in ARCHS:
        bare = meft_decoder(arch, "meft3", "bare", dtype=torch.float32)
        out = bare(input_ids=torch.randint(3, 100, (2, 5)))
        width = 16 if arch == "opt350" else HIDDEN  # OPT-350m's project_out
        assert out.last_hidden_state.shape == (2, 5, width)
    # logits pooled at the last non-pad token: the pads after it change nothing
    model = meft_decoder("llama", "meft2", "seq").eval()
    batch = make_batch("llama", "seq")
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cut = model(input_ids=batch["input_ids"][3:, :3], attention_mask=batch["attention_mask"][3:, :3]).logits
    torch.testing.assert_close(full[3:], cut, rtol=0, atol=1e-12)


def test_unsupported_calls_and_configs_raise():
    model = meft_decoder("opt", "meft1", "lm")
    ids = torch.randint(3, 100, (1, 4))
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=ids, use_cache=True)
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(input_ids=ids, output_hidden_states=True)
    with pytest.raises(ConfigError, match="already has MEFT"):
        apply_method(model, "meft2")
    with pytest.raises(ConfigError, match="method.num_rev_layers"):
        meft_decoder("llama", "meft1", num_rev_layers=LAYERS + 1)
    dropping = tiny_decoder("opt", "lm")
    dropping.config.layerdrop = 0.1
    with pytest.raises(ConfigError, match="layerdrop") as err:
        apply_method(dropping, "meft3")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pre_norm_decoders_default_to_their_own_factors(variant):
    """λ/β 0.01 (MEFT3: 0.001) in place of the paper's 0.1 on pre-norm decoders (OPT pre-LN, LLaMA); the
    post-LN OPT-350m form keeps the paper's, like BERT; an explicit value always wins."""
    paper = {"meft1": (0.1, 1.0), "meft2": (1.0, 0.1), "meft3": (0.1, 0.1)}[variant]
    decoder = {"meft1": (0.01, 1.0), "meft2": (1.0, 0.01), "meft3": (0.001, 0.001)}[variant]
    for arch, expected in (("opt", decoder), ("llama", decoder), ("opt350", paper)):
        layer = stack(meft_decoder(arch, variant)).layers[0]
        assert (layer.lam, layer.beta) == expected, arch
    layer = stack(meft_decoder("llama", variant, lam=0.5, beta=0.25)).layers[0]
    assert (layer.lam, layer.beta) == (0.5, 0.25)
    # the output: every variant returns its chain stream on pre-norm decoders
    chain = {"meft1": 1, "meft2": 0, "meft3": 1}[variant]
    for arch, expected in (("opt", chain), ("llama", chain), ("opt350", None)):
        assert stack(meft_decoder(arch, variant)).output_stream == expected, arch
    assert stack(meft_decoder("llama", variant, output="mean")).output_stream is None
    assert stack(meft_decoder("opt350", variant, output="chain")).output_stream == (0 if variant == "meft2" else 1)
