"""Machinery shared by the pairwise preference trainers (DPO, IPO, ORPO, SimPO, step-wise DPO, ...): preparing
`prompt`/`chosen`/`rejected` datasets and collating chosen and rejected sequences into one batch."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch

from . import data


def prepare_preference_dataset(dataset, tokenizer, name: str, args, keep_columns: Sequence[str] = ()):
    """Validates and tokenizes a pairwise dataset as TRL does: an implicit prompt is extracted from `chosen` and
    `rejected`, every row is checked (`data.DataError` names the row and column), `prompt_ids`/`chosen_ids`/
    `rejected_ids` are TRL's token ids, and rows whose prompt alone fills `args.max_length` are dropped and counted.
    `keep_columns` that exist (precomputed values) are kept. Returns `(dataset, dropped)`."""
    dataset = data.extract_implicit_prompt(dataset, name, args.dataset_num_proc)
    keep = [column for column in keep_columns if column in (dataset.column_names or [])]
    dataset = data.tokenize_dataset(
        dataset, tokenizer, name, text_columns=("prompt", "chosen", "rejected"),
        completion_columns=("chosen", "rejected"), keep_columns=keep, num_proc=args.dataset_num_proc,
    )
    return data.drop_overlong_prompts(dataset, name, args.max_length, args.truncation_mode, args.dataset_num_proc)


@dataclass
class DataCollatorForPreference:
    """Pads `prompt_ids` + `chosen_ids` and `prompt_ids` + `rejected_ids` into one batch `[2B, T]`: chosen rows
    first, then rejected. Each sequence is truncated to `max_length` before padding. Precomputed
    `ref_chosen_logps` / `ref_rejected_logps` pass through as `[B]` tensors."""

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [example["prompt_ids"] for example in examples]
        completions = [example["chosen_ids"] for example in examples] + [example["rejected_ids"] for example in examples]
        batch = data.collate_prompt_completions(
            prompts + prompts, completions, self.pad_token_id, self.max_length, self.truncation_mode,
            self.pad_to_multiple_of,
        )
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch


