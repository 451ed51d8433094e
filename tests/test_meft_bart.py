"""MEFT on BART (encoder and decoder reversible) and the engine's differentiable context.

Tiny random BART models (no downloads), float64. The oracle is ``num_rev_layers=0`` on both
stacks: the same maths through plain autograd. The encoder adapters get their gradient
only through the decoder's cross-attention, i.e. through the encoder-output gradient that
the decoder's reversible backward must return.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    BartForCausalLM,
    BartForConditionalGeneration,
    BartForSequenceClassification,
    BartModel,
)

from conftest import max_rel_err, trainable_grads

from memtl.errors import ConfigError
from memtl.geometries import build_config
from memtl.methods import apply_method, count_parameters
from memtl.methods.meft.adapters import Adapter
from memtl.methods.meft.bart import BartMeftLayer, MeftBartDecoder, MeftBartEncoder
from memtl.methods.meft.engine import reversible_stack

VARIANTS = ["meft1", "meft2", "meft3"]
HIDDEN, BOTTLENECK, LAYERS, LABELS = 16, 8, 2, 3
PAD, EOS = 1, 2


# --- helpers -----------------------------------------------------------------------------


def bart_config(dropout=0.0, attn="sdpa", layers=LAYERS):
    config = build_config("tiny-bart", layers, vocab_size=100, d_model=HIDDEN, encoder_ffn_dim=2 * HIDDEN,
                          decoder_ffn_dim=2 * HIDDEN, max_position_embeddings=64, num_labels=LABELS,
                          dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
                          pad_token_id=PAD, bos_token_id=0, eos_token_id=EOS, decoder_start_token_id=EOS)
    config._attn_implementation = attn
    return config


def tiny_bart(variant="meft2", dropout=0.0, cls=BartForSequenceClassification, attn="sdpa", seed=0, layers=LAYERS,
              dtype=torch.float64, **opts):
    torch.manual_seed(seed)
    model = cls(bart_config(dropout, attn, layers)).to(dtype)
    return apply_method(model, variant, **opts)


def make_batch(n=4, length=9, seed=1):
    """Padded batch; every row ends with one EOS (HF's classification head reads it), then pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        end = length - 2 * i  # row i has `end` real tokens
        ids[i, end - 1] = EOS
        ids[i, end:] = PAD
        mask[i, end:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % LABELS}


def stacks(model) -> tuple[MeftBartEncoder, MeftBartDecoder]:
    base = model if isinstance(model, BartModel) else model.model
    return base.encoder, base.decoder


def set_num_rev(model, enc, dec=None, inverse="exact"):
    encoder, decoder = stacks(model)
    encoder.num_rev_layers, decoder.num_rev_layers = enc, enc if dec is None else dec
    encoder.inverse = decoder.inverse = inverse
    return model


def encoder_adapter_grads(grads: dict) -> dict:
    return {n: g for n, g in grads.items() if ".encoder.layers." in n}


# --- the engine: differentiable context on a toy layer --------------------------------------


class ToyLayer(nn.Module):
    """F reads the stream and the context through a cross term; G reads only the stream,
    so that some autograd.grad calls see the context unused."""

    def __init__(self, d, lam, beta, switch, g_reads_context):
        super().__init__()
        self.lam, self.beta, self.switch = lam, beta, switch
        self.wf, self.wc = nn.Linear(d, d), nn.Linear(d, d)
        self.wg = nn.Linear(d, d)
        self.g_reads_context = g_reads_context

    def f(self, x, mask, c):
        return torch.tanh(self.wf(x) + self.wc(c).mean(1, keepdim=True)) * mask

    def g(self, x, mask, c):
        out = torch.tanh(self.wg(x))
        return out * torch.sigmoid(c.sum(1, keepdim=True)) if self.g_reads_context else out


@pytest.mark.parametrize("switch, lam, beta", [(True, 0.1, 1.0), (False, 0.5, 0.1)])
def test_engine_returns_context_gradient(switch, lam, beta):
    torch.manual_seed(0)
    d = 6
    layers = nn.ModuleList(ToyLayer(d, lam, beta, switch, g_reads_context=i % 2 == 0) for i in range(5)).double()
    x_leaf = torch.randn(3, 4, d, dtype=torch.float64, requires_grad=True)
    c_leaf = torch.randn(3, 7, d, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 4, 1, dtype=torch.float64)
    mask[0, -1] = 0
    weights = torch.randn(3, 4, d, dtype=torch.float64)

    def grads(num_rev, inverse="exact", x_needs_grad=True):
        layers.zero_grad(set_to_none=True)
        x_leaf.grad = c_leaf.grad = None
        x = x_leaf * 2 if x_needs_grad else x_leaf.detach() * 2
        c = torch.sin(c_leaf)  # non-leaf context: its gradient must flow on to c_leaf
        y1, y2 = reversible_stack(x, x, layers, (mask, c), num_rev=num_rev, inverse=inverse)
        ((y1 + 3 * y2) * weights).sum().backward()
        out = {n: p.grad.clone() for n, p in layers.named_parameters()}
        out["context"] = c_leaf.grad.clone()
        if x_needs_grad:
            out["x"] = x_leaf.grad.clone()
        return out

    for x_needs_grad in (True, False):  # False: the bottom layer skips its input grads
        reference = grads(0, x_needs_grad=x_needs_grad)
        assert reference["context"].abs().max() > 0
        for num_rev, inverse in ((None, "exact"), (3, "exact"), (None, "float"), (3, "float")):
            got = grads(num_rev, inverse, x_needs_grad)
            assert max_rel_err(got, reference) <= 1e-9, (num_rev, inverse, x_needs_grad)


def test_engine_context_gradient_without_trainable_parameters():
    """Only the context requires grad: the Function must still run and return its gradient."""
    torch.manual_seed(1)
    layers = nn.ModuleList(ToyLayer(4, 0.1, 1.0, True, True) for _ in range(3)).double().requires_grad_(False)
    c_leaf = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    mask = torch.ones(2, 5, 1, dtype=torch.float64)
    out = {}
    for num_rev in (0, None):
        c_leaf.grad = None
        y1, y2 = reversible_stack(x, x, layers, (mask, c_leaf), num_rev=num_rev)
        assert y1.requires_grad
        (y1 * y2).sum().backward()
        out[num_rev] = c_leaf.grad.clone()
    torch.testing.assert_close(out[None], out[0], rtol=1e-10, atol=0)


# --- BART: the blocks are HF's layers ----------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_blocks_reproduce_hf_layers_with_zero_adapters(attn):
    """With every adapter's output zero, ``whole_layer`` is exactly HF's encoder/decoder layer."""
    torch.manual_seed(0)
    hf = BartModel(bart_config(attn=attn)).double().eval()
    reference = copy.deepcopy(hf)
    model = apply_method(hf, "meft3").eval()
    for m in model.modules():
        if isinstance(m, Adapter):
            nn.init.zeros_(m.up.weight)
    batch = make_batch()
    # capture each layer's HF inputs (masks as the HF stacks build them) and outputs
    seen = {}

    def grab(name):
        def hook(module, args, kwargs, output):
            seen[name] = (args, kwargs, output)
        return hook

    for stack in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(reference, stack).layers):
            layer.register_forward_hook(grab(f"{stack}{i}"), with_kwargs=True)
    with torch.no_grad():
        reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for stack in ("encoder", "decoder"):
            for i, layer in enumerate(getattr(model, stack).layers):
                args, kwargs, expected = seen[f"{stack}{i}"]
                if stack == "encoder":
                    got = layer.whole_layer(args[0], args[1])
                else:
                    got = layer.whole_layer(args[0], args[1], args[2], kwargs["encoder_attention_mask"])
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# --- exact gradients ---------------------------------------------------------------------


def test_one_stream_ablation_is_the_unmodified_model():
    """streams=one with zero-started adapters: encoder and decoder are BART's own, bit for bit."""
    torch.manual_seed(0)
    ref = BartForSequenceClassification(bart_config()).to(torch.float64).eval()
    model = apply_method(copy.deepcopy(ref), "meft3", streams="one", adapter_init="zero").eval()
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
    assert [s.num_rev_layers for s in stacks(model)] == [0, 0]



@pytest.mark.parametrize("variant", VARIANTS)
def test_reversible_grads_equal_plain_autograd(variant):
    model = tiny_bart(variant).train()
    batch = make_batch()
    reference = trainable_grads(set_num_rev(model, 0), batch)
    assert all(g.abs().max() > 0 for g in reference.values())  # every adapter/head param gets signal
    enc_ref = encoder_adapter_grads(reference)
    assert len(enc_ref) == 2 * LAYERS * 4  # two adapters per encoder layer, 4 tensors each
    # (encoder, decoder) reversible layers: both; decoder only (the encoder-output gradient is
    # the engine's); encoder only; partial; both under the float inverse
    for enc, dec, inverse in ((LAYERS, LAYERS, "exact"), (0, LAYERS, "exact"), (LAYERS, 0, "exact"),
                              (1, 1, "exact"), (LAYERS, LAYERS, "float")):
        grads = trainable_grads(set_num_rev(model, enc, dec, inverse), batch)
        assert max_rel_err(grads, reference) <= 1e-8, (variant, enc, dec, inverse)
        assert all(g.abs().max() > 0 for g in encoder_adapter_grads(grads).values())


def test_meft1_chain_output_freezes_each_stacks_last_g_adapter():
    """Under output=chain MEFT1 returns y1 = λx1 + F(x2): the last layer's G adapter writes only
    to the dropped stream, in the encoder and in the decoder. Exactly those two are frozen, and
    every parameter left trainable gets the same gradient as plain autograd's."""
    model = tiny_bart("meft1", output="chain").train()
    mean = tiny_bart("meft1").train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad} - \
        {n for n, p in mean.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.{s}.layers.{LAYERS - 1}.rev_adapter.{w}" for s in ("encoder", "decoder")
                      for w in ("down.weight", "down.bias", "up.weight", "up.bias")}
    assert count_parameters(mean)["trainable"] - count_parameters(model)["trainable"] == 2 * _adapter_size()
    batch = make_batch()
    reference = trainable_grads(set_num_rev(model, 0), batch)
    assert all(g.abs().max() > 0 for g in reference.values())
    for enc, dec in ((LAYERS, LAYERS), (1, 1)):
        assert max_rel_err(trainable_grads(set_num_rev(model, enc, dec), batch), reference) <= 1e-8, (enc, dec)


def _encoder_output_grad(model, batch):
    """The gradient the loss sends into the encoder output (what the decoder's backward returns)."""
    captured = {}

    def keep(module, args, output):
        output.last_hidden_state.retain_grad()
        captured["h"] = output.last_hidden_state

    handle = stacks(model)[0].register_forward_hook(keep)
    try:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
    finally:
        handle.remove()
    return captured["h"].grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_returns_encoder_output_gradient(variant):
    """Fails if the reversible decoder dropped (or miscounted) the encoder-output gradient."""
    model = tiny_bart(variant).train()
    batch = make_batch()
    reference = _encoder_output_grad(set_num_rev(model, 0), batch)
    assert reference.abs().max() > 0
    for inverse in ("exact", "float"):
        got = _encoder_output_grad(set_num_rev(model, 0, LAYERS, inverse), batch)
        assert got is not None, "the reversible decoder returned no gradient for the encoder output"
        torch.testing.assert_close(got, reference, rtol=1e-9, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_masks_replayed_in_recompute(variant):
    model = tiny_bart(variant, dropout=0.1, adapter_dropout=0.1).train()
    plain = set_num_rev(copy.deepcopy(model), 0)  # same weights, plain autograd
    batch = make_batch()
    torch.manual_seed(123)
    rev_grads = trainable_grads(model, batch)
    torch.manual_seed(123)
    ref_grads = trainable_grads(plain, batch)
    assert max_rel_err(rev_grads, ref_grads) <= 1e-8
    # dropout really is active: another seed draws other masks and other grads
    torch.manual_seed(7)
    assert max_rel_err(trainable_grads(model, batch), ref_grads) > 1e-4


def test_depth_independent_saved_memory():
    """Both stacks reversible: the forward saves the same bytes for backward at 2 and 6 layers
    per stack (the decoder's Function keeps its two streams and the encoder output)."""

    def saved_bytes(layers, reversible):
        model = tiny_bart("meft3", layers=layers, dtype=torch.float32, num_rev_layers=None if reversible else 0)
        total = 0

        def pack(t):
            nonlocal total
            if not isinstance(t, torch.nn.Parameter):
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**make_batch(n=8, length=16)).loss
        loss.backward()
        return total

    assert saved_bytes(6, True) == saved_bytes(2, True)
    assert saved_bytes(6, False) > 2 * saved_bytes(2, False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_forward_backward(variant):
    model = tiny_bart(variant, dtype=torch.float32, dropout=0.1).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**make_batch()).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() for g in encoder_adapter_grads(grads).values()) > 0


def test_eager_attention_grads_equal_plain_autograd():
    model = tiny_bart("meft3", attn="eager").train()
    batch = make_batch()
    reference = trainable_grads(set_num_rev(model, 0), batch)
    assert max_rel_err(trainable_grads(set_num_rev(model, LAYERS), batch), reference) <= 1e-8


# --- what trains, options ----------------------------------------------------------------


def _adapter_size(d=HIDDEN, r=BOTTLENECK):
    return 2 * d * r + r + d


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_adapters_and_head_train(variant):
    torch.manual_seed(0)
    base = BartForSequenceClassification(bart_config())
    pretrained_keys = set(base.state_dict())
    total_before = count_parameters(base)["total"]
    model = apply_method(base, variant)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("adapter" in n or n.startswith("classification_head.") for n in names), names
    assert {n for n in names if n.startswith("classification_head.")} == {
        "classification_head.dense.weight", "classification_head.dense.bias",
        "classification_head.out_proj.weight", "classification_head.out_proj.bias"}
    assert all(p.requires_grad for m in model.modules() if isinstance(m, Adapter) for p in m.parameters())
    # encoder layers: FFN adapter + (F/G adapter or attention adapter); decoder MEFT3: + cross-attention adapter
    per_decoder_layer = 3 if variant == "meft3" else 2
    adapters = (2 + per_decoder_layer) * LAYERS * _adapter_size()
    head = (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * LABELS + LABELS)
    assert count_parameters(model) == {"trainable": adapters + head, "total": total_before + adapters}
    # pre-trained weights keep their state-dict keys, and the embeddings stay tied
    assert pretrained_keys <= set(model.state_dict())
    encoder, decoder = stacks(model)
    assert encoder.embed_tokens.weight is decoder.embed_tokens.weight is model.model.shared.weight
    assert all(isinstance(layer, BartMeftLayer) for layer in [*encoder.layers, *decoder.layers])


def test_options_and_bad_input():
    encoder, decoder = stacks(tiny_bart("meft1", num_rev_layers=1, adapter_dropout=None))
    assert (encoder.num_rev_layers, decoder.num_rev_layers) == (1, 1)
    assert decoder.layers[0].ffn_adapter.dropout.p == 0.0  # BART's config.dropout
    assert stacks(tiny_bart("meft1"))[1].num_rev_layers == LAYERS  # null: all
    layer = stacks(tiny_bart("meft2", lam=0.5, beta=2))[1].layers[0]
    assert (layer.lam, layer.beta, layer.switch) == (0.5, 2.0, True)
    layer = stacks(tiny_bart("meft1", adapter_layernorm=True))[0].layers[0]
    assert layer.rev_adapter.layer_norm.eps == layer.final_layer_norm.eps == 1e-5  # BART's LayerNorm eps
    with pytest.raises(ConfigError, match="method.num_rev_layers=3") as err:
        tiny_bart("meft1", num_rev_layers=LAYERS + 1)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="already has MEFT"):
        apply_method(tiny_bart("meft1"), "meft2")
    with pytest.raises(ConfigError, match="BartForCausalLM"):
        apply_method(BartForCausalLM(bart_config()), "meft1")


# --- training mechanics and other heads --------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_inference_matches_train_mode(variant):
    model = tiny_bart(variant).eval()
    batch = make_batch()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.grad_fn is None
    train_logits = model.train()(**batch).logits  # grad enabled: the reversible Functions run
    assert train_logits.grad_fn is not None
    torch.testing.assert_close(train_logits.detach(), logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_twice_and_accumulation(variant):
    model = tiny_bart(variant).train()
    batch = make_batch()
    once = trainable_grads(model, batch)
    model(**batch).loss.backward()  # grads accumulate on top of the previous backward
    twice = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert max_rel_err(twice, {n: 2 * g for n, g in once.items()}) <= 1e-10

    def summed_loss(b):  # two micro-batches with a summed loss == one big batch
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits, b["labels"], reduction="sum")

    model.zero_grad(set_to_none=True)
    summed_loss(batch).backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    for half in (slice(0, 2), slice(2, 4)):
        # each half trimmed to its own longest row: the padding differs from the big batch
        b = {k: v[half] for k, v in batch.items()}
        keep = int(b["attention_mask"].sum(1).max())
        summed_loss({k: (v[:, :keep] if v.dim() == 2 else v) for k, v in b.items()}).backward()
    micro = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert max_rel_err(micro, big) <= 1e-10


def test_conditional_generation_and_bare_model():
    model = tiny_bart("meft3", cls=BartForConditionalGeneration).train()
    batch = make_batch()
    targets = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # denoising-style LM targets
    batch = {**batch, "labels": targets}
    rev = trainable_grads(model, batch)
    assert not model.lm_head.weight.requires_grad and all("adapter" in n for n in rev)
    plain = trainable_grads(set_num_rev(model, 0), batch)
    assert max_rel_err(rev, plain) <= 1e-8
    with pytest.raises(ValueError, match="inference only.*torch.no_grad.*use_cache=False"):
        model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)  # gradients on
    # greedy with the cache equals greedy without it (test_generate.py: the decoders)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = model.generate(batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2], use_cache=True, **kw)
    plain = model.generate(batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2], use_cache=False, **kw)
    assert cached.shape[1] >= 6 and torch.equal(cached, plain)

    bare = tiny_bart("meft1", cls=BartModel)
    h = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert h.shape == (4, 9, HIDDEN)
