"""Per-token log-probabilities of completion tokens, computed from the last hidden state in chunks.

The `[B, T, V]` logits are never built: only the positions that predict a completion token are projected through
the LM head, `chunk_size` tokens at a time, and when there are several chunks each is recomputed in the backward
pass instead of being stored (activation checkpointing), so memory for the head is `O(chunk_size * V)` whatever the
batch. The log-probs are those of the model's own logits by construction: on each model's first scored forward, a
probe checks that its head gives them, and a model whose forward does more than the head (and soft cap) is scored
from its own logits, computed at the scored positions only (`scored_forward`).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from .models import unwrap_causal_lm

DEFAULT_CHUNK_SIZE = 1024

logger = logging.getLogger(__name__)


@dataclass
class CompletionLogProbs:
    """Log-probs aligned with the input: `token_logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])` where
    `mask[b, t]` is 1 (a completion token), else 0. Statistics are detached and follow the same alignment."""

    token_logps: torch.Tensor  # [B, T] float32
    mask: torch.Tensor  # [B, T] float32
    entropy: torch.Tensor | None = None  # [B, T]
    mean_logit: torch.Tensor | None = None  # [B, T]
    is_top1: torch.Tensor | None = None  # [B, T] bool
    # The load-balancing loss of a Mixture-of-Experts model from this forward (scalar, with its gradient), when the
    # model's config asks for it (`output_router_logits`, see `models.router_aux_loss_weight`).
    aux_loss: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def map_tokens(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CompletionLogProbs:
        """The same log-probs with `fn` applied to each per-token tensor (e.g. a slice of rows or positions); the
        forward's `aux_loss` is kept as it is."""
        per_token = (field.name for field in fields(self) if field.name != "aux_loss")
        return replace(self, **{name: fn(getattr(self, name)) for name in per_token if getattr(self, name) is not None})

    @property
    def sum(self) -> torch.Tensor:
        return self.token_logps.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.lengths.clamp(min=1)


@dataclass
class ScoredForward:
    """What `scored_forward` returns: `token_logprobs`' tensors, and the forward's `aux_loss` (see
    `CompletionLogProbs.aux_loss`)."""

    values: tuple[torch.Tensor, ...]
    aux_loss: torch.Tensor | None


class _TargetLogProbs(torch.autograd.Function):
    """`(log softmax(logits)[targets], logsumexp(logits))` for logits `[n, V]` and targets `[n]`; only the log-probs
    carry a gradient. Its backward writes the logits' gradient, `g * (onehot(targets) - softmax(logits))`, into one
    `[n, V]` tensor in place, where autograd's would allocate and add one for the log-normaliser and one (a
    zero-filled scatter) for the gather: on a CPU each fresh `[n, V]` float32 tensor is page-faulted in, and these
    passes are most of the head's time outside its matrix products."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        log_norm = torch.logsumexp(logits, dim=-1)
        logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
        ctx.save_for_backward(logits, targets, log_norm)
        ctx.mark_non_differentiable(log_norm)
        return logps, log_norm

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, _grad_log_norm):
        logits, targets, log_norm = ctx.saved_tensors
        grad_logps = grad_logps.unsqueeze(-1)
        if torch.is_grad_enabled():  # `create_graph`: this gradient is differentiated again (TRPO's Fisher products)
            grad = -grad_logps * torch.softmax(logits, dim=-1)
            return grad.scatter_add(-1, targets.unsqueeze(-1), grad_logps), None
        grad = (logits - log_norm.unsqueeze(-1)).exp_().mul_(-grad_logps)
        return grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logps), None


def _chunk_logps(rows, targets, to_logits, temperature, with_stats, entropy_grad):
    logits = to_logits(rows).float()
    if temperature != 1.0:
        logits = logits / temperature
    logps, log_norm = _TargetLogProbs.apply(logits, targets)
    if not with_stats:
        return (logps,)
    # H = log Z - E_p[logit]
    if entropy_grad and torch.is_grad_enabled():  # an entropy bonus: its gradient runs through the normaliser too
        entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    else:
        with torch.no_grad():
            entropy = log_norm - (logits - log_norm.unsqueeze(-1)).exp_().mul_(logits).sum(-1)
    with torch.no_grad():
        mean_logit = logits.mean(-1)
        is_top1 = logits.argmax(-1) == targets
    return logps, entropy, mean_logit, is_top1


def _identity(rows: torch.Tensor) -> torch.Tensor:
    return rows


def token_logprobs(
    rows: torch.Tensor,
    to_logits: Callable[[torch.Tensor], torch.Tensor] | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_stats: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """`log softmax(to_logits(rows) / temperature)[targets]` for `rows` `[N, ...]`, `targets` `[N]`, chunk by chunk,
    in float32: `to_logits` maps `n` rows to their logits `[n, V]` (an LM head module on hidden states `[n, H]`,
    called as a module so a peft adapter on it applies and parameter-gathering hooks of ZeRO-3 fire), or is `None`
    when `rows` are logits `[N, V]` already (in the model's dtype).

    Returns `(logps,)` or, with `with_stats`, `(logps, entropy, mean_logit, is_top1)`, each `[N]`; only the log-probs
    carry a gradient, and the entropy too with `entropy_grad` (an entropy bonus in the loss: it keeps each chunk's
    probabilities for the backward pass)."""
    to_logits = to_logits or _identity
    # One chunk's logits are kept for the backward pass either way (recomputed there, or saved): only with several
    # does recomputing bound the memory, so a single chunk is not computed twice.
    recompute = rows.size(0) > chunk_size and torch.is_grad_enabled()
    pieces = []
    # `split`, not slicing: its backward writes the chunks' gradients into one `[N, ...]` tensor, where each slice's
    # backward would allocate (and add) a zero gradient of that size. No rows split into one empty chunk.
    for chunk, chunk_targets in zip(rows.split(chunk_size), targets.split(chunk_size)):
        args = (chunk, chunk_targets, to_logits, temperature, with_stats, entropy_grad)
        pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if recompute else _chunk_logps(*args))
    return tuple(torch.cat(parts) for parts in zip(*pieces))


def _decoder(causal_lm) -> torch.nn.Module:
    """The module whose output holds the last hidden state: `get_decoder()` (transformers' guess from attribute
    names), unless that is not a model of its own (the causal LM itself, or a linear layer named `decoder`), then
    the causal LM's one child that is. Whether its output is what the head reads is checked (`_probe_head`)."""
    decoder = causal_lm.get_decoder()
    if isinstance(decoder, PreTrainedModel) and decoder is not causal_lm:
        return decoder
    models = [child for child in causal_lm.children() if isinstance(child, PreTrainedModel)]
    return models[0] if len(models) == 1 else decoder


def _decoder_hidden(output) -> torch.Tensor | None:
    """The last hidden state in what the model's decoder returns (a model output, a tuple or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)


@contextmanager
def _forward_hooks(*module_hooks):
    """Registers `(module, hook)` forward hooks for the duration of the context."""
    handles = [module.register_forward_hook(hook) for module, hook in module_hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _capture_last_hidden_state(causal_lm):
    """Records the output of the model's decoder (its last hidden state, after the final norm)."""
    captured = {}

    def hook(_module, _args, output):
        captured["hidden"] = _decoder_hidden(output)

    with _forward_hooks((_decoder(causal_lm), hook)):
        yield captured


@contextmanager
def _eval_mode(model):
    """`model` in eval mode (no dropout) for the duration of the context; each module's mode is restored after."""
    modes = {module: module.training for module in model.modules()}
    model.train(False)
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _accepts_logits_to_keep(causal_lm) -> bool:
    return "logits_to_keep" in inspect.signature(type(causal_lm).forward).parameters


def _forward_kwargs(causal_lm, input_ids, attention_mask, position_ids, logits_to_keep=1) -> dict:
    """The forward's arguments: no cache, and the model's own logits only at `logits_to_keep` (the last `n`
    positions, or a `[K]` tensor of positions) where the model takes that argument."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if _accepts_logits_to_keep(causal_lm):
        kwargs["logits_to_keep"] = logits_to_keep
    return kwargs


def last_hidden_state(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Runs `model` (possibly wrapped by DDP / peft) through its own forward, so wrappers see the call, and returns
    the decoder's last hidden state `[B, T, H]`. The LM head runs on one position only."""
    causal_lm = unwrap_causal_lm(model)
    with _capture_last_hidden_state(causal_lm) as captured:
        model(**_forward_kwargs(causal_lm, input_ids, attention_mask, position_ids))
    return captured["hidden"]


def _head_logits(hidden: torch.Tensor, head: torch.nn.Module, softcap: float | None) -> torch.Tensor:
    """Logits `[n, V]` (float32) of hidden states `[n, H]` through the LM head, then the soft cap `softcap`."""
    return _soft_capped(head(hidden).float(), softcap)


def _soft_capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


@dataclass(frozen=True)
class _FastPath:
    """A causal LM whose own logits are its LM head's on its decoder's last hidden state, then this soft cap (`None`:
    none)."""

    softcap: float | None


# Per causal LM (the module inside any DDP / peft wrapping): its `_FastPath`, or `None` where the head does not give
# its own logits, as `_probe_head` found on its first `scored_forward`.
_FAST_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _same_logits(ours: torch.Tensor, own: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """Whether `ours` equal the model's `own` logits (`[B, V]` each) up to the rounding of the lowest-precision of
    `dtypes` (and `own`'s), relative to each row's largest logit: a scale or cap of the logits is a relative change
    even where the logits are small."""
    if torch.is_autocast_enabled(own.device.type):
        dtypes += (torch.get_autocast_dtype(own.device.type),)
    tolerance = max(1e-4, *(4 * torch.finfo(dtype).eps for dtype in (own.dtype, *dtypes)))
    own = own.float()
    return bool(((ours - own).abs() <= tolerance * own.abs().amax(-1, keepdim=True)).all())


def _probe_head(model, causal_lm, inputs: dict, row: int, position: int) -> _FastPath | None:
    """The fast path that gives `causal_lm`'s own logits, if one does: the LM head on its decoder's last hidden state,
    with the config's final soft cap or without (a model may not apply the one its text config names), against the
    logits of its own forward at one scored `position` of one `row` of `inputs` (a real token: at padding, some
    models' hidden states and logits are all zero, whatever transform follows the head). One forward of that row,
    without gradients and with dropout off; the comparison runs inside it, where a sharding wrapper (FSDP, ZeRO-3)
    has the head's weights gathered. `None` too when the decoder's output is no hidden state `[1, T, H]` the head
    reads."""
    probe = {name: None if value is None else value[row : row + 1] for name, value in inputs.items()}
    head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    found = {"fast_path": None}

    def capture(_module, _args, output):
        found["hidden"] = _decoder_hidden(output)

    def compare(_module, _args, output):
        hidden = found.get("hidden")
        if not (isinstance(hidden, torch.Tensor) and hidden.shape[:2] == probe["input_ids"].shape
                and hidden.size(-1) == getattr(head, "in_features", hidden.size(-1))):
            return
        own = output.logits[:, 0 if output.logits.size(1) == 1 else position]
        if not (own.amax(-1) > own.amin(-1)).all():  # equal logits would hide a scale of them
            return
        logits = head(hidden[:, position]).float()
        found["fast_path"] = next(
            (_FastPath(cap) for cap in dict.fromkeys((softcap, None))
             if _same_logits(_soft_capped(logits, cap), own, hidden.dtype)),
            None,
        )

    keep = torch.tensor([position], device=probe["input_ids"].device)
    with torch.no_grad(), _eval_mode(model), _forward_hooks((_decoder(causal_lm), capture), (causal_lm, compare)):
        model(**_forward_kwargs(causal_lm, **probe, logits_to_keep=keep))
    return found["fast_path"]


def _expose(results: dict):
    """A forward hook on the causal LM that returns the log-probs among its outputs: there they get the hooks a
    sharding wrapper puts on them (FSDP gathers the parameters again before their backward, where the head's chunks
    are recomputed)."""

    def hook(_module, _args, output):
        if hasattr(output, "hidden_states"):
            output.hidden_states = results["logps"]
        results["aux_loss"] = getattr(output, "aux_loss", None)
        return output

    return hook


def _head_scored_forward(model, causal_lm, fast_path: _FastPath, inputs: dict, select, **scoring) -> ScoredForward:
    """The fast path: `token_logprobs` of the hidden states `[N, H]` `select` picks from the decoder's last hidden
    state, through the LM head and `fast_path`'s soft cap, inside the forward. The model's own head runs on no
    position: `_probe_head` saw it take a tensor of positions, and an empty one costs nothing, where its last position
    (`logits_to_keep=1`, a strided slice) costs a `[B, V]` product, done as a batched product over B copies of the
    head's weight under `no_grad` on a CPU."""
    to_logits = partial(_head_logits, head=causal_lm.get_output_embeddings(), softcap=fast_path.softcap)
    results = {}

    def score(_module, _args, output):
        rows, targets = select(_decoder_hidden(output))
        results["logps"] = token_logprobs(rows, to_logits, targets, **scoring)

    with _forward_hooks((_decoder(causal_lm), score), (causal_lm, _expose(results))):
        model(**_forward_kwargs(causal_lm, **inputs, logits_to_keep=inputs["input_ids"].new_zeros(0)))
    return ScoredForward(results["logps"], results["aux_loss"])


def _selected(select, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `(rows, positions, targets)` (`[N]` each) that `select` picks from a `[B, T, ...]` tensor."""
    batch, length = input_ids.shape
    flat_index, targets = select(torch.arange(batch * length, device=input_ids.device).view(batch, length, 1))
    flat_index = flat_index.squeeze(-1)
    return flat_index.div(length, rounding_mode="floor"), flat_index % length, targets


def _own_logits_scored_forward(model, causal_lm, inputs: dict, select, **scoring) -> ScoredForward:
    """The own-logits path: `token_logprobs` of the rows `select` picks from the model's own output logits (whatever
    its forward does after the LM head). The model computes logits only at the positions some row needs,
    `[B, K, V]` in its dtype (all `T` positions where its forward has no `logits_to_keep`); the `N` selected rows are
    gathered from them once (one gradient write in the backward pass) and become float32 chunk by chunk."""
    rows, positions, targets = _selected(select, inputs["input_ids"])
    kept, kept_index = positions.unique(return_inverse=True)
    results = {}

    def score(_module, _args, output):
        logits = output.logits
        # A forward that computed every position (it has no `logits_to_keep`) is indexed by absolute position; where
        # it kept all `T`, `kept` is every position and both indexings agree.
        columns = positions if logits.size(1) == inputs["input_ids"].size(1) else kept_index
        results["logps"] = token_logprobs(logits[rows, columns], None, targets, **scoring)

    with _forward_hooks((causal_lm, score), (causal_lm, _expose(results))):
        # An empty `kept` (nothing to score) would ask for no positions at all, which not every model takes.
        model(**_forward_kwargs(causal_lm, **inputs, logits_to_keep=kept if kept.numel() else 1))
    return ScoredForward(results["logps"], results["aux_loss"])


def scored_forward(
    model, input_ids, attention_mask, position_ids, select, *, temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE, with_stats: bool = False, entropy_grad: bool = False,
) -> ScoredForward:
    """Runs `model`'s forward and `token_logprobs` of the `(rows [N, ...], targets [N])` that `select` picks from a
    `[B, T, ...]` tensor by its first two dims (it must only index those), as log-probs of the model's own logits;
    with the forward's load-balancing loss where the model computes one.

    Fast path: `select` picks hidden states `[N, H]` from the decoder's last hidden state, which go through the
    model's LM head (and final soft cap) chunk by chunk inside the forward: where a wrapper shards the parameters
    (FSDP, DeepSpeed ZeRO-3), the head's weights are gathered then, not after the forward returns. The first call for
    each causal LM checks that this gives the model's own logits (`_probe_head`); one whose forward does more (a
    logit scale, a multiplier on the hidden state, a head of several layers...) is scored from then on through its
    own output logits at the selected positions (`_own_logits_scored_forward`), with a warning."""
    causal_lm = unwrap_causal_lm(model)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    scoring = {"temperature": temperature, "chunk_size": chunk_size, "with_stats": with_stats,
               "entropy_grad": entropy_grad}
    if causal_lm not in _FAST_PATHS:
        rows, positions, _ = _selected(select, input_ids)
        # Probed on the first call whatever it scores, so that every process runs the same forwards (those of a
        # sharded model must pair up): at the first scored token, else at the first row's last position.
        row, position = (int(rows[0]), int(positions[0])) if len(rows) else (0, input_ids.size(1) - 1)
        _FAST_PATHS[causal_lm] = _probe_head(model, causal_lm, inputs, row, position)
        if _FAST_PATHS[causal_lm] is None:
            logger.warning(
                "%s's logits are not its LM head's (and final soft cap's) on its decoder's last hidden state: its "
                "log-probs are computed from its own output logits at the scored positions, a slower path than the "
                "chunked LM head.",
                type(causal_lm).__name__,
            )
    fast_path = _FAST_PATHS[causal_lm]
    if fast_path is not None:
        return _head_scored_forward(model, causal_lm, fast_path, inputs, select, **scoring)
    return _own_logits_scored_forward(model, causal_lm, inputs, select, **scoring)


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
    entropy_grad: bool = False,
) -> CompletionLogProbs:
    """Log-probs of the tokens where `completion_mask` is 1 (`[B, T]` each), under `model`.

    Only those positions go through the LM head. Position 0 is never scored (nothing predicts it)."""
    target_mask = completion_mask[:, 1:].bool()
    scored = scored_forward(
        model, input_ids, attention_mask, position_ids,
        lambda hidden: (hidden[:, :-1][target_mask], input_ids[:, 1:][target_mask]),
        temperature=temperature, chunk_size=chunk_size, with_stats=with_stats, entropy_grad=entropy_grad,
    )

    def aligned(values: torch.Tensor) -> torch.Tensor:
        shifted = values.new_zeros(target_mask.shape).masked_scatter(target_mask, values)
        return F.pad(shifted, (1, 0))

    mask = F.pad(target_mask, (1, 0)).float()
    if not with_stats:
        return CompletionLogProbs(aligned(scored.values[0]), mask, aux_loss=scored.aux_loss)
    logps, entropy, mean_logit, is_top1 = scored.values
    return CompletionLogProbs(aligned(logps), mask, aligned(entropy), aligned(mean_logit), aligned(is_top1),
                              aux_loss=scored.aux_loss)
