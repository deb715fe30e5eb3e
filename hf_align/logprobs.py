"""Per-token log-probabilities of completion tokens, computed from the last hidden state in chunks.

The `[B, T, V]` logits are never built: only the positions that predict a completion token are projected through
the LM head, `chunk_size` tokens at a time, and when there are several chunks each is recomputed in the backward
pass instead of being stored (activation checkpointing), so memory for the head is `O(chunk_size * V)` whatever the
batch.
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


def _chunk_logps(hidden, targets, head, temperature, softcap, with_stats):
    logits = head(hidden).float()
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
    head: torch.nn.Module,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """`log softmax(head(hidden))[targets]` for `hidden` `[N, H]`, `targets` `[N]`, chunk by chunk. `head` is called
    as a module (a peft adapter on it applies; parameter-gathering hooks of ZeRO-3 fire).

    Returns `(logps,)` or, with `with_stats`, `(logps, entropy, mean_logit, is_top1)`, each `[N]`."""
    # One chunk's logits are kept for the backward pass either way (recomputed there, or saved): only with several
    # does recomputing bound the memory, so a single chunk is not computed twice.
    recompute = hidden.size(0) > chunk_size and torch.is_grad_enabled() and (
        hidden.requires_grad or any(param.requires_grad for param in head.parameters())
    )
    pieces = []
    for start in range(0, hidden.size(0), chunk_size):
        args = (hidden[start : start + chunk_size], targets[start : start + chunk_size], head)
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


def _decoder_hidden(output) -> torch.Tensor:
    """The last hidden state in what the model's decoder returns (a tuple or a model output)."""
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


@contextmanager
def _capture_last_hidden_state(causal_lm):
    """Records the output of the model's decoder (its last hidden state, after the final norm)."""
    captured = {}

    def hook(_module, _args, output):
        captured["hidden"] = _decoder_hidden(output)

    handle = causal_lm.get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _accepts_logits_to_keep(causal_lm) -> bool:
    return "logits_to_keep" in inspect.signature(type(causal_lm).forward).parameters


def _forward_kwargs(causal_lm, input_ids, attention_mask, position_ids) -> dict:
    """The forward's arguments: no cache, and the model's own LM head on one position only."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if _accepts_logits_to_keep(causal_lm):
        kwargs["logits_to_keep"] = 1
    return kwargs


def last_hidden_state(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Runs `model` (possibly wrapped by DDP / peft) through its own forward, so wrappers see the call, and returns
    the decoder's last hidden state `[B, T, H]`. The LM head runs on one position only."""
    causal_lm = unwrap_causal_lm(model)
    with _capture_last_hidden_state(causal_lm) as captured:
        model(**_forward_kwargs(causal_lm, input_ids, attention_mask, position_ids))
    return captured["hidden"]


def scored_forward(
    model, input_ids, attention_mask, position_ids, select, *, temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE, with_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Runs `model`'s forward and `token_logprobs` of the `(hidden [N, H], targets [N])` that `select(last hidden
    state)` picks, through the model's LM head and logit softcap, inside that forward: where a wrapper shards the
    parameters (FSDP, DeepSpeed ZeRO-3), the head's weights are gathered then, not after the forward returns."""
    causal_lm = unwrap_causal_lm(model)
    head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    results = {}

    def score(_module, _args, output):
        scored_hidden, targets = select(_decoder_hidden(output))
        results["logps"] = token_logprobs(scored_hidden, head, targets, temperature=temperature, softcap=softcap,
                                          chunk_size=chunk_size, with_stats=with_stats)

    def expose(_module, _args, output):
        # Returned among the model's outputs, the log-probs get the hooks a sharding wrapper puts on them (FSDP
        # gathers the parameters again before their backward, where the head's chunks are recomputed).
        if hasattr(output, "hidden_states"):
            output.hidden_states = results["logps"]
        return output

    handles = [causal_lm.get_decoder().register_forward_hook(score), causal_lm.register_forward_hook(expose)]
    try:
        model(**_forward_kwargs(causal_lm, input_ids, attention_mask, position_ids))
    finally:
        for handle in handles:
            handle.remove()
    return results["logps"]


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
    target_mask = completion_mask[:, 1:].bool()
    results = scored_forward(
        model, input_ids, attention_mask, position_ids,
        lambda hidden: (hidden[:, :-1][target_mask], input_ids[:, 1:][target_mask]),
        temperature=temperature, chunk_size=chunk_size, with_stats=with_stats,
    )

    def aligned(values: torch.Tensor) -> torch.Tensor:
        shifted = values.new_zeros(target_mask.shape).masked_scatter(target_mask, values)
        return F.pad(shifted, (1, 0))

    mask = F.pad(target_mask, (1, 0)).float()
    if not with_stats:
        return CompletionLogProbs(aligned(results[0]), mask)
    logps, entropy, mean_logit, is_top1 = results
    return CompletionLogProbs(aligned(logps), mask, aligned(entropy), aligned(mean_logit), aligned(is_top1))
