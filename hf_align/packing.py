"""Packed rows: a prompt run once for all its completions (prefix sharing), several sequences in one row
(padding-free), or both, with exactly the log-probs each completion gets in its own `prompt + completion` row.

A *sequence* is one prompt and the completions that continue it: DPO's pair (chosen and rejected), GRPO's group of
G samples, or one `prompt + completion` on its own. Each token of a packed batch is described by

- `sequence_ids` `[R, T]`: which sequence of its row it belongs to (1, 2, ...; 0 on padding), and
- `completion_index` `[R, T]`: the completion it belongs to, numbered in the caller's output order (`-1` on prompt
  tokens and padding).

A completion token attends causally to its own prompt and to the earlier tokens of its own completion, nothing else;
its position id is `len(prompt) + j` for its `j`-th token, as in its own row. The model's attention must honour a
custom 4D mask (eager and sdpa do); the mask is dense, `[R, 1, T, T]`, so attention costs grow with the square of
the packed row's length, while every other layer runs only on real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import data
from .logprobs import DEFAULT_CHUNK_SIZE, CompletionLogProbs, scored_forward
from .models import unwrap_causal_lm

PackedSequence = tuple[Sequence[int], Sequence[Sequence[int]], Sequence[int]]  # prompt, completions, output rows


def pack_sequences(
    sequences: Sequence[PackedSequence],
    pad_token_id: int,
    *,
    padding_free: bool = False,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Packs `(prompt_ids, [completion_ids, ...], [output_row, ...])` triples: one row per sequence, right-padded, or
    with `padding_free` every sequence in one row `[1, N]`. Returns `input_ids`, `attention_mask` (1 on real tokens),
    `sequence_ids`, `completion_index` and `completion_lengths` `[n]` (tokens of completion `i`, for the `n` output
    rows the triples name)."""
    num_completions = 1 + max((row for _, _, rows in sequences for row in rows), default=-1)
    completion_lengths = torch.zeros(num_completions, dtype=torch.long)
    ids, sequence_ids, completion_index = [], [], []
    for number, (prompt, completions, rows) in enumerate(sequences, start=1):
        ids.append(list(prompt) + [token for completion in completions for token in completion])
        completion_index.append([-1] * len(prompt) + [row for row, c in zip(rows, completions) for _ in c])
        sequence_ids.append([number if padding_free else 1] * len(ids[-1]))
        for row, completion in zip(rows, completions):
            completion_lengths[row] = len(completion)
    if padding_free:
        ids, sequence_ids, completion_index = ([sum(rows, [])] for rows in (ids, sequence_ids, completion_index))
    return {
        "input_ids": data.pad([torch.tensor(row) for row in ids], pad_token_id, pad_to_multiple_of),
        "attention_mask": data.pad([torch.ones(len(row), dtype=torch.long) for row in ids], 0, pad_to_multiple_of),
        "sequence_ids": data.pad([torch.tensor(row) for row in sequence_ids], 0, pad_to_multiple_of),
        "completion_index": data.pad([torch.tensor(row) for row in completion_index], -1, pad_to_multiple_of),
        "completion_lengths": completion_lengths,
    }


def check_prefix_truncation(prefix_sharing: bool, max_length: int | None, truncation_mode: str) -> None:
    """Sharing a prompt among completions truncated to `max_length` needs the prompt kept whole (`keep_start`):
    `keep_end` would cut it differently for each completion."""
    if prefix_sharing and max_length is not None and truncation_mode != "keep_start":
        raise ValueError("prefix sharing needs truncation_mode='keep_start': 'keep_end' would cut the shared prompt "
                         "differently for each of its completions.")


def pack_prompt_completions(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[Sequence[int]]],
    pad_token_id: int,
    max_length: int | None,
    truncation_mode: str,
    *,
    prefix_sharing: bool,
    padding_free: bool,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """`pack_sequences` of `completions[i]` (the completions of `prompts[i]`), completion `k` of prompt `i` as output
    row `i + k * len(prompts)` (DPO's chosen rows then rejected, KTO's rows then their KL completions). Each
    completion is truncated with its prompt as in its own row; with `prefix_sharing` a prompt's completions follow it
    in one sequence, else each forms its own."""
    check_prefix_truncation(prefix_sharing, max_length, truncation_mode)
    sequences = []
    for i, (prompt, row) in enumerate(zip(prompts, completions)):
        cut = [data.truncate_prompt_completion(prompt, c, max_length, truncation_mode) for c in row]
        outputs = [i + k * len(prompts) for k in range(len(row))]
        if prefix_sharing:
            sequences.append((cut[0][0], [c for _, c in cut], outputs))
        else:
            sequences += [(p, [c], [output]) for (p, c), output in zip(cut, outputs)]
    return pack_sequences(sequences, pad_token_id, padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of)


def _run_starts(labels: torch.Tensor) -> torch.Tensor:
    """For each position of `[R, T]`, the index where its run of equal consecutive `labels` starts."""
    positions = torch.arange(labels.size(1), device=labels.device).expand_as(labels)
    starts = labels != F.pad(labels, (1, 0), value=-2)[:, :-1]
    return torch.where(starts, positions, torch.zeros_like(positions)).cummax(-1).values


class PackedLayout:
    """Where every token of a packed batch sits: its sequence's start and prompt length, its completion's start,
    and the position id the token has in its own unpacked row."""

    def __init__(self, sequence_ids: torch.Tensor, completion_index: torch.Tensor):
        self.sequence_ids, self.completion_index = sequence_ids, completion_index
        self.positions = torch.arange(sequence_ids.size(1), device=sequence_ids.device).expand_as(sequence_ids)
        self.is_prompt = (sequence_ids > 0) & (completion_index < 0)
        self.sequence_start = _run_starts(sequence_ids)
        # Runs of equal (sequence, completion) labels; completion indices are >= -1, so the pair packs into one label.
        self.completion_start = _run_starts(sequence_ids * (completion_index.max() + 2) + completion_index + 1)
        prompt_counts = torch.zeros(sequence_ids.size(0), int(sequence_ids.max()) + 1, dtype=torch.long,
                                    device=sequence_ids.device)
        prompt_counts.scatter_add_(1, sequence_ids, self.is_prompt.long())
        self.prompt_length = prompt_counts.gather(1, sequence_ids)
        self.offset = self.positions - self.completion_start  # a completion token's index within its completion
        self.position_ids = torch.where(
            self.is_prompt, self.positions - self.sequence_start, self.prompt_length + self.offset
        ) * (sequence_ids > 0)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask `[R, 1, T, T]`: 0 where a query may attend, the dtype's minimum elsewhere. Padding queries
        attend to themselves only, so no row is fully masked (a NaN there would reach the gradients)."""
        sequence, completion = self.sequence_ids, self.completion_index
        size = sequence.size(1)
        causal = torch.ones(size, size, dtype=torch.bool, device=sequence.device).tril()
        same_sequence = (sequence.unsqueeze(2) == sequence.unsqueeze(1)) & (sequence.unsqueeze(1) > 0)
        visible_key = self.is_prompt.unsqueeze(1) | (completion.unsqueeze(2) == completion.unsqueeze(1))
        allowed = causal & same_sequence & visible_key
        allowed |= torch.eye(size, dtype=torch.bool, device=sequence.device) & (sequence == 0).unsqueeze(2)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=sequence.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def predictors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The position whose hidden state predicts each token, and which tokens are scored: a completion's first
        token is predicted by its prompt's last token (unscored when the prompt is empty), any other by the token
        before it."""
        first = self.offset == 0
        predictor = torch.where(first, self.sequence_start + self.prompt_length - 1, self.positions - 1)
        scored = (self.completion_index >= 0) & (predictor >= self.sequence_start) & ~(first & (self.prompt_length == 0))
        return predictor, scored


def packed_logprobs(
    model,
    input_ids: torch.Tensor,
    sequence_ids: torch.Tensor,
    completion_index: torch.Tensor,
    *,
    num_completions: int,
    width: int,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_stats: bool = False,
    entropy_grad: bool = False,
) -> CompletionLogProbs:
    """Log-probs of the completion tokens of a packed batch (`[R, T]` each, see `pack_sequences`), returned per
    completion: `[num_completions, width]`, token `j` of completion `i` at `[i, j]`, masked where it is scored. Each
    value equals what `logprobs.completion_logprobs` gives for that token in its own `prompt + completion` row."""
    causal_lm = unwrap_causal_lm(model)
    implementation = causal_lm.config._attn_implementation
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"packed rows need eager or sdpa attention (a custom 4D mask), not {implementation!r}.")
    layout = PackedLayout(sequence_ids, completion_index)
    predictor, scored = layout.predictors()
    rows = torch.arange(input_ids.size(0), device=input_ids.device).unsqueeze(1).expand_as(input_ids)
    forward = scored_forward(
        model, input_ids, layout.attention_mask(causal_lm.dtype), layout.position_ids,
        lambda hidden: (hidden[rows[scored], predictor[scored]], input_ids[scored]),
        temperature=temperature, chunk_size=chunk_size, with_stats=with_stats, entropy_grad=entropy_grad,
    )
    index = (completion_index[scored], layout.offset[scored])

    def per_completion(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(num_completions, width).index_put(index, values)

    logps, *stats = forward.values
    return CompletionLogProbs(per_completion(logps), per_completion(torch.ones_like(logps)),
                              *(per_completion(values) for values in stats), aux_loss=forward.aux_loss)


def batch_token_count(batch: dict, num_completions: int | None = None) -> torch.Tensor:
    """Tokens of a collated batch as unpacked `prompt + completion` rows hold them (the `num_tokens` TRL logs): in a
    packed batch each prompt token counts once per completion of its sequence. With `num_completions`, only the
    completions numbered below it count (KTO's rows, not their KL completions)."""
    if "completion_index" not in batch:
        return batch["attention_mask"].sum()
    sequence_ids, completion_index = batch["sequence_ids"], batch["completion_index"]
    layout = PackedLayout(sequence_ids, completion_index)
    counted = (completion_index >= 0) & (completion_index < (num_completions or len(batch["completion_lengths"])))
    completions = torch.zeros(sequence_ids.size(0), int(sequence_ids.max()) + 1, dtype=torch.long,
                              device=sequence_ids.device).scatter_add_(1, sequence_ids, (counted & (layout.offset == 0)).long())
    per_token = torch.where(layout.is_prompt, completions.gather(1, sequence_ids), counted.long())
    return per_token.sum()
