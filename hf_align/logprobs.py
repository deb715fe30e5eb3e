"""Per-token log-probabilities of completion tokens, computed from the last hidden state in chunks.

The `[B, T, V]` logits are never built: only the positions that predict a completion token are projected through
the LM head, `chunk_size` tokens at a time, and each chunk is recomputed in the backward pass instead of being
stored (activation checkpointing), so memory for the head is `O(chunk_size * V)` whatever the batch.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .models import unwrap_causal_lm

DEFAULT_CHUNK_SIZE = 1024


@dataclass
class CompletionLogProbs:
    """Log-probs aligned with the input: `token_logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])` where
    `mask[b, t]` is 1 (a completion token), else 0. Statistics are detached and follow the same alignment."""

    token_logps: torch.Tensor  # [B, T] float32
    mask: torch.Tensor  # [B, T] float32
    entropy: torch.Tensor | None = None  # [B, T]
    mean_logit: torch.Tensor | None = None  # [B, T]
    is_top1: torch.Tensor | None = None  # [B, T] bool

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    @property
    def sum(self) -> torch.Tensor:
        return self.token_logps.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.lengths.clamp(min=1)


def _chunk_logps(hidden, weight, bias, targets, temperature, softcap, with_stats):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_stats:
        return (logps,)
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = log_norm - (probs * logits).sum(-1)
        mean_logit = logits.mean(-1)
        is_top1 = logits.argmax(-1) == targets
    return logps, entropy, mean_logit, is_top1


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """`log softmax(hidden @ weight.T + bias)[targets]` for `hidden` `[N, H]`, `targets` `[N]`, chunk by chunk.

    Returns `(logps,)` or, with `with_stats`, `(logps, entropy, mean_logit, is_top1)`, each `[N]`."""
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, hidden.size(0), chunk_size):
        args = (hidden[start : start + chunk_size], weight, bias, targets[start : start + chunk_size])
        if recompute:
            pieces.append(
                checkpoint(_chunk_logps, *args, temperature, softcap, with_stats, use_reentrant=False)
            )
        else:
            pieces.append(_chunk_logps(*args, temperature, softcap, with_stats))
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty, empty, empty.bool()) if with_stats else (empty,)
    return tuple(torch.cat(parts) for parts in zip(*pieces))


@contextmanager
def _capture_last_hidden_state(causal_lm):
    """Records the output of the model's decoder (its last hidden state, after the final norm)."""
    captured = {}

    def hook(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = causal_lm.get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _accepts_logits_to_keep(causal_lm) -> bool:
    return "logits_to_keep" in inspect.signature(type(causal_lm).forward).parameters


def last_hidden_state(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Runs `model` (possibly wrapped by DDP / peft) through its own forward, so wrappers see the call, and returns
    the decoder's last hidden state `[B, T, H]`. The LM head runs on one position only."""
    causal_lm = unwrap_causal_lm(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if _accepts_logits_to_keep(causal_lm):
        kwargs["logits_to_keep"] = 1
    with _capture_last_hidden_state(causal_lm) as captured:
        model(**kwargs)
    return captured["hidden"]


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_stats: bool = False,
) -> CompletionLogProbs:
    """Log-probs of the tokens where `completion_mask` is 1 (`[B, T]` each), under `model`.

    Only those positions go through the LM head. Position 0 is never scored (nothing predicts it)."""
    hidden = last_hidden_state(model, input_ids, attention_mask, position_ids)
    target_mask = completion_mask[:, 1:].bool()
    results = _head_logprobs(
        model, hidden[:, :-1][target_mask], input_ids[:, 1:][target_mask], temperature, chunk_size, with_stats
    )

    def aligned(values: torch.Tensor) -> torch.Tensor:
        shifted = values.new_zeros(target_mask.shape).masked_scatter(target_mask, values)
        return F.pad(shifted, (1, 0))

    mask = F.pad(target_mask, (1, 0)).float()
    if not with_stats:
        return CompletionLogProbs(aligned(results[0]), mask)
    logps, entropy, mean_logit, is_top1 = results
    return CompletionLogProbs(aligned(logps), mask, aligned(entropy), aligned(mean_logit), aligned(is_top1))


def _head_logprobs(model, hidden, targets, temperature, chunk_size, with_stats) -> tuple[torch.Tensor, ...]:
    """`token_logprobs` of `targets` `[N]` from `hidden` `[N, H]` through `model`'s LM head and logit softcap."""
    causal_lm = unwrap_causal_lm(model)
    head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    return token_logprobs(
        hidden, head.weight, head.bias, targets,
        temperature=temperature, softcap=softcap, chunk_size=chunk_size, with_stats=with_stats,
    )


# `segment_ids` of a shared-prefix batch (`DataCollatorForPreference(prefix_sharing=True)`): 0 marks padding.
PROMPT, CHOSEN, REJECTED = 1, 2, 3


def shared_prefix_inputs(segment_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids `[B, T]` and the additive attention mask `[B, 1, T, T]` (0 where a query may attend, the dtype's
    minimum elsewhere) of packed rows `prompt, chosen, rejected, padding`: every token attends causally to the
    tokens before it except that rejected tokens do not see chosen ones, and no query sees padding; rejected token
    `j` gets position `len(prompt) + j`, like chosen token `j`. Each completion thus sees exactly what it sees in
    its own `prompt + completion` row."""
    chosen_lengths = (segment_ids == CHOSEN).sum(-1, keepdim=True)
    positions = torch.arange(segment_ids.size(1), device=segment_ids.device).expand_as(segment_ids)
    position_ids = positions - chosen_lengths * (segment_ids == REJECTED)
    query, key = segment_ids.unsqueeze(2), segment_ids.unsqueeze(1)
    causal = torch.ones(segment_ids.size(1), segment_ids.size(1), dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (key != 0) & ~((query == REJECTED) & (key == CHOSEN))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return position_ids, mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def shared_prefix_logprobs(
    model,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_stats: bool = False,
) -> CompletionLogProbs:
    """Log-probs of the chosen and rejected tokens of packed rows `prompt, chosen, rejected` (`input_ids` and
    `segment_ids` `[B, T]`, see `shared_prefix_inputs`): the prompt runs once per pair, and each completion gets the
    log-probs it gets in its own `prompt + completion` row under `completion_logprobs`.

    Returns `[2B, T]` in the layout of the packed rows, chosen rows first, then rejected: row `b` masks the chosen
    tokens of pair `b`, row `B + b` its rejected ones. The model's attention must honour a custom 4D mask (eager and
    sdpa do). The first rejected token is predicted from the last prompt position; position 0 is never scored."""
    causal_lm = unwrap_causal_lm(model)
    implementation = causal_lm.config._attn_implementation
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"prefix sharing needs eager or sdpa attention (a custom 4D mask), not {implementation!r}.")
    position_ids, attention_mask = shared_prefix_inputs(segment_ids, causal_lm.dtype)
    hidden = last_hidden_state(model, input_ids, attention_mask, position_ids)
    # Each scored token is predicted by the position before it, except the first rejected token: by the last prompt
    # position, `len(chosen)` further back.
    positions = torch.arange(segment_ids.size(1), device=segment_ids.device).expand_as(segment_ids)
    first_rejected = (segment_ids == REJECTED) & (F.pad(segment_ids, (1, 0))[:, :-1] == CHOSEN)
    predictor = positions - 1 - (segment_ids == CHOSEN).sum(-1, keepdim=True) * first_rejected
    scored = ((segment_ids == CHOSEN) | (segment_ids == REJECTED)) & (predictor >= 0)
    rows = torch.arange(segment_ids.size(0), device=segment_ids.device).unsqueeze(1).expand_as(segment_ids)
    results = _head_logprobs(
        model, hidden[rows[scored], predictor[scored]], input_ids[scored], temperature, chunk_size, with_stats
    )
    chosen, rejected = scored & (segment_ids == CHOSEN), scored & (segment_ids == REJECTED)

    def split(values: torch.Tensor) -> torch.Tensor:
        packed = values.new_zeros(scored.shape).masked_scatter(scored, values)
        return torch.cat([packed * chosen, packed * rejected])

    mask = torch.cat([chosen, rejected]).float()
    if not with_stats:
        return CompletionLogProbs(split(results[0]), mask)
    logps, entropy, mean_logit, is_top1 = results
    return CompletionLogProbs(split(logps), mask, split(entropy), split(mean_logit), split(is_top1))
