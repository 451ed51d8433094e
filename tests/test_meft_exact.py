"""MEFT's exact inverse (docs/DESIGN.md §1.7): fixed-point streams, remainders, range errors.

Bit-exact reconstruction at 24 layers in float32 and under bf16 autocast, float32
gradients at depth against plain autograd (``num_rev_layers=0``) on every architecture,
SmolLM2-135M's real 30 layers, the remainder buffer, and the overflow error.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

from memtl.errors import RunError
from memtl.methods import apply_method
from memtl.methods.meft import meft_stacks
from memtl.methods.meft.diagnostics import reconstruction_report
from memtl.methods.meft.engine import FixedPoint, FixedPointOverflow, RemainderStack, as_fraction
from memtl.tools.gradcheck import EOS, PAD, _grads, max_rel_err, padded_batch, rev_vs_plain, tiny_model

VARIANTS = ["meft1", "meft2", "meft3"]
ARCHS = ["bert", "bart", "opt", "opt-350m", "llama"]
DEPTH = 24


def batch_for(arch: str) -> dict:
    return padded_batch(120, PAD[arch], eos=EOS if arch == "bart" else None)


# --- the arithmetic ----------------------------------------------------------------------


def test_lambda_as_a_fraction():
    assert as_fraction(0.1) == (1, 10) and as_fraction(0.01) == (1, 100) and as_fraction(1.0) == (1, 1)
    assert as_fraction(0.3) == (3, 10) and as_fraction(2.5) == (5, 2) and as_fraction(-0.25) == (-1, 4)
    for bad in (0.123456789, 2.0 ** -20, 0.0):
        with pytest.raises(ValueError, match="rational"):
            as_fraction(bad)


def test_remainder_stack_round_trip_and_packing():
    rng = random.Random(0)
    radices = [rng.choice([2, 10, 100, 1000, 7, 256, 32768]) for _ in range(40)]  # 256, 32768: a word's edge
    stack = RemainderStack(radices)
    pushed = []
    for q in radices:
        r = torch.randint(0, q, (3, 5))
        stack.push(r.clone(), q)
        pushed.append(r)
    assert stack.nbytes() == stack.bytes_per_element * 15
    for q, r in zip(reversed(radices), reversed(pushed)):
        assert torch.equal(stack.pop(q), r)
    assert stack.words == []
    # MEFT1 at BERT-base depth: 12 remainders of 1/10 in 6 bytes (int32 + 2 uint8), not 12
    assert RemainderStack([10] * 12).bytes_per_element == 6
    assert RemainderStack([10] * 6).bytes_per_element == 3  # two decimal digits per byte


@pytest.mark.parametrize("factor", [0.1, 0.01, 0.3, 0.75, 1.0, 2.5, -0.25, 1 / 256])
def test_scaling_is_inverted_exactly(factor):
    torch.manual_seed(0)
    p, q = as_fraction(factor)
    fp = FixedPoint(torch.float32, RemainderStack([q] if q != 1 else []))
    x = fp.encode(torch.randn(4, 7) * 10)
    out = torch.randn(4, 7)
    y = fp.scaled_add(x, factor, out)
    assert torch.equal(fp.integer(fp.unscaled_sub(y, factor, out)), fp.integer(x))
    # the result is factor * x + out to the grid's resolution (2^-32)
    n_x, n_y = fp.integer(x).double() / fp.scale, fp.integer(y).double() / fp.scale
    torch.testing.assert_close(n_y, factor * n_x + out.double(), rtol=0, atol=2.0 ** -31)
    # the stream is held as its float view and a small residual: 4 + 2 bytes an element here
    assert y.hi.dtype == torch.float32 and y.lo.dtype == torch.int16
    big = fp.scaled_add(fp.encode(torch.full((2,), 3e4)), factor, out[0, :2])  # beyond 2^8: int32
    assert (big.lo.dtype == torch.int32) == (abs(factor) * 3e4 > 256) and torch.equal(fp.integer(fp.unscaled_sub(big, factor, out[0, :2])),
                                                       fp.integer(fp.encode(torch.full((2,), 3e4))))
    assert torch.equal(y.hi, (fp.integer(y).double() / fp.scale).float())


# --- reconstruction: bit for bit at depth ------------------------------------------------


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_reconstruction_is_bit_exact_at_24_layers(variant, arch, precision):
    model = tiny_model(arch, variant, 0.1, layers=DEPTH, hidden=64, dtype=torch.float32, adapter_dropout=0.1)
    assert model.training  # dropout on: the inverse must replay the forward's masks
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast:
        report = reconstruction_report(model, batch_for(arch))
    assert len(report) == DEPTH * (2 if arch == "bart" else 1)
    assert all(r["max_abs"] == 0.0 for r in report), [r for r in report if r["max_abs"]][:3]
    # the same model under the float inverse loses its bottom layers' inputs
    for stack in meft_stacks(model):
        stack.inverse = "float"
    with autocast:
        lossy = reconstruction_report(model, batch_for(arch))
    assert not all(r["rel"] <= 1e-3 for r in lossy)  # a nan counts as lost


# --- gradients at depth in float32 ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "bart", "opt", "llama"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_gradients_at_24_layers_match_plain_autograd(variant, arch):
    batch = batch_for(arch)
    errors = {}
    for inverse in ("exact", "float"):
        model = tiny_model(arch, variant, 0.1, layers=DEPTH, hidden=64, dtype=torch.float32, inverse=inverse)
        errors[inverse] = rev_vs_plain(model, batch, None, seed=3)
    print(f"{variant} {arch} x{DEPTH} fp32: exact {errors['exact']:.1e}, float {errors['float']:.1e}")
    assert errors["exact"] <= 1e-4
    assert not errors["float"] < 1e-2  # the same check tells the paper's inverse apart (nan counts)


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_rationals_with_a_numerator_are_exact(variant):
    """λ = 3/10 and β = 3/4: the inverse divides by p as well as keeping the remainder of q."""
    model = tiny_model("bert", variant, 0.1, layers=8, dtype=torch.float32, lam=0.3, beta=0.75)
    report = reconstruction_report(model, batch_for("bert"))
    assert all(r["max_abs"] == 0.0 for r in report)
    assert rev_vs_plain(model, batch_for("bert"), None) <= 1e-4


def test_smollm2_real_weights_all_30_layers():
    """SmolLM2-135M's real weights (~20 s to load), all 30 layers reversible, float32: the exact
    reversible gradients match plain autograd."""
    from memtl.tools.gradcheck import smollm2_rows

    rows = smollm2_rows(length=32, inverses=("exact",))
    print(rows)
    assert [r["variant"] for r in rows] == VARIANTS
    assert all(r["exact fp32"] <= 1e-3 for r in rows), rows


# --- out of range: one clear error, never a wrap-around -----------------------------------


def test_values_beyond_the_fixed_point_range_raise_naming_the_layer():
    model = tiny_model("bert", "meft1", 0.0, layers=6, dtype=torch.float32)
    batch = batch_for("bert")
    layer = meft_stacks(model)[0].layer[3]
    with torch.no_grad():
        layer.rev_adapter.up.bias.fill_(1e12)  # G of layer 3 (MEFT1's adapter) far beyond ±2^28
    with pytest.raises(FixedPointOverflow) as err:
        model(**batch).loss.backward()
    message = str(err.value)
    assert isinstance(err.value, RunError) and "\n" not in message
    assert "layer 3 of the reversible encoder stack" in message and "G's output" in message
    assert "method.inverse=float" in message
    # not finite: a nan is reported the same way
    with torch.no_grad():
        layer.rev_adapter.up.bias.fill_(float("nan"))
    with pytest.raises(FixedPointOverflow, match="layer 3 .*nan"):
        model(**batch)
    # eval runs the plain forward: no fixed point there, nothing to check
    model.eval()
    with torch.no_grad():
        layer.rev_adapter.up.bias.fill_(1e12)
        assert model(**batch).logits.shape[0] == 4


def test_a_large_input_is_named_as_the_stack_input():
    model = tiny_model("opt", "meft2", 0.0, layers=2, dtype=torch.float32)
    emb = model.model.decoder.embed_tokens
    with torch.no_grad():
        emb.weight.mul_(1e10)
    with pytest.raises(FixedPointOverflow, match="input of the reversible decoder stack"):
        model(**batch_for("opt"))


def test_exact_and_float_compute_the_same_forward():
    """The fixed-point forward rounds F and G to 2^-32: the model's outputs are the float
    forward's to float32 precision, so choosing the inverse does not change the model."""
    batch = batch_for("llama")
    exact = tiny_model("llama", "meft1", 0.0, layers=DEPTH, hidden=64, dtype=torch.float32)
    float_ = copy.deepcopy(exact)
    for stack in meft_stacks(float_):
        stack.inverse = "float"
    out_e, out_f = exact(**batch), float_(**batch)  # train mode, grad on: the reversible Function runs
    torch.testing.assert_close(out_e.logits, out_f.logits, rtol=1e-5, atol=1e-5)
    # the exact backward is deterministic: the same step twice gives the same gradients bit for bit
    first, again = _grads(exact, batch), _grads(exact, batch)
    assert max_rel_err(first, again) == 0.0


@pytest.mark.parametrize("inverse", ["exact", "float"])
def test_a_second_backward_through_the_same_graph_is_one_clear_error(inverse):
    model = tiny_model("bert", "meft1", 0.0, inverse=inverse)
    loss = model(**batch_for("bert")).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already ran.*run the forward again"):
        loss.backward()


def test_float16_outputs_are_widened_before_scaling():
    """F and G in float16 (16-mixed): x·2^32 would overflow float16, so rounding widens first."""
    fp = FixedPoint(torch.float32, RemainderStack([10]))
    x = fp.encode(torch.tensor([1.5, -2.25]))
    out = torch.tensor([0.5, 3.0], dtype=torch.float16)
    y = fp.scaled_add(x, 0.1, out)
    assert fp.integer(y).tolist() == [round((0.15 + 0.5) * 2**32), round((-0.225 + 3.0) * 2**32)]
    assert torch.equal(fp.integer(fp.unscaled_sub(y, 0.1, out)), fp.integer(x))


def test_an_in_place_change_of_an_output_is_caught():
    from memtl.methods.meft.engine import reversible_stack

    model = tiny_model("bert", "meft1", 0.0, dtype=torch.float32)
    layers = meft_stacks(model)[0].layer
    h = torch.randn(2, 5, 32)
    y1, y2 = reversible_stack(h, h, layers)
    y1.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        (y1.sum() + y2.sum()).backward()


def test_a_recompute_that_differs_from_the_forward_is_caught():
    """If F recomputes other bits in the backward, the walk down does not end at the inputs."""
    from memtl.methods.meft.engine import reversible_stack

    model = tiny_model("bert", "meft1", 0.0, dtype=torch.float32)
    layers = meft_stacks(model)[0].layer
    h = torch.randn(2, 5, 32)
    y1, y2 = reversible_stack(h, h, layers)
    with torch.no_grad():  # between forward and backward: F's recompute now differs
        layers[0].output.dense.bias.add_(1e-3)
    with pytest.raises(RuntimeError, match="did not rebuild the stack's inputs bit for bit"):
        (y1.sum() + y2.sum()).backward()


def test_no_reference_cycle_keeps_the_streams_alive():
    import gc
    import weakref

    from memtl.methods.meft.engine import reversible_stack

    model = tiny_model("bert", "meft2", 0.0, dtype=torch.float32)
    h = torch.randn(2, 5, 32)
    gc.disable()
    try:
        y1, y2 = reversible_stack(h, h, meft_stacks(model)[0].layer)
        alive = weakref.ref(y1)
        del y1, y2  # no backward: the graph and its ctx go by reference counting alone
        assert alive() is None
    finally:
        gc.enable()
