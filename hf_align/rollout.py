"""Rollouts for the online trainers (GRPO and its family, Online DPO, PPO, TRPO): groups of completions sampled from
the policy, and what each stage of the online loop adds to them (`online.OnlineTrainer.make_rollout`: sample → score →
estimate; the update is the Trainer's step on micro-batches of it).

A `Rollout` holds one row per completion, prompt-major (row `i * G + g` is the `g`-th completion of prompt `i` when
whole groups are generated together). Log-probs are computed with the position ids the model had while sampling
(left padding shifted), so a sampled token's log-prob under an unchanged policy is the one it was sampled with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from . import data
from .generation import Completions, SamplingConfig, generate_completions, stop_token_ids


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


# The fields that hold one value per completion token, `[N, C]` (`advantages` may also be `[N]`).
TOKEN_FIELDS = ("completion_ids", "completion_mask", "tool_mask", "old_logps", "ref_logps", "values", "advantages",
                "returns")


@dataclass
class Rollout:
    """A generation batch (or a micro-batch of it) on one process: one row per completion. Each stage of the online
    loop fills its fields: sampling the tokens, scoring `rewards_per_func`, estimation the log-probs and values the
    estimator declared and the `advantages` (and `returns`); the update reads them.

    Fields with a row dimension (tensors, lists, and the values of `log_columns` / `extras`) are sliced, shuffled and
    concatenated together; `num_items_in_batch` (a scalar over every process) is shared."""

    prompt_ids: torch.Tensor  # [N, P] left-padded, as the model saw them when sampling
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded
    # [N, C]: the completion up to and including its stop token, tool results included (attended to); all zero for a
    # truncated row with `mask_truncated_completions` (as in TRL, the row is then neither attended to nor scored).
    completion_mask: torch.Tensor
    # [N, C]: 1 on the tokens the policy sampled, 0 on tool / environment tokens (None: every token was sampled).
    tool_mask: torch.Tensor | None = None
    is_truncated: torch.Tensor | None = None  # [N] bool: no stop token within the completion budget
    completion_lengths: torch.Tensor | None = None  # [N] tokens as sampled, before any masking
    rows: list[dict] | None = None  # the dataset rows the completions answer (reward functions read their columns)
    completions: list | None = None  # the completions as reward functions get them (TRL's format)
    rewards_per_func: torch.Tensor | None = None  # [N, F]: each reward function's score (NaN: it did not apply)
    log_columns: dict[str, list] = field(default_factory=dict)  # the reward functions' `log_extra` columns
    old_logps: torch.Tensor | None = None  # [N, C] under the sampling policy
    ref_logps: torch.Tensor | None = None  # [N, C] under the reference
    values: torch.Tensor | None = None  # [N, C] the critic's, at sampling time
    advantages: torch.Tensor | None = None  # [N] per completion, or [N, C] per token
    returns: torch.Tensor | None = None  # [N, C] the critic's targets
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row tensors a trainer's stage adds
    num_items_in_batch: torch.Tensor | None = None  # loss tokens in the generation batch, every process

    @property
    def num_rows(self) -> int:
        return self.completion_ids.size(0)

    @property
    def loss_mask(self) -> torch.Tensor:
        """`[N, C]`: the tokens the loss, the KL and the statistics act on: the sampled ones of the completion."""
        if self.tool_mask is None:
            return self.completion_mask
        return self.completion_mask * self.tool_mask

    def replace(self, **changes) -> Rollout:
        return dataclasses.replace(self, **changes)

    def select(self, index: torch.Tensor | slice) -> Rollout:
        """The rows `index` (`[n]` long, in that order, or a slice)."""
        if not isinstance(index, slice):
            index = index.to(self.completion_ids.device)
        positions = range(self.num_rows)[index] if isinstance(index, slice) else index.tolist()

        def take(value):
            if torch.is_tensor(value):
                return value[index] if _has_rows(value, self.num_rows) else value
            if isinstance(value, list):
                return [value[i] for i in positions]
            if isinstance(value, dict):
                return {key: take(item) for key, item in value.items()}
            return value

        return Rollout(**{f.name: take(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def split(self, parts: int) -> list[Rollout]:
        """`parts` equal slices of the rows."""
        if self.num_rows % parts:
            raise ValueError(f"A rollout of {self.num_rows} rows cannot be split into {parts} equal parts.")
        size = self.num_rows // parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def shuffled(self, generator: torch.Generator | None = None) -> Rollout:
        """The rows in a random order."""
        return self.select(torch.randperm(self.num_rows, generator=generator))

    def padded_to_multiple(self, multiple: int, pad_token_id: int) -> Rollout:
        """Prompt tensors left-padded and completion tensors right-padded to a multiple of `multiple` tokens (TRL's
        `pad_to_multiple_of`): masked-out padding, so no number changes."""
        return self.padded_to(self.prompt_ids.size(1) + (-self.prompt_ids.size(1) % multiple),
                              self.completion_ids.size(1) + (-self.completion_ids.size(1) % multiple), pad_token_id)

    def padded_to(self, prompt_width: int, completion_width: int, pad_token_id: int) -> Rollout:
        """Prompt tensors left-padded to `prompt_width` columns, per-token completion tensors right-padded to
        `completion_width` (ids with `pad_token_id`, the rest with 0)."""

        def widened(name: str, value):
            fill = pad_token_id if name.endswith("_ids") else 0
            if name in ("prompt_ids", "prompt_mask"):
                return F.pad(value, (prompt_width - value.size(1), 0), value=fill)
            if name in TOKEN_FIELDS and value is not None and value.dim() == 2:
                return F.pad(value, (0, completion_width - value.size(1)), value=fill)
            return value

        return Rollout(**{f.name: widened(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)})

    @staticmethod
    def concat(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
        """The rows of rollouts sampled separately, one after the other: prompts left-padded and completions
        right-padded to the widest (masked-out padding). A `log_extra` column missing from a part is None on its
        rows."""
        prompt_width = max(r.prompt_ids.size(1) for r in rollouts)
        completion_width = max(r.completion_ids.size(1) for r in rollouts)
        parts = [r.padded_to(prompt_width, completion_width, pad_token_id) for r in rollouts]
        columns = sorted({name for part in parts for name in part.log_columns})
        joined = {}
        for f in dataclasses.fields(Rollout):
            values = [getattr(part, f.name) for part in parts]
            if f.name == "log_columns":
                joined[f.name] = {name: [v for part in parts for v in part.log_columns.get(name, [None] * part.num_rows)]
                                  for name in columns}
            elif f.name == "extras":
                joined[f.name] = {key: torch.cat([v[key] for v in values]) for key in values[0]}
            elif values[0] is None or f.name == "num_items_in_batch":
                joined[f.name] = values[0]
            elif torch.is_tensor(values[0]):
                joined[f.name] = torch.cat(values)
            else:
                joined[f.name] = [item for value in values for item in value]
        return Rollout(**joined)

    def state_dict(self) -> dict:
        """The tensors (what the update reads), for a checkpoint (`torch.load(weights_only=True)` reads it)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if torch.is_tensor(getattr(self, f.name))}
        return {**state, "extras": dict(self.extras)}

    @classmethod
    def from_state_dict(cls, state: dict) -> Rollout:
        return cls(**state)


def left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as left-padded ids and mask `[N, L]`: the reversed rows padded on the right, reversed back."""
    ids = data.pad([torch.tensor(row[::-1], dtype=torch.long) for row in rows], pad_token_id).flip(-1)
    mask = data.pad([torch.ones(len(row), dtype=torch.long) for row in rows], 0).flip(-1)
    return ids, mask


def sample_rollout(model, tokenizer, prompts: list, sampling: SamplingConfig, *, mask_truncated: bool = False,
                   device=None) -> tuple[Rollout, Completions]:
    """Samples `sampling.num_generations` completions per prompt (strings or message lists) from `model`.

    Returns the `Rollout` of their tokens on `device` (with `is_truncated`: no stop token within `max_new_tokens`,
    and `completion_lengths` as sampled) and the sampled `Completions` (texts, and ids and masks before any
    masking). With `mask_truncated`, a truncated completion's mask is all zero: it adds nothing to the loss (DAPO's
    overlong filtering)."""
    completions = generate_completions(model, tokenizer, prompts, sampling)
    rows = [ids for ids in completions.prompt_ids for _ in range(sampling.num_generations)]
    prompt_ids, prompt_mask = left_padded(rows, tokenizer.pad_token_id)
    lengths = completions.lengths
    last_token = completions.completion_ids.gather(1, (lengths.clamp(min=1) - 1)[:, None]).squeeze(1)
    is_truncated = ~torch.isin(last_token, torch.tensor(stop_token_ids(model, tokenizer))) | (lengths == 0)
    completion_mask = completions.completion_mask
    if mask_truncated:
        completion_mask = completion_mask * (~is_truncated)[:, None].long()
    rollout = Rollout(
        prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
        completion_ids=completions.completion_ids.to(device), completion_mask=completion_mask.to(device),
        is_truncated=is_truncated.to(device), completion_lengths=lengths.to(device),
    )
    return rollout, completions


def token_rollout(prompt_ids: list[list[int]], completion_ids: list[list[int]], *, is_truncated: list[bool],
                  pad_token_id: int, tool_mask: list[list[int]] | None = None, mask_truncated: bool = False,
                  device=None) -> Rollout:
    """The `Rollout` of completions given as token-id lists (multi-turn episodes, a `rollout_func`'s output): prompts
    left-padded, completions right-padded, the completion mask over every completion token (tool results included,
    they are attended to), `tool_mask` 1 on the tokens the policy sampled. With `mask_truncated`, a truncated
    completion's mask is all zero."""
    lengths = torch.tensor([len(ids) for ids in completion_ids])
    truncated = torch.tensor(is_truncated, dtype=torch.bool)
    completion_mask = data.pad([torch.ones(len(ids), dtype=torch.long) for ids in completion_ids], 0)
    if mask_truncated:
        completion_mask = completion_mask * (~truncated)[:, None].long()
    prompt_ids, prompt_mask = left_padded(prompt_ids, pad_token_id)
    tensors = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": data.pad([torch.tensor(ids, dtype=torch.long) for ids in completion_ids], pad_token_id),
        "completion_mask": completion_mask, "is_truncated": truncated, "completion_lengths": lengths,
    }
    if tool_mask is not None:
        tensors["tool_mask"] = data.pad([torch.tensor(mask, dtype=torch.long) for mask in tool_mask], 0)
    return Rollout(**{name: value.to(device) for name, value in tensors.items()})


def _has_rows(value, rows: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.size(0) == rows
