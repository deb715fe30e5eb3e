"""Rollouts for the online trainers (GRPO and its family, Online DPO, PPO): groups of completions sampled from the
policy, stored with what the loss needs, and served as several optimisation steps.

A rollout is a dict of tensors, one row per completion, prompt-major (row `i * G + g` is the `g`-th completion of
prompt `i` when whole groups are generated together):

    prompt_ids / prompt_mask          [N, P]  left-padded, as the model saw them when sampling
    completion_ids / completion_mask  [N, C]  right-padded; the mask covers each completion up to and including its
                                              stop token; all zero for a truncated row with
                                              `mask_truncated_completions` (as in TRL, the row is then neither
                                              attended to nor scored)
    old_logps, ref_logps              [N, C]  per-token log-probs under the sampling policy / the reference, when the
                                              loss needs them

Log-probs are computed with the position ids the model had while sampling (left padding shifted), so a sampled
token's log-prob under an unchanged policy is the one it was sampled with.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from . import data
from .generation import Completions, SamplingConfig, generate_completions, stop_token_ids
from .logprobs import CompletionLogProbs, completion_logprobs
from .packing import pack_sequences, packed_logprobs


class GroupSampler(Sampler[int]):
    """Dataset indexes for group sampling: each prompt `group_size` times in a row, `prompts_per_batch` prompts per
    generation batch, each generation batch yielded `repeat_count` times (once per optimisation step that reuses it),
    prompts in a random order drawn from `seed` (a new order each epoch) or in dataset order. A last generation batch
    with fewer than `prompts_per_batch` prompts is dropped, so every batch holds whole groups (TRL's RepeatSampler
    order: with several processes, each process's share of the batch is a contiguous slice of it)."""

    def __init__(self, num_rows: int, group_size: int, prompts_per_batch: int = 1, repeat_count: int = 1,
                 shuffle: bool = True, seed: int | None = None):
        self.num_rows, self.group_size = num_rows, group_size
        self.prompts_per_batch, self.repeat_count = prompts_per_batch, repeat_count
        self.shuffle = shuffle
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        self.initial_generator_state = self.generator.get_state()

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iteration yield epoch `epoch`'s order (Trainer calls this at every epoch's start, so a run
        resumed in a later epoch draws the order the uninterrupted run drew there)."""
        self.generator.set_state(self.initial_generator_state)
        for _ in range(epoch if self.shuffle else 0):
            torch.randperm(self.num_rows, generator=self.generator)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_rows, generator=self.generator).tolist() if self.shuffle else range(self.num_rows)
        order = list(order)
        for start in range(0, len(order) - self.prompts_per_batch + 1, self.prompts_per_batch):
            batch = order[start : start + self.prompts_per_batch]
            for _ in range(self.repeat_count):
                for index in batch:
                    yield from [index] * self.group_size

    def __len__(self) -> int:
        batches = self.num_rows // self.prompts_per_batch
        return batches * self.prompts_per_batch * self.group_size * self.repeat_count


def sample_rollout(model, tokenizer, prompts: list, sampling: SamplingConfig, *, mask_truncated: bool = False,
                   device=None) -> tuple[dict[str, torch.Tensor], Completions, torch.Tensor]:
    """Samples `sampling.num_generations` completions per prompt (strings or message lists) from `model`.

    Returns the rollout's `prompt_ids` / `prompt_mask` / `completion_ids` / `completion_mask` on `device`, the
    sampled `Completions` (texts, and ids and masks before any masking), and `is_truncated` `[N]` bool on `device`
    (no stop token within `max_new_tokens`). With `mask_truncated`, a truncated completion's mask is all zero: it
    adds nothing to the loss (DAPO's overlong filtering)."""
    completions = generate_completions(model, tokenizer, prompts, sampling)
    rows = [ids for ids in completions.prompt_ids for _ in range(sampling.num_generations)]
    # Left padding: pad the reversed rows on the right, then reverse back.
    prompt_ids = data.pad([torch.tensor(ids[::-1]) for ids in rows], tokenizer.pad_token_id).flip(-1)
    prompt_mask = data.pad([torch.ones(len(ids), dtype=torch.long) for ids in rows], 0).flip(-1)
    lengths = completions.lengths
    last_token = completions.completion_ids.gather(1, (lengths.clamp(min=1) - 1)[:, None]).squeeze(1)
    is_truncated = ~torch.isin(last_token, torch.tensor(stop_token_ids(model, tokenizer))) | (lengths == 0)
    completion_mask = completions.completion_mask
    if mask_truncated:
        completion_mask = completion_mask * (~is_truncated)[:, None].long()
    rollout = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completions.completion_ids, "completion_mask": completion_mask,
    }
    return {key: value.to(device) for key, value in rollout.items()}, completions, is_truncated.to(device)


def completion_token_logprobs(model, rollout: dict, *, temperature: float = 1.0, with_stats: bool = False,
                              entropy_grad: bool = False, batch_size: int | None = None, prefix_sharing: bool = False,
                              padding_free: bool = False) -> CompletionLogProbs:
    """Per-token log-probs of the rollout's completions under `model`, aligned with `completion_ids` (`[N, C]`;
    entropy etc. with `with_stats`, the entropy with its gradient with `entropy_grad`), `batch_size` rows at a time (all at once when None). Sampling logits are divided
    by `temperature`, so are these (TRL's convention).

    With `prefix_sharing`, the rows of a batch with the same prompt (a group's samples) are packed into one sequence
    that holds the prompt once; with `padding_free`, the batch's sequences go into one row (`packing`). Either way
    each token's log-prob is the one it gets in its own row."""
    batch_size = batch_size or rollout["completion_ids"].size(0)
    pieces = []
    for start in range(0, rollout["completion_ids"].size(0), batch_size):
        part = {key: rollout[key][start : start + batch_size] for key in ROLLOUT_TOKENS}
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


ROLLOUT_TOKENS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


def _rollout_row_logprobs(model, rollout, temperature, with_stats, entropy_grad) -> CompletionLogProbs:
    """Each row `prompt + completion` on its own, with the position ids it was sampled with (left padding)."""
    input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
    attention_mask = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], dim=1)
    score_mask = torch.cat([torch.zeros_like(rollout["prompt_mask"]), rollout["completion_mask"]], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = completion_logprobs(model, input_ids, attention_mask, score_mask, position_ids=position_ids,
                              temperature=temperature, with_stats=with_stats, entropy_grad=entropy_grad)
    prompt_length = rollout["prompt_ids"].size(1)
    return out.map_tokens(lambda values: values[:, prompt_length:])


def _packed_rollout_logprobs(model, rollout, temperature, with_stats, entropy_grad, prefix_sharing,
                             padding_free) -> CompletionLogProbs:
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(rollout["prompt_ids"], rollout["prompt_mask"])]
    completions = [
        ids[mask.bool()].tolist() for ids, mask in zip(rollout["completion_ids"], rollout["completion_mask"])
    ]
    groups: dict[tuple, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt) if prefix_sharing else (row,), []).append(row)
    sequences = [(prompts[rows[0]], [completions[row] for row in rows], rows) for rows in groups.values()]
    device = rollout["completion_ids"].device
    packed = {key: value.to(device) for key, value in
              pack_sequences(sequences, pad_token_id=0, padding_free=padding_free).items()}
    return packed_logprobs(
        model, packed["input_ids"], packed["sequence_ids"], packed["completion_index"],
        num_completions=len(prompts), width=rollout["completion_ids"].size(1), temperature=temperature,
        with_stats=with_stats, entropy_grad=entropy_grad,
    )


def split_rollout(rollout: dict, parts: int) -> list[dict]:
    """`parts` equal slices of the rollout's rows (tensors with a row dimension; scalars are shared)."""
    rows = rollout["completion_ids"].size(0)
    if rows % parts:
        raise ValueError(f"A rollout of {rows} rows cannot be split into {parts} equal parts.")
    size = rows // parts
    return [
        {key: value[i * size : (i + 1) * size] if _has_rows(value, rows) else value for key, value in rollout.items()}
        for i in range(parts)
    ]


def shuffle_rollout(rollout: dict, generator: torch.Generator | None = None) -> dict:
    """The rollout's rows in a random order (the same permutation for every tensor)."""
    order = torch.randperm(rollout["completion_ids"].size(0), generator=generator)
    return select_rollout_rows(rollout, order)


def select_rollout_rows(rollout: dict, index: torch.Tensor) -> dict:
    """The rollout's rows `index` (`[n]` long), in that order (scalars are shared)."""
    rows = rollout["completion_ids"].size(0)
    index = index.to(rollout["completion_ids"].device)
    return {key: value[index] if _has_rows(value, rows) else value for key, value in rollout.items()}


def concat_rollouts(rollouts: list[dict], pad_token_id: int) -> dict:
    """The rows of rollouts sampled separately (each a dict of per-row tensors with the same keys), one after the
    other: prompts left-padded and completions right-padded to the widest (masked-out padding)."""
    prompt_width = max(rollout["prompt_ids"].size(1) for rollout in rollouts)
    completion_width = max(rollout["completion_ids"].size(1) for rollout in rollouts)

    def widened(key: str, value: torch.Tensor) -> torch.Tensor:
        fill = pad_token_id if key.endswith("_ids") else 0
        if key.startswith("prompt_"):
            return F.pad(value, (prompt_width - value.size(1), 0), value=fill)
        if value.dim() == 2:  # completion ids and masks, per-token log-probs
            return F.pad(value, (0, completion_width - value.size(1)), value=fill)
        return value

    return {key: torch.cat([widened(key, rollout[key]) for rollout in rollouts]) for key in rollouts[0]}


def _has_rows(value, rows: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.size(0) == rows
