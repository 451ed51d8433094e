"""SHERL on BART, OPT (pre-LayerNorm, and the post-LayerNorm 350m form with project_in/out)
and LLaMA: no gradient and no graph in the early route, what trains, starting point, exact
gradients, padding, checkpointing, late LoRA/adapters, bad input.

Tiny random models from transformers' config classes (no downloads).
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from transformers import (
    BartConfig,
    BartForCausalLM,
    BartForConditionalGeneration,
    BartForSequenceClassification,
    BartModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    OPTConfig,
    OPTForCausalLM,
    OPTForSequenceClassification,
    OPTModel,
)

from conftest import assert_pretrained_kept, saved_while_inside

from memtl.errors import ConfigError
from memtl.methods import apply_method
from memtl.methods.sherl import SherlSplit

HIDDEN, LAYERS, LABELS, VOCAB = 32, 4, 3, 100
ARCHS = ["bart", "opt", "opt350", "llama"]
DECODERS = ["opt", "opt350", "llama"]  # causal decoders
PAD = {"bart": 1, "opt": 1, "opt350": 1, "llama": 0}
EOS = 2  # every row ends its real tokens with EOS (BART's classification head reads it)
MODELS = {  # arch -> (bare, causal LM, sequence classification)
    "bart": (BartModel, BartForCausalLM, BartForSequenceClassification),
    "opt": (OPTModel, OPTForCausalLM, OPTForSequenceClassification),
    "opt350": (OPTModel, OPTForCausalLM, OPTForSequenceClassification),
    "llama": (LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification),
}
HEADS = {"bare": 0, "causal": 1, "seq": 2}
# the modules of a decoder stack that compute its embedding output h_0 (those it has)
EMBEDDINGS = ("embed_tokens", "embed_positions", "project_in", "layernorm_embedding")
KEPT = {"preserve_start": True, "start_form": "out_proj"}  # the pre-trained starting point kept
KEPT_SCALE = {"preserve_start": True, "start_form": "scale"}
# the paper's SHERL; these tests pass it unless they ask for the family defaults (decoder LMs
# default to the kept start with late LoRA: test_family_defaults_on_every_architecture)
PAPER = {"preserve_start": False, "late_layers": 1, "late_tuning": "frozen"}


# --- helpers -----------------------------------------------------------------------------


def make_config(arch, layers=LAYERS, dropout=0.0, **extra):
    common = {"vocab_size": VOCAB, "max_position_embeddings": 64, "num_labels": LABELS, "pad_token_id": PAD[arch]}
    if arch == "bart":
        return BartConfig(d_model=HIDDEN, encoder_layers=2, decoder_layers=layers, encoder_ffn_dim=2 * HIDDEN,
                          decoder_ffn_dim=2 * HIDDEN, encoder_attention_heads=4, decoder_attention_heads=4,
                          dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
                          classifier_dropout=dropout, bos_token_id=0, eos_token_id=EOS, decoder_start_token_id=EOS,
                          **common, **extra)
    if arch.startswith("opt"):
        post_ln = {"word_embed_proj_dim": HIDDEN // 2, "do_layer_norm_before": False} if arch == "opt350" else {}
        return OPTConfig(hidden_size=HIDDEN, num_hidden_layers=layers, ffn_dim=2 * HIDDEN, num_attention_heads=4,
                         dropout=dropout, attention_dropout=dropout, **post_ln, **common, **extra)
    return LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=layers, intermediate_size=2 * HIDDEN,
                       num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout, **common, **extra)


def plain_model(arch, head="seq", layers=LAYERS, dropout=0.0, dtype=torch.float32, seed=0, **extra):
    torch.manual_seed(seed)
    model = MODELS[arch][HEADS[head]](make_config(arch, layers, dropout, **extra))
    return model.to(dtype)


def tiny(arch, head="seq", layers=LAYERS, dropout=0.0, dtype=torch.float32, seed=0, family_defaults=False, **opts):
    opts = opts if family_defaults else {**PAPER, **opts}
    return apply_method(plain_model(arch, head, layers, dropout, dtype, seed), "sherl", **opts)


def stack_of(model):
    """The HF module whose forward loops over the split layers."""
    base = model.base_model
    stack = getattr(base, "decoder", base)
    assert isinstance(stack.sherl, SherlSplit)
    return stack


def early_modules(model) -> list[torch.nn.Module]:
    """Everything on the early route: embeddings, BART's encoder, the early layers."""
    stack = stack_of(model)
    encoder = getattr(model.base_model, "encoder", None)
    embeddings = [m for name in EMBEDDINGS if isinstance(m := getattr(stack, name, None), torch.nn.Module)]
    return ([encoder] if encoder is not None else []) + embeddings + list(stack.layers[: stack.sherl.num_early])


def make_batch(arch, head="seq", n=4, length=9, seed=1):
    """Right-padded batch: rows of different lengths, each ending in EOS, pad ids under mask 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = length - (i * 2) % (length - 3)
        mask[i, :k] = 1
        ids[i, k - 1] = EOS
    ids[mask == 0] = PAD[arch]
    batch = {"input_ids": ids, "attention_mask": mask}
    if head == "seq":
        batch["labels"] = torch.randint(0, LABELS, (n,), generator=g)
    elif head == "causal":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def run(model, batch):
    out = model(**batch)
    return out, (out.loss if "labels" in batch else out.last_hidden_state.square().mean())


# --- the early route: no gradient, no graph ----------------------------------------------


@pytest.mark.parametrize("start", [{}, KEPT_SCALE])
@pytest.mark.parametrize("head", ["bare", "causal", "seq"])
@pytest.mark.parametrize("arch", ARCHS)
def test_no_gradient_and_no_graph_in_the_early_route(arch, head, start):
    model = tiny(arch, head, late_layers=1, dropout=0.1, **start)
    early = early_modules(model)
    tied = model.get_output_embeddings()
    tied = tied.weight if tied is not None else None
    for m in early:  # even if someone unfroze them, no gradient may reach them
        for p in m.parameters():
            p.requires_grad_(p is not tied)  # (a tied LM head would get its own gradient)
    model.train()
    packed_inside = saved_while_inside(early, lambda: run(model, make_batch(arch, head))[1].backward())
    assert packed_inside == []  # autograd recorded nothing while the early route ran
    for m in early:
        assert all(p.grad is None for p in m.parameters()), type(m).__name__
    side = stack_of(model).side
    assert all(p.grad is not None for p in side.parameters())
    # gradients flow THROUGH the frozen late layer into the side module (gate closed at init;
    # the deep feature's projection always gets a gradient, shallow ones when their score > 0)
    factor = side.gate if side.start_form is None else side.scale  # skip gate | side scale (0 at init)
    assert factor.grad.abs() > 0
    if side.start_form is None:  # a zero side scale passes no gradient back into the side module at init
        assert side.projections[-1].linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in stack_of(model).layers[-1].parameters())


def _saved_storages(model, batch) -> dict[int, int]:
    """data_ptr -> bytes of the storages autograd saves during forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = run(model, batch)
    loss.backward()
    return seen


@pytest.mark.parametrize("arch, late_tuning, start", [(a, "frozen", {}) for a in ARCHS] + [
    ("bart", "lora", {}), ("llama", "adapter", {}), ("opt", "frozen", KEPT), ("llama", "lora", KEPT_SCALE)])
def test_nothing_from_inside_the_early_route_is_saved(arch, late_tuning, start):
    # recompute_side=False: the hooks then see the side module's saves (a checkpoint keeps its own)
    model = tiny(arch, "seq", late_layers=1, dropout=0.1, late_tuning=late_tuning, recompute_side=False, **start)
    stack = stack_of(model)
    internals, features, handles = [], [], []

    def keep(store):
        def hook(mod, args, out):
            store.extend(t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor))
        return hook

    for m in early_modules(model):
        for sub in m.modules():  # the outputs of every module of the early route, BART's encoder included
            handles.append(sub.register_forward_hook(keep(internals)))
    # the kept features: h_0 (input of layer 0) and the early layers' outputs h_1..h_{N-k}
    handles.append(stack.layers[0].register_forward_pre_hook(lambda mod, args: features.append(args[0]) and None))
    for layer in stack.layers[: stack.sherl.num_early]:
        handles.append(layer.register_forward_hook(keep(features)))
    model.train()
    saved = set(_saved_storages(model, make_batch(arch)))  # internals/features stay referenced: no reused address
    for h in handles:
        h.remove()
    feature_ptrs = {t.untyped_storage().data_ptr() for t in features}
    internal_ptrs = {t.untyped_storage().data_ptr() for t in internals} - feature_ptrs
    assert len(features) == stack.sherl.num_early + 1 and internal_ptrs
    assert not (saved & internal_ptrs)  # e.g. BART's encoder output meets only frozen cross-attention
    assert feature_ptrs <= saved  # h_0..h_{N-k}: the projections' inputs, the early route's whole budget


@pytest.mark.parametrize("start", [{}, KEPT, KEPT_SCALE])
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_bytes_per_early_layer_are_the_kept_features_only(arch, start):
    batch = make_batch(arch, "seq", n=4, length=16)
    tokens = batch["input_ids"].numel()
    d, d_side = HIDDEN, HIDDEN // 2
    saved = {}
    for n in (3, 6):
        model = tiny(arch, "seq", layers=n, late_layers=1, recompute_side=False, **start)
        model.train()
        saved[n] = sum(_saved_storages(model, batch).values())
    per_layer = (saved[6] - saved[3]) / 3
    # h_i (d floats) + the projection's pre-LayerNorm output and z_i (d' each) + a few
    # per-token scalars (LayerNorm mean/rstd, the fusion's norm/redundancy/score)
    assert tokens * d * 4 <= per_layer <= tokens * (d + 2 * d_side + 8) * 4


# --- what trains ---------------------------------------------------------------------------


HEAD_PREFIX = {"bart": "classification_head.", "opt": "score.", "opt350": "score.", "llama": "score."}
LAYER_PREFIX = {"bart": "model.decoder.layers", "opt": "model.decoder.layers", "opt350": "model.decoder.layers",
                "llama": "model.layers"}
LORA = ("self_attn.q_proj", "self_attn.v_proj")
ADAPTED = {"bart": ("self_attn.out_proj", "fc2"), "opt": ("self_attn.out_proj", "fc2"),
           "opt350": ("self_attn.out_proj", "fc2"), "llama": ("self_attn.o_proj", "mlp.down_proj")}


@pytest.mark.parametrize("late_tuning", ["frozen", "lora", "adapter"])
@pytest.mark.parametrize("arch", ARCHS)
def test_what_trains(arch, late_tuning):
    plain = plain_model(arch)
    pretrained = {k: v.clone() for k, v in plain.state_dict().items()}
    model = apply_method(plain, "sherl", late_layers=2, late_tuning=late_tuning)
    keys = assert_pretrained_kept(pretrained, model)  # (peft's LoRA: under <module>.base_layer.<name>)
    assert late_tuning == "lora" or keys == set(pretrained)  # otherwise the very keys: checkpoints still load
    side_prefix = LAYER_PREFIX[arch].rsplit(".", 1)[0] + ".side."
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    extra = {n for n in trainable if not n.startswith((side_prefix, HEAD_PREFIX[arch]))}
    late = [f"{LAYER_PREFIX[arch]}.{i}" for i in (2, 3)]
    if late_tuning == "frozen":
        assert extra == set()
    elif late_tuning == "lora":
        assert extra == {f"{layer}.{m}.lora_{ab}.default.weight" for layer in late for m in LORA for ab in "AB"}
    else:
        assert {n.split(".adapter.")[0] for n in extra} == {f"{layer}.{m}" for layer in late for m in ADAPTED[arch]}
    head = {n for n in keys if n.startswith(HEAD_PREFIX[arch])}
    assert head and not (trainable & (keys - head)) and head <= trainable  # every pre-trained weight frozen
    side = stack_of(model).side
    assert len(side.projections) == LAYERS - 2 + 1 and side.projections[0].linear.out_features == HIDDEN // 2
    assert side.dropout.p == 0.0  # the model's hidden dropout (0 here; LLaMA has none)
    # the late LoRA/adapters get a gradient (LoRA: B, as A's is 0 while B = 0)
    model.train()
    _, loss = run(model, make_batch(arch))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    for n in extra:
        if n.endswith(("lora_B.default.weight", "adapter.up.weight")):
            assert grads[n].abs().sum() > 0, n


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_lm_trains_the_side_module_only(arch):
    model = tiny(arch, "causal")
    trainable = {n.split(".side.")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {LAYER_PREFIX[arch].rsplit(".", 1)[0]}  # LM heads stay frozen (tied to embeddings)
    assert not model.get_output_embeddings().weight.requires_grad


def test_hidden_dropout_default_per_architecture():
    assert stack_of(tiny("opt", dropout=0.1)).side.dropout.p == pytest.approx(0.1)
    assert stack_of(tiny("bart", dropout=0.1)).side.dropout.p == pytest.approx(0.1)
    assert stack_of(tiny("llama", dropout=0.1)).side.dropout.p == 0.0  # LLaMA has no hidden dropout
    chosen = apply_method(plain_model("llama"), "sherl", dropout=0.2, late_tuning="lora")
    assert stack_of(chosen).side.dropout.p == pytest.approx(0.2)
    assert chosen.model.layers[-1].self_attn.q_proj.lora_dropout["default"].p == pytest.approx(0.2)


def test_bart_seq2seq_lm_routes():
    model = apply_method(BartForConditionalGeneration(make_config("bart")), "sherl", late_layers=1)
    assert not any(p.requires_grad for p in model.model.encoder.parameters())
    batch = make_batch("bart", "causal")
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.model.encoder.parameters())
    assert model.model.decoder.side.gate.grad.abs() > 0


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [LAYERS, LAYERS + 2])
def test_late_layers_must_leave_an_early_layer(arch, k):
    what = "decoder layers" if arch == "bart" else "layers"
    pattern = rf"method\.late_layers={k}: .* has {LAYERS} {what}.*choose 1\.\.{LAYERS - 1}"
    with pytest.raises(ConfigError, match=pattern) as e:
        tiny(arch, late_layers=k)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_double_application_and_a_kv_cache_with_gradients_are_refused(arch):
    model = tiny(arch, "causal")
    with pytest.raises(ConfigError, match="already has SHERL applied"):
        apply_method(model, "sherl")
    batch = make_batch(arch, "bare")
    with pytest.raises(ConfigError, match="KV cache is for inference only.*torch.no_grad.*use_cache=False") as e:
        model(**batch, use_cache=True)
    assert "\n" not in str(e.value)
    model.eval()
    with torch.no_grad():  # the config's use_cache=True is overridden: no cache is built
        assert model(**batch).past_key_values is None


@pytest.mark.parametrize("arch, key", [("opt", "layerdrop"), ("bart", "decoder_layerdrop")])
def test_layerdrop_is_refused(arch, key):
    model = plain_model(arch, **{key: 0.1})
    with pytest.raises(ConfigError, match="layerdrop=0.1.*set the config's layerdrop to 0"):
        apply_method(model, "sherl")


# --- starting point, exact gradients ------------------------------------------------------


@pytest.mark.parametrize("late_tuning", ["frozen", "lora", "adapter"])
@pytest.mark.parametrize("head", ["causal", "seq"])
@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_finite_at_init(arch, head, late_tuning):
    model = tiny(arch, head, late_tuning=late_tuning, dropout=0.1)
    model.train()
    out, loss = run(model, make_batch(arch, head))
    assert out.logits.shape == ((4, LABELS) if head == "seq" else (4, 9, VOCAB))
    assert torch.isfinite(out.logits).all() and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch, head, late_tuning, eps, tol, start", [
    ("opt", "causal", "lora", 1e-6, 1e-6, {}), ("opt350", "seq", "adapter", 1e-6, 1e-6, {}),
    ("bart", "seq", "frozen", 1e-6, 1e-6, {}), ("bart", "causal", "frozen", 1e-6, 1e-6, KEPT),
    ("opt", "seq", "lora", 1e-6, 1e-6, KEPT_SCALE),
    # LlamaRMSNorm computes in float32 even in a float64 model (loss noise ~1e-7 relative):
    # wider steps and a float32-sized tolerance
    ("llama", "causal", "lora", 1e-3, 1e-3, {}), ("llama", "seq", "frozen", 1e-3, 1e-3, KEPT),
])
def test_side_gradients_match_finite_differences(arch, head, late_tuning, eps, tol, start):
    model = tiny(arch, head, layers=3, late_layers=1, dtype=torch.float64, late_tuning=late_tuning, side_width=8,
                 **start)
    model.eval()  # dropout off: a deterministic function of the parameters
    side = stack_of(model).side
    factor = {None: "gate", "scale": "scale", "out_proj": "out_proj.weight"}[side.start_form]
    with torch.no_grad():  # away from the init's special points: gate/scale/out_proj != 0, scores > 0, B != 0
        side.get_parameter(factor).normal_(0, 0.1).add_(0.05)
        side.fusion.score.bias.fill_(2.0)  # every shallow layer gets weight: a depends on w, b
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = make_batch(arch, head, n=3, length=6)
    labels = batch.pop("labels")  # our own float64 loss: HF's causal LM loss upcasts to float32 only
    prefix = LAYER_PREFIX[arch].rsplit(".", 1)[0] + ".side."
    names = [prefix + n for n in (factor, "fusion.score.weight", "fusion.score.bias", "out_proj.bias",
                                  "out_norm.weight", "projections.0.linear.weight", "projections.2.layer_norm.bias")]
    if head == "seq":
        names.append(next(n for n, p in model.named_parameters() if n.startswith(HEAD_PREFIX[arch])))
    names += [n for n, p in model.named_parameters() if p.requires_grad and ("lora_A" in n or "adapter.down" in n)][:1]
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in names)

    def objective(logits):
        if head == "causal":  # next-token prediction
            logits, target = logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
        else:
            target = labels
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)

    def loss(values):
        with torch.no_grad():
            return objective(functional_call(model, values, kwargs=batch, strict=False).logits).item()

    base = {n: params[n].detach().clone() for n in names}
    objective(model(**batch).logits).backward()
    grads = {n: params[n].grad.detach().clone() for n in names}
    g = torch.Generator().manual_seed(0)
    directions = [{n: torch.randn(base[n].shape, generator=g, dtype=torch.float64)} for n in names]
    directions.append({n: torch.randn(base[n].shape, generator=g, dtype=torch.float64) for n in names})
    for v in directions:  # central differences along a random direction, tensor by tensor, then all at once
        numeric = (loss({n: base[n] + eps * v.get(n, 0) for n in names})
                   - loss({n: base[n] - eps * v.get(n, 0) for n in names})) / (2 * eps)
        analytic = sum((grads[n] * v[n]).sum().item() for n in v)
        assert abs(analytic) > 1e-9, f"no gradient along {sorted(v)}"
        assert numeric == pytest.approx(analytic, rel=tol, abs=tol * 1e-2), sorted(v)


@pytest.mark.parametrize("recompute", ["gradient_checkpointing", "recompute_side"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients_with_dropout(arch, recompute):
    """Checkpointing (side module and late layers) and recompute_side (the side module only)
    recompute what they should, and the gradients equal the plain run's, dropout on."""
    def grads(on):
        model = tiny(arch, "seq", dropout=0.1, late_layers=2, dtype=torch.float64, late_tuning="lora",
                     **{"recompute_side": False, recompute: on})
        model.train()
        stack = stack_of(model)
        calls = []
        stack.layers[-1].register_forward_hook(lambda *a: calls.append(1))  # outside the checkpoint
        inner = stack.layers[-1].self_attn  # inside it: runs again in backward when recomputed
        inner.register_forward_hook(lambda *a: calls.append(2))
        stack.side.projections[0].register_forward_hook(lambda *a: calls.append(3))
        stack.side.out_proj.register_forward_hook(lambda *a: calls.append(4))
        torch.manual_seed(123)  # same dropout masks in both runs (checkpoint replays the RNG)
        _, loss = run(model, make_batch(arch))
        loss.backward()
        late = on and recompute == "gradient_checkpointing"
        assert calls.count(1) == 1 and calls.count(2) == (2 if late else 1)
        assert calls.count(4) == calls.count(3) == (2 if on else 1)  # the side module runs again in backward
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-10, atol=1e-12, msg=n)


# --- padding, training ----------------------------------------------------------------------


@pytest.mark.parametrize("head", ["bare", "causal"])
@pytest.mark.parametrize("arch", DECODERS)
def test_right_padding_does_not_change_real_tokens(arch, head):
    model = tiny(arch, head, dtype=torch.float64, late_layers=2)
    model.eval()
    with torch.no_grad():
        stack_of(model).side.gate.fill_(0.05)
    batch = make_batch(arch, "bare", length=10)
    other = {k: v.clone() for k, v in batch.items()}
    pad = batch["attention_mask"] == 0
    assert pad.any()
    other["input_ids"][pad] = torch.randint(3, VOCAB, (int(pad.sum()),))  # garbage under the mask
    with torch.no_grad():
        a, b = model(**batch), model(**other)
    key = "last_hidden_state" if head == "bare" else "logits"
    torch.testing.assert_close(b[key][~pad], a[key][~pad], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(b[key][pad], a[key][pad])


@pytest.mark.parametrize("arch", ARCHS)
def test_extra_right_padding_does_not_change_sequence_logits(arch):
    model = tiny(arch, "seq", dtype=torch.float64, late_layers=2)
    model.eval()
    with torch.no_grad():
        stack_of(model).side.gate.fill_(0.05)
    batch = make_batch(arch, "bare", length=8)
    longer = {"input_ids": torch.nn.functional.pad(batch["input_ids"], (0, 3), value=PAD[arch]),
              "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, 3), value=0)}
    with torch.no_grad():
        torch.testing.assert_close(model(**longer).logits, model(**batch).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch, head, lr, ratio", [
    ("opt", "seq", 3e-3, 0.7), ("llama", "seq", 3e-3, 0.7), ("bart", "seq", 3e-3, 0.7),
    ("llama", "causal", 1e-2, 0.97),  # random tokens through a frozen random LM head: a slow start
])
def test_training_smoke_loss_decreases(arch, head, lr, ratio):
    model = tiny(arch, head, late_tuning="lora")
    model.train()
    batch = make_batch(arch, head, n=8, length=8, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        _, loss = run(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < ratio * losses[0], losses


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_trains_with_the_fp32_result_close(arch):
    batch = make_batch(arch)
    grads = {}
    for bf16 in (False, True):
        model = tiny(arch, late_tuning="lora")
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = run(model, batch)
        loss.backward()
        grads[bf16] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    assert torch.isfinite(grads[True]).all() and grads[True].shape == grads[False].shape
    assert (grads[True] - grads[False]).norm() <= 0.05 * grads[False].norm()


# --- the kept starting point (preserve_start) ------------------------------------------------


@pytest.mark.parametrize("form", ["out_proj", "scale"])
@pytest.mark.parametrize("head", ["bare", "causal", "seq"])
@pytest.mark.parametrize("arch", ARCHS)
def test_preserve_start_outputs_equal_the_pretrained_model(arch, head, form):
    """At init the late layers receive exactly h_{N-k}: the outputs (real tokens, right
    padding in the batch) equal the unmodified model's, and the paper's form does not."""
    batch = make_batch(arch, head)
    plain = plain_model(arch, head).eval()
    with torch.no_grad():
        ref = plain(**batch, use_cache=False)
        kept = tiny(arch, head, preserve_start=True, start_form=form).eval()(**batch)
        paper = tiny(arch, head).eval()(**batch)
    key = "last_hidden_state" if head == "bare" else "logits"
    real = batch["attention_mask"].bool() if head != "seq" else slice(None)
    torch.testing.assert_close(kept[key][real], ref[key][real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(paper[key][real], ref[key][real], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("arch", ARCHS)
def test_family_defaults_on_every_architecture(arch):
    """Options left at None: OPT and LLaMA (decoder LMs) get the kept start with late LoRA in
    k = layers − 1 late layers here (8 on deeper ones): at init the outputs equal the
    pre-trained model's; the early route gets no gradient, the late LoRA does. BART keeps the
    paper's setting (one frozen late layer, gate closed)."""
    batch = make_batch(arch, "causal")
    with torch.no_grad():
        ref = plain_model(arch, "causal").eval()(**batch, use_cache=False).logits
    model = tiny(arch, "causal", family_defaults=True)
    stack = stack_of(model)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    real = batch["attention_mask"].bool()
    if arch == "bart":
        assert (stack.sherl.num_early, stack.side.start_form) == (LAYERS - 1, None)
        assert not any("lora" in n for n, _ in model.named_parameters())
        return
    assert (stack.sherl.num_early, stack.side.start_form) == (1, "out_proj")
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-5, atol=1e-5)
    model.train()
    run(model, batch)[1].backward()
    assert all(p.grad is None for m in early_modules(model) for p in m.parameters())
    lora = [p for n, p in model.named_parameters() if "lora" in n]
    assert lora and all(p.requires_grad and p.grad is not None for p in lora)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # A gets 0 while B = 0


@pytest.mark.parametrize("form", ["out_proj", "scale"])
@pytest.mark.parametrize("arch", ARCHS)
def test_preserve_start_learns_a_correction(arch, form):
    """The correction starts at 0 yet trains: step 1 moves the zero-initialised factor, from
    step 2 every projection gets a gradient and the outputs leave the pre-trained ones."""
    batch = make_batch(arch)
    model = tiny(arch, preserve_start=True, start_form=form, side_width=8)
    side = stack_of(model).side
    assert side.gate is None and "gate" not in dict(side.named_parameters())
    zero = side.out_proj.weight if form == "out_proj" else side.scale
    assert not zero.any()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        before = model.eval()(**batch).logits
    model.train()
    for step in (1, 2):
        opt.zero_grad()
        run(model, batch)[1].backward()
        grads = {n: p.grad for n, p in side.named_parameters() if n.startswith("projections.")}
        if step == 1:
            assert zero.grad.abs().sum() > 0 and all(not g.any() for g in grads.values() if g is not None)
        else:
            assert grads and all(g is not None and g.any() for n, g in grads.items() if n.endswith("weight"))
        opt.step()
    with torch.no_grad():
        after = model.eval()(**batch).logits
    assert not torch.allclose(after, before, atol=1e-4)
