"""The log-probs every trainer computes, in one place: of a collated batch (`batch_logprobs`: SFT-style rows, preference
pairs, KTO's completions, padded or packed) and of a rollout's completions (`completion_token_logprobs`: the online
trainers, with the position ids each row was sampled with). Both choose the layout (padded rows, or packed with
`packing`: a prompt once for its completions, or several sequences in one row) and score through the chunked LM head
(`logprobs`); every token gets the log-prob it gets in its own `prompt + completion` row."""

from __future__ import annotations

import torch

from .logprobs import DEFAULT_CHUNK_SIZE, CompletionLogProbs, completion_logprobs
from .packing import pack_sequences, packed_logprobs
from .rollout import Rollout


def batch_logprobs(model, batch: dict, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   with_stats: bool = False) -> CompletionLogProbs:
    """Completion log-probs of a collated batch: a packed one (`completion_index`, from `pack_sequences`) gives one row
    per completion (`packed_logprobs`), a padded one (`input_ids` / `attention_mask` / `completion_mask`, and
    `position_ids` when given) its rows."""
    if "completion_index" in batch:
        lengths = batch["completion_lengths"]
        return packed_logprobs(
            model, batch["input_ids"], batch["sequence_ids"], batch["completion_index"], num_completions=len(lengths),
            width=int(lengths.max()), temperature=temperature, chunk_size=chunk_size, with_stats=with_stats,
        )
    return completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                               position_ids=batch.get("position_ids"), temperature=temperature, chunk_size=chunk_size,
                               with_stats=with_stats)


def completion_token_logprobs(model, rollout: Rollout, *, temperature: float = 1.0, with_stats: bool = False,
                              entropy_grad: bool = False, batch_size: int | None = None, prefix_sharing: bool = False,
                              padding_free: bool = False) -> CompletionLogProbs:
    """Per-token log-probs of the rollout's completions under `model`, aligned with `completion_ids` (`[N, C]`;
    entropy etc. with `with_stats`, the entropy with its gradient with `entropy_grad`), `batch_size` rows at a time (all at once when None). Sampling logits are divided
    by `temperature`, so are these (TRL's convention).

    With `prefix_sharing`, the rows of a batch with the same prompt (a group's samples) are packed into one sequence
    that holds the prompt once; with `padding_free`, the batch's sequences go into one row (`packing`). Either way
    each token's log-prob is the one it gets in its own row."""
    batch_size = batch_size or rollout.num_rows
    pieces = []
    for start in range(0, rollout.num_rows, batch_size):
        part = rollout.select(slice(start, start + batch_size))
        if prefix_sharing or padding_free:
            pieces.append(_packed_rollout_logprobs(model, part, temperature, with_stats, entropy_grad, prefix_sharing,
                                                   padding_free))
        else:
            pieces.append(_rollout_row_logprobs(model, part, temperature, with_stats, entropy_grad))
    fields = ("token_logps", "mask", "entropy", "mean_logit", "is_top1") if with_stats else ("token_logps", "mask")
    # A Mixture-of-Experts model's load-balancing loss: the mean of the forwards' (TRL's).
    aux_loss = torch.stack([p.aux_loss for p in pieces]).mean() if pieces[0].aux_loss is not None else None
    return CompletionLogProbs(**{name: torch.cat([getattr(p, name) for p in pieces]) for name in fields},
                              aux_loss=aux_loss)


def _rollout_row_logprobs(model, rollout, temperature, with_stats, entropy_grad) -> CompletionLogProbs:
    """Each row `prompt + completion` on its own, with the position ids it was sampled with (left padding)."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    score_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = completion_logprobs(model, input_ids, attention_mask, score_mask, position_ids=position_ids,
                              temperature=temperature, with_stats=with_stats, entropy_grad=entropy_grad)
    prompt_length = rollout.prompt_ids.size(1)
    return out.map_tokens(lambda values: values[:, prompt_length:])


def _packed_rollout_logprobs(model, rollout, temperature, with_stats, entropy_grad, prefix_sharing,
                             padding_free) -> CompletionLogProbs:
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.prompt_ids, rollout.prompt_mask)]
    completions = [
        ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)
    ]
    groups: dict[tuple, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt) if prefix_sharing else (row,), []).append(row)
    sequences = [(prompts[rows[0]], [completions[row] for row in rows], rows) for rows in groups.values()]
    device = rollout.completion_ids.device
    packed = {key: value.to(device) for key, value in
              pack_sequences(sequences, pad_token_id=0, padding_free=padding_free).items()}
    return packed_logprobs(
        model, packed["input_ids"], packed["sequence_ids"], packed["completion_index"],
        num_completions=len(prompts), width=rollout.completion_ids.size(1), temperature=temperature,
        with_stats=with_stats, entropy_grad=entropy_grad,
    )
