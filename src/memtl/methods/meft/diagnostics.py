"""How exact is the inverse? Reconstruction error of the reversible layers.

The backward pass reconstructs each reversible layer's inputs from its outputs. Under
``inverse=exact`` (fixed-point streams) that is lossless: the error is 0. Under
``inverse=float`` each inverse divides by λ or β, so errors grow from the top layer down
(worst for small factors, deep stacks, low precision).

``reconstruction_errors(model, batch)`` runs one forward, records what every reversible
stack runs on (its input hidden states and its context: masks, rotary embeddings, a BART
decoder's encoder output; each stack appends them to its ``recorded`` list when that is
set), then per stack runs the layers forward keeping their true inputs and walks down
from the output exactly as the backward does (same arithmetic, dropout masks, precision
and ``num_rev_layers``) and compares.
Every MEFT stack is measured: BERT/RoBERTa's encoder, BART's encoder and decoder (rows
labelled ``stack``), OPT/LLaMA's decoder. ``ReconstructionErrorMonitor`` logs that every
N training steps and warns above a threshold.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn
from lightning.pytorch import Callback

from memtl.methods.meft import meft_stacks, stack_layers
from memtl.methods.meft.bert import MeftEncoder
from memtl.methods.meft.engine import RangeCheck, layer_forward, layer_inverse, stack_arithmetic

# inputs the stacks depend on; labels etc. are not needed to measure reconstruction
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                 "decoder_input_ids", "decoder_attention_mask")


def find_meft_encoder(module: nn.Module) -> MeftEncoder:
    """The BERT-family MEFT encoder (other architectures: ``meft_stacks``)."""
    for m in module.modules():
        if isinstance(m, MeftEncoder):
            return m
    raise ValueError(f"{type(module).__name__} contains no MEFT encoder: apply meft1/meft2/meft3 first")


def _stacks(module: nn.Module) -> list[nn.Module]:
    stacks = meft_stacks(module)
    if not stacks:
        raise ValueError(f"{type(module).__name__} contains no MEFT stack: apply meft1/meft2/meft3 first")
    return stacks


def _owner_model(module: nn.Module, stacks: list[nn.Module]) -> nn.Module:
    """The outermost model holding the MEFT stacks that training feeds the batch to (e.g. inside
    a LightningModule): memtl's multiple-choice scorer (QA) or a Hugging Face model."""
    from transformers import PreTrainedModel

    from memtl.scoring import MultipleChoiceModel

    ids = {id(s) for s in stacks}
    for m in module.modules():  # outermost first
        if isinstance(m, (PreTrainedModel, MultipleChoiceModel)) and any(id(x) in ids for x in m.modules()):
            return m
    raise ValueError(f"{type(module).__name__} holds no Hugging Face model with a MEFT stack")


@torch.no_grad()
def stack_reconstruction(stack: nn.Module, hidden_states: torch.Tensor, context: tuple = ()) -> list[dict]:
    """Per reversible layer of ``stack`` (bottom first): max abs and relative error of the
    reconstructed inputs, starting from ``hidden_states`` with ``context`` (what the stack's
    forward hands to ``reversible_stack``)."""
    layers = list(stack_layers(stack))[: stack.num_rev_layers]
    a = stack_arithmetic(layers, stack.inverse, hidden_states.dtype)
    check = (RangeCheck(layers, stack.label, hidden_states.abs().amax().double(), a)
             if stack.inverse == "exact" and layers else None)
    x1 = x2 = a.encode(hidden_states)
    inputs, rngs = [], []
    for layer in layers:
        inputs.append((x1, x2))
        (x1, x2), rng = layer_forward(layer, x1, x2, tuple(context), a, record_rng=True, check=check)
        rngs.append(rng)
    if check is not None:  # out of range: the same error as training, not rows of wrapped values
        check.check()
    report = [None] * len(layers)
    for i in reversed(range(len(layers))):
        x1, x2 = layer_inverse(layers[i], x1, x2, tuple(context), rngs[i], a)
        t1, t2 = inputs[i]
        err = max(a.difference(x1, t1).abs().max().item(), a.difference(x2, t2).abs().max().item())
        scale = max(a.decode(t1).abs().max().item(), a.decode(t2).abs().max().item(), torch.finfo(torch.float32).tiny)
        report[i] = {"layer": i, "max_abs": err, "rel": err / scale}
    return report


def encoder_reconstruction(encoder: MeftEncoder, hidden_states: torch.Tensor, attention_mask=None) -> list[dict]:
    """``stack_reconstruction`` of a BERT-family encoder, whose context is the attention mask."""
    return stack_reconstruction(encoder, hidden_states, (attention_mask,))


def _model_inputs(hf_model: nn.Module, batch: Mapping[str, Any]) -> dict:
    from memtl.scoring import MultipleChoiceModel

    if isinstance(hf_model, MultipleChoiceModel):  # QA: the scorer's own call (positions, decoder targets)
        return dict(batch)
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    # a seq2seq LM trains its decoder on the shifted labels, not on the shifted inputs
    if ("labels" in batch and "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in batch
            and hasattr(hf_model, "prepare_decoder_input_ids_from_labels")):
        inputs["decoder_input_ids"] = hf_model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return inputs


def reconstruction_report(model: nn.Module, batch: Mapping[str, Any]) -> list[dict]:
    """Run ``model`` on ``batch`` and report, per reversible layer, ``max_abs`` and ``rel``
    error: the stacks in forward order, each bottom layer first; with several stacks (BART)
    each row also names its ``stack`` (``encoder``/``decoder``)."""
    stacks = _stacks(model)
    hf_model = _owner_model(model, stacks)
    # fork the RNG: measuring must not shift the dropout masks of the training run
    device = next(hf_model.parameters()).device
    try:
        for stack in stacks:
            stack.recorded = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            hf_model(**_model_inputs(hf_model, batch))
            report = []
            for stack in stacks:
                if len(stack.recorded) != 1:
                    raise RuntimeError(f"{type(stack).__name__} ran {len(stack.recorded)} times in one forward of "
                                       f"{type(hf_model).__name__}; reconstruction needs exactly one run per stack")
                rows = stack_reconstruction(stack, *stack.recorded[0])
                if len(stacks) > 1:
                    rows = [{"stack": stack.label, **r} for r in rows]
                report += rows
            return report
    finally:
        for stack in stacks:
            stack.recorded = None


def reconstruction_errors(model: nn.Module, batch: Mapping[str, Any]) -> list[float]:
    """Max abs error of the reconstructed inputs, one value per reversible layer (bottom
    first; several stacks: one after the other, as in ``reconstruction_report``)."""
    return [r["max_abs"] for r in reconstruction_report(model, batch)]


def _autocast_training(trainer) -> bool:
    """Does the trainer train under a reduced-precision autocast (bf16-mixed, 16-mixed)?"""
    return "mixed" in str(getattr(trainer, "precision", ""))


class ReconstructionErrorMonitor(Callback):
    """Every ``every_n_steps`` training steps, measure reconstruction error on the current
    batch; log ``meft/recon_err_max`` (+ ``meft/recon_err_rel_max`` and per layer
    ``meft/recon_err/layer_<i>``; several stacks, BART: ``meft/recon_err/<stack>/layer_<i>``)
    and warn when the relative error (worst over all stacks) exceeds ``threshold``.
    Under ``inverse=exact`` the error is 0 by construction; the monitor then checks it.

    Costs one extra forward (+ inverse) on the steps it runs. Batches must be dicts of
    model inputs (``input_ids``, ``attention_mask``, ...).
    """

    def __init__(self, every_n_steps: int = 100, threshold: float = 1e-2, per_layer: bool = True):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.every_n_steps = every_n_steps
        self.threshold = threshold
        self.per_layer = per_layer
        self.last_report: list[dict] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps != 0 or not isinstance(batch, Mapping):
            return
        # measure in the training precision (Lightning's autocast context, if any)
        plugin = getattr(trainer, "precision_plugin", None)
        ctx = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
        with ctx:
            report = reconstruction_report(pl_module, batch)
        if not report:  # num_rev_layers = 0: nothing is reconstructed
            return
        self.last_report = report
        worst = max(r["max_abs"] for r in report)
        worst_rel = max(r["rel"] for r in report)
        pl_module.log("meft/recon_err_max", worst)
        pl_module.log("meft/recon_err_rel_max", worst_rel)
        if self.per_layer:
            for r in report:
                where = f"{r['stack']}/" if "stack" in r else ""
                pl_module.log(f"meft/recon_err/{where}layer_{r['layer']}", r["max_abs"])
        if worst_rel > self.threshold:
            msg = (f"MEFT reconstruction error {worst_rel:.3g} (relative) > {self.threshold:g} at step "
                   f"{trainer.global_step}: gradients are inexact; use method.inverse=exact, larger lam/beta "
                   "or fewer reversible layers (method.num_rev_layers)")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
