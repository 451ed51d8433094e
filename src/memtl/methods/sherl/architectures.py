"""Where SHERL splits each supported architecture: one ``install.Architecture`` per
``config.model_type`` (``SPECS``). Everything else is ``install.py``'s, the same for all.

- BERT, RoBERTa (post-LayerNorm encoders): the encoder's ``layer`` list; the embeddings are
  early. Refused when configured as a decoder (``is_decoder``/``add_cross_attention``).
- OPT (pre-LayerNorm, and OPT-350m's post-LayerNorm form) and LLaMA (pre-RMSNorm, rotary
  position embeddings): the decoder stack; its token/position embeddings and OPT-350m's
  ``project_in`` are early, the final norm and ``project_out`` run after the late layers.
  LM heads stay frozen: OPT ties its head to the input embeddings (early route); LLaMA's
  (untied, vocabulary x hidden) is kept frozen alike, so a causal LM trains the side module
  (+ late LoRA/adapters) only.
- BART: the DECODER's layers; the whole encoder and the decoder's embeddings are early, so
  decoder layers 1 … N−k cross-attend to the encoder output without a graph, the side
  module fuses the decoder stream's features h_0 … h_{N−k}, and the last k decoder layers
  self-attend to its output and cross-attend to the (gradient-free) encoder output. Why
  there: the head (``BartForSequenceClassification``'s EOS-token ``classification_head``,
  or the frozen, embedding-tied ``lm_head``) reads the decoder's last layer, so the late
  route must end there. The encoder on the early route keeps SHERL's memory property (only
  k layers and the small side module hold activations). Encoder features sit on the source
  positions (another length in general), so they enter the late route the way BART feeds
  them anyway, through cross-attention, not through the fusion; the alternative, the
  encoder as early route with the whole decoder as late route, would keep autograd state
  for N decoder layers. ``k`` counts decoder layers; ``BartForCausalLM`` has no encoder.
  Late tuning leaves the cross-attention frozen, so the encoder output meets only frozen
  linear maps and autograd keeps nothing of it.

Late tuning everywhere: LoRA on the self-attention query and value projections; adapters
after the self-attention output projection and after the feed-forward output projection
(before each block's dropout + residual [+ LayerNorm]).
"""
from __future__ import annotations

import torch.nn as nn

from memtl.methods.bert_family import encoder_layers
from memtl.methods.sherl.install import Architecture


def _bert_family(model: nn.Module) -> None:
    """The checks MEFT makes too: BERT-like layers, not configured as a decoder."""
    encoder_layers(model, "sherl", "SHERL")


_BERT = Architecture(stack="encoder", layers="layer", early=("embeddings",),
                     lora=("attention.self.query", "attention.self.value"),
                     adapters=("attention.output.dense", "output.dense"), check=_bert_family)
_OPT_BART_LATE = {"lora": ("self_attn.q_proj", "self_attn.v_proj"), "adapters": ("self_attn.out_proj", "fc2")}

SPECS = {
    "bert": _BERT,
    "roberta": _BERT,
    "opt": Architecture(stack="decoder", layers="layers", early=("decoder.embed_tokens", "decoder.embed_positions",
                                                                 "decoder.project_in"), **_OPT_BART_LATE),
    "llama": Architecture(stack="", layers="layers", early=("embed_tokens",),
                          lora=("self_attn.q_proj", "self_attn.v_proj"),
                          adapters=("self_attn.o_proj", "mlp.down_proj")),
    "bart": Architecture(stack="decoder", layers="layers", what="decoder layers",
                         early=("encoder", "decoder.embed_tokens", "decoder.embed_positions",
                                "decoder.layernorm_embedding"), **_OPT_BART_LATE),
}
