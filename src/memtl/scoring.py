"""Multiple-choice scoring: one logit per choice, from any backbone, for FineTuneModule.

``MultipleChoiceModel`` wraps the (method-prepared) Hugging Face model and returns, like a
classification model, ``.logits`` of shape (batch, max choices) and ``.loss``:

- LM heads (decoders: causal_lm; BART: seq2seq_lm). A choice's score is its log-likelihood
  given the prompt, ``sum_t log p(choice token t | prompt, earlier choice tokens)``, then
  normalised by ``length_norm``: ``none`` (the sum: lm-eval's ``acc``), ``token`` (mean per
  token), or ``char`` (sum / characters of " " + choice: lm-eval's ``acc_norm``). The vocabulary
  projection runs only where a choice token is predicted (causal rows are left-padded so all
  choices end at the last position), and never holds the (tokens x vocabulary) logits at
  once: ``token_logprobs`` projects a chunk of tokens at a time and recomputes each chunk
  in backward (SmolLM2: a 49k-word vocabulary; every method, full fine-tuning included).
- multiple_choice (BERT/RoBERTa): the HF multiple-choice head's logit per (prompt, choice) pair.

Training objective, the same for every head: cross-entropy over the choices of a question,
``-log softmax(scores)[answer]``, with absent choices (a 3-choice question in a 5-choice batch)
at -inf. For LM heads this is a discriminative objective on the (normalised) sequence
log-likelihoods: it raises the answer's likelihood relative to the other choices', not the
plain language-modelling likelihood of the answer. Accuracy = argmax of the same scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memtl.errors import ConfigError


@dataclass
class MultipleChoiceOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (batch, max choices); absent choices at the dtype's lowest value


#: logits held at once by ``token_logprobs`` (float32 bytes): one chunk of tokens x vocabulary
CHUNK_BYTES = 32 * 2**20


class _TokenLogProbs(torch.autograd.Function):
    """``log softmax(h W^T + b)[target]`` per token, chunk by chunk, keeping no logits:
    backward recomputes each chunk's logits (under the forward's autocast state) and
    accumulates the gradients of ``h``, ``W`` and ``b`` (when they need one)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):
        ctx.autocast = (h.device.type, torch.is_autocast_enabled(h.device.type),
                        torch.get_autocast_dtype(h.device.type))
        out = torch.empty(len(h), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32,
                          device=h.device)
        for s in range(0, len(h), chunk):
            logits = _upcast(F.linear(h[s:s + chunk], weight, bias))
            out[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - logits.logsumexp(-1)
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype) \
            if need_w else None
        gb = torch.zeros_like(gw[:, 0]) if need_b else None
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for s in range(0, len(h), ctx.chunk):
                hc = h[s:s + ctx.chunk]
                logits = _upcast(F.linear(hc, weight, bias))
                # d lp / d logits = onehot(target) - softmax(logits), times the incoming gradient
                d = torch.softmax(logits, -1).mul_(-grad[s:s + ctx.chunk, None])
                d.scatter_add_(-1, targets[s:s + ctx.chunk, None], grad[s:s + ctx.chunk, None])
                if need_h:
                    gh[s:s + ctx.chunk] = (d.to(weight.dtype) @ weight).to(h.dtype)
                if need_w:
                    gw.addmm_(d.t(), hc.to(gw.dtype))
                if need_b:
                    gb += d.sum(0)
        return gh, gw.to(weight.dtype) if need_w else None, gb.to(bias.dtype) if need_b else None, None, None


def token_logprobs(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` of each of the (N, d) hidden states ``h`` under the LM head ``head``,
    in float32 (float64 for a float64 model), holding at most ``CHUNK_BYTES`` of logits."""
    chunk = max(1, CHUNK_BYTES // (4 * head.weight.shape[0]))
    return _TokenLogProbs.apply(h, head.weight, head.bias, targets, chunk)


def choice_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    choice_len: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's last ``choice_len`` tokens under a causal LM.

    Rows are left-padded (``attention_mask`` 0 on the left). Returns (rows,) in float32 (float64 for a float64 model).
    The model's body gives the hidden states; its LM head scores only the choice tokens."""
    k = int(choice_len.max())
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # count from the first real token
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft: the HF model
    out = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
    valid = torch.arange(k, device=input_ids.device)[None] >= (k - choice_len)[:, None]  # (rows, k)
    h = out.last_hidden_state[:, -k - 1:-1][valid]  # position t predicts token t + 1: the choice tokens
    lp = token_logprobs(h, hf.get_output_embeddings(), input_ids[:, -k:][valid])
    return lp.new_zeros(len(input_ids)).index_add_(0, valid.nonzero()[:, 0], lp)


def seq2seq_choice_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            targets: torch.Tensor, choice_len: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's (right-padded) decoder ``targets`` given the encoder
    input, decoder input = targets shifted right behind the decoder start token."""
    start = model.config.decoder_start_token_id
    if start is None:
        raise ConfigError(f"{type(model).__name__} has no decoder_start_token_id: cannot score choices with it")
    decoder_input_ids = torch.cat([targets.new_full((len(targets), 1), start), targets[:, :-1]], 1)
    valid = torch.arange(targets.shape[1], device=targets.device)[None] < choice_len[:, None]
    out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=valid.long(), use_cache=False)
    return _sum_target_logprobs(_upcast(out.logits), targets, valid)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # half-precision logits (bf16/fp16 runs) lose the small log-probability differences
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _sum_target_logprobs(logits, targets, valid) -> torch.Tensor:
    # log p(target) = logit[target] - logsumexp(logits): no full log_softmax tensor kept
    lp = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return (lp * valid).sum(-1)


def normalise(logprob: torch.Tensor, choice_len: torch.Tensor, choice_chars: torch.Tensor, how: str) -> torch.Tensor:
    if how == "none":
        return logprob
    if how == "token":
        return logprob / choice_len
    if how == "char":
        return logprob / choice_chars
    raise ConfigError(f"task.length_norm={how!r} is unknown; choose none, token or char")


class MultipleChoiceModel(nn.Module):
    """forward(**batch from memtl.data.qa.QACollate) -> MultipleChoiceOutput(loss, logits)."""

    def __init__(self, model: nn.Module, head: str, length_norm: str = "char"):
        super().__init__()
        if head not in ("causal_lm", "seq2seq_lm", "multiple_choice"):
            raise ConfigError(f"no multiple-choice scoring for head {head!r}")
        self.model, self.head, self.length_norm = model, head, length_norm
        self.config = getattr(model, "config", None)

    def forward(self, labels=None, choice_mask=None, row_question=None, row_choice=None, choice_len=None,
                choice_chars=None, targets=None, **inputs) -> MultipleChoiceOutput:
        if self.head == "multiple_choice":
            logits = self.model(**inputs).logits  # (batch, choices)
            logits = logits.masked_fill(~choice_mask, torch.finfo(logits.dtype).min)
        else:
            if self.head == "causal_lm":
                lp = choice_logprobs(self.model, inputs["input_ids"], inputs["attention_mask"], choice_len)
            else:
                lp = seq2seq_choice_logprobs(self.model, inputs["input_ids"], inputs["attention_mask"], targets,
                                             choice_len)
            scores = normalise(lp, choice_len, choice_chars, self.length_norm)
            batch = int(row_question.max()) + 1 if labels is None else len(labels)
            logits = scores.new_full((batch, int(row_choice.max()) + 1), torch.finfo(scores.dtype).min)
            logits = logits.index_put((row_question, row_choice), scores)
        loss = F.cross_entropy(_upcast(logits), labels) if labels is not None else None
        return MultipleChoiceOutput(loss=loss, logits=logits)
