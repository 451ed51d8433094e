"""MEFT1/2/3: make a pre-trained model reversible with adapters (Liao et al., NeurIPS 2023).

    model = memtl.apply_method(model, "meft2", bottleneck=8)

The pre-trained weights are frozen; adapters and the task head train (``classifier`` /
``score`` / ``qa_outputs`` and the backbone's pooler when it has one; LM heads stay
frozen, their decoder is tied to the word embeddings). During backward
the activations of the reversible layers are reconstructed from the layer outputs, so
peak activation memory does not grow with depth (docs/DESIGN.md §1). Layout:

- ``engine.py``    the reversible ``autograd.Function`` (architecture-agnostic)
- ``adapters.py``  the adapter module and the three variants' wiring of F, G, λ, β
- ``install.py``   the one install: the HF module owning each layer loop becomes, in place,
                   a subclass whose forward runs its layers as a reversible stack
- ``bert.py``      BERT/RoBERTa: blocks, adapter placement, the encoder's forward
- ``bart.py``      BART: encoder and decoder both reversible (the decoder's backward also
                   returns the encoder output's gradient, so the encoder adapters train)
- ``decoder.py``   OPT and LLaMA decoders (pre-/post-norm blocks with their residual inside,
                   causal mask, rotary embeddings): blocks, adapter placement, the decoder's forward
- ``diagnostics.py`` reconstruction error of every reversible stack, on demand + a Lightning callback

Options (shared by the three names; ``None`` picks the variant's default):

- ``bottleneck``: adapter width r (paper: 8).
- ``adapter_layernorm``: LayerNorm at the input of the stand-alone F/G adapter (MEFT1/2 only).
- ``adapter_activation``: relu | gelu | silu | swish | tanh | identity (a linear adapter).
- ``adapter_init``: normal (both layers N(0, 0.02²), the paper's) | zero (the up-projection
  starts at 0, so every adapter adds exactly 0 at init, as LoRA's B).
- ``adapter_dropout``: dropout inside the adapters; ``None`` = the model's hidden dropout
  (``hidden_dropout_prob``; BART/OPT ``dropout``; LLaMA has none: 0), as in the authors' code.
- ``num_rev_layers``: how many bottom layers use the reversible backward; ``None`` = all,
  0 = plain autograd through the same maths (the correctness oracle). Encoder-decoder
  models (BART): the first k layers of each stack.
- ``lam``/``beta``: the stream scales; defaults MEFT1 0.1/1, MEFT2 1/0.1, MEFT3 0.1/0.1 (the
  paper's); on pre-norm decoders (OPT pre-LN, LLaMA) MEFT1 0.01/1, MEFT2 1/0.01, MEFT3
  0.001/0.001, which keep SmolLM2-135M's pre-trained starting point (docs/RESULTS.md).
- ``inverse``: how the backward reconstructs each layer's inputs. ``exact`` (default):
  fixed-point streams, bit-exact at any depth and precision (docs/DESIGN.md §1.7), for a small
  integer residual beside each stream's float view and log2(q) bits per element per
  λ = p/q ≠ 1 and layer; λ and β must then be rationals p/q with |p|, q <= 65536.
  ``float``: the paper's division in the model's dtype, whose rounding error grows ~1/λ
  per layer going down (``memtl recon``).
- ``output``: what the stack returns after its last layer. ``mean``: the two streams' average
  (the paper's). ``chain``: the one stream that holds the last pre-trained layer's output
  (MEFT1: y1, MEFT2 and MEFT3: y2), so that as λ, β -> 0 with zero adapters the output is the
  pre-trained model's; still reversible, at the same memory (MEFT1's last G adapter, outside
  that stream, is frozen). Default: ``mean``, and ``chain`` on pre-norm decoders (OPT pre-LN,
  LLaMA; docs/RESULTS.md).
- ``streams``: ``two`` (default): MEFT. ``one`` (MEFT3 only): an ablation, not reversible: the
  same adapters on the pre-trained model's own one-stream forward (each layer G(F(h)), no λ,
  β or averaging), with plain autograd's memory; with ``adapter_init=zero`` it starts
  exactly at the pre-trained model.
- ``gradient_checkpointing``: must stay false (the reversible backward already recomputes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn

from memtl.errors import ConfigError
from memtl.methods import architecture_module, register_method
from memtl.methods.bert_family import unfreeze_head
from memtl.methods.meft.adapters import ACTIVATIONS, INITS, VARIANTS, Adapter
from memtl.methods.meft.engine import MAX_DENOMINATOR, as_fraction
from memtl.methods.meft.install import MeftStack, install, stack_layers
from memtl.methods.options import MethodOptions, option

__all__ = ["MeftOptions", "apply_meft", "VARIANTS", "meft_stacks", "stack_layers"]


# model_type -> the module of this package whose ``SPECS[model_type]`` describes that architecture
# to install.py (imported on first use: each imports its HF modeling code)
ARCHITECTURES = {
    "bert": "bert",
    "roberta": "bert",
    "bart": "bart",
    "opt": "decoder",
    "llama": "decoder",
}


def meft_stacks(model: nn.Module) -> list[MeftStack]:
    """The reversible stacks of a MEFT model, in forward order (BART: encoder, decoder).
    Each has ``num_rev_layers`` and ``inverse``; ``stack_layers`` gives its layers."""
    return [m for m in model.modules() if isinstance(m, MeftStack)]


@dataclass
class MeftOptions(MethodOptions):
    bottleneck: int = option(8, "the adapter width r", min=1)
    adapter_layernorm: bool = option(False, "a LayerNorm at the input of the stand-alone F/G adapter (meft1/meft2)")
    adapter_activation: str = option("relu", "the adapters' activation", choices=tuple(sorted(ACTIVATIONS)))
    adapter_init: str = option("normal", "how the adapters start", choices=INITS)
    adapter_dropout: float | None = option(None, "dropout inside the adapters", min=0, lt=1,
                                           null="the model's hidden dropout")
    num_rev_layers: int | None = option(None, "how many bottom layers use the reversible backward "
                                        "(0: plain autograd, same maths)", min=0, null="all layers")
    lam: float | None = option(None, "the scale λ of x1 (the inverse divides by it)", nonzero=True,
                               null="the variant's default")
    beta: float | None = option(None, "the scale β of x2 (the inverse divides by it)", nonzero=True,
                                null="the variant's default")
    inverse: str = option("exact", "how the backward rebuilds each layer's inputs", choices={
        "exact": "fixed-point streams, bit-exact at any depth", "float": "the paper's division"})
    output: str | None = option(None, "what the stack returns after its last layer", choices={
        "mean": "the two streams' average, the paper's", "chain": "the stream holding the last pre-trained layer's "
        "output"}, null="chain on pre-norm decoders, mean elsewhere")
    streams: str = option("two", "the forward the adapters sit in", choices={
        "two": "MEFT's reversible streams", "one": "MEFT3's adapters on the pre-trained model's own forward, "
        "not reversible: an ablation"})
    gradient_checkpointing: bool = option(False, "gradient checkpointing (false only: MEFT's backward recomputes)")

    def for_model(self, config, method: str) -> "MeftOptions":
        """λ/β left at None take the variant's value for ``config``'s family: the paper's, or
        the pre-norm decoder's (``Variant.decoder_lam``/``decoder_beta``); so does the output."""
        v = VARIANTS[method]
        decoder = config is not None and pre_norm_decoder(config)
        lam = (v.decoder_lam if decoder else v.lam) if self.lam is None else self.lam
        beta = (v.decoder_beta if decoder else v.beta) if self.beta is None else self.beta
        # pre-norm decoders return the chain stream, which trains to a better model there than the
        # streams' average (SmolLM2-135M ARC-Easy, three seeds per variant; docs/RESULTS.md)
        output = ("chain" if decoder else "mean") if self.output is None else self.output
        return dataclasses.replace(self, lam=float(lam), beta=float(beta), output=output)

    def __post_init__(self):
        super().__post_init__()
        if self.gradient_checkpointing:
            raise ConfigError("method.gradient_checkpointing=true: MEFT's reversible backward already recomputes "
                              "activations and cannot be combined with checkpointing; set it to false")


def pre_norm_decoder(config) -> bool:
    """OPT's pre-LayerNorm form (125m, 1.3b, ...) and LLaMA: their λ/β defaults differ."""
    return config.model_type == "llama" or (config.model_type == "opt" and getattr(config, "do_layer_norm_before", True))


def apply_meft(model: nn.Module, opts: MeftOptions, variant: str) -> nn.Module:
    """Make ``model`` reversible with MEFT ``variant`` (meft1/meft2/meft3), in place."""
    v = VARIANTS[variant]
    if opts.adapter_layernorm and not v.rev_adapter:
        raise ConfigError(f"method.adapter_layernorm=true: {variant} has no stand-alone F/G adapter to put a "
                          "LayerNorm in; set it to false (it applies to meft1/meft2)")
    if opts.streams == "one":
        if opts.num_rev_layers:
            raise ConfigError(f"method.num_rev_layers={opts.num_rev_layers}: method.streams=one is not reversible; "
                              "leave num_rev_layers null, or use method.streams=two")
        if v.rev_adapter:
            raise ConfigError(f"method.streams=one: {variant}'s stand-alone F/G adapter has no place in a one-stream "
                              "forward; use method=meft3, or method.streams=two")
    lam, beta = opts.lam, opts.beta  # numbers: apply_method resolved None (for_model)
    if opts.inverse == "exact":
        for key, value in (("lam", lam), ("beta", beta)):
            try:
                as_fraction(value)
            except ConfigError:
                raise ConfigError(f"method.{key}={value}: the exact inverse needs a rational p/q with |p|, q <= "
                                  f"{MAX_DENOMINATOR} (e.g. 0.1, 0.01, 0.25); choose one, or method.inverse=float") \
                    from None

    model.requires_grad_(False)  # everything pre-trained is frozen ...
    arch = architecture_module(model, __name__, ARCHITECTURES, variant).SPECS[model.config.model_type]
    backbone = install(model, arch, v, opts)
    for m in model.modules():  # ... except the adapters ...
        if isinstance(m, Adapter):
            m.requires_grad_(True)
    if opts.output == "chain" and v.chain_skips_last_g:
        # ... but MEFT1's last G adapter, which writes only to the stream output=chain drops:
        # frozen, it is no trainable parameter that never learns (nor one DDP waits for)
        for stack in meft_stacks(model):
            stack_layers(stack)[-1].rev_adapter.requires_grad_(False)
    unfreeze_head(model, backbone)  # ... and the task head
    return model


def _register(variant: str) -> None:
    def apply(model: nn.Module, opts: MeftOptions) -> nn.Module:
        return apply_meft(model, opts, variant)

    apply.__name__ = apply.__qualname__ = f"apply_{variant}"
    apply.__doc__ = f"MEFT variant {variant!r}; see memtl.methods.meft."
    register_method(variant, MeftOptions)(apply)


for _variant in VARIANTS:
    _register(_variant)
