"""Machinery shared by the pairwise preference trainers (DPO, IPO, ORPO, SimPO, step-wise DPO, ...): preparing
`prompt`/`chosen`/`rejected` datasets and collating chosen and rejected sequences into one batch; and the base of the
trainers that need no reference model (`ReferenceFreePreferenceTrainer`)."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch

from . import data, packing
from .trainer import AlignTrainer


def prepare_preference_dataset(
    dataset, tokenizer, name: str, args, keep_columns: Sequence[str] = (), add_bos_eos: bool = False
):
    """Validates and tokenizes a pairwise dataset as TRL does: an implicit prompt is extracted from `chosen` and
    `rejected`, every row is checked (`data.DataError` names the row and column), `prompt_ids`/`chosen_ids`/
    `rejected_ids` are TRL's token ids, and rows whose prompt alone fills `args.max_length` are dropped and counted.
    `keep_columns` that exist (precomputed values) are kept. `add_bos_eos` gives the ids of TRL's ORPO and CPO
    trainers instead of its DPO trainer's (see `add_bos_eos_ids`). Returns `(dataset, dropped)`."""
    dataset = data.extract_implicit_prompt(dataset, name, args.dataset_num_proc)
    keep = [column for column in keep_columns if column in (dataset.column_names or [])]
    dataset = data.tokenize_dataset(
        dataset, tokenizer, name, text_columns=("prompt", "chosen", "rejected"),
        completion_columns=("chosen", "rejected"), keep_columns=keep, num_proc=args.dataset_num_proc,
    )
    if add_bos_eos:
        dataset = add_bos_eos_ids(dataset, tokenizer, name, args.dataset_num_proc)
    return data.drop_overlong_prompts(dataset, name, args.max_length, args.truncation_mode, args.dataset_num_proc)


def add_bos_eos_ids(dataset, tokenizer, name: str, num_proc=None):
    """TRL's ORPO and CPO trainers (trl.experimental) put the tokenizer's BOS id in front of every prompt that does not
    start with it, and its EOS id after every completion that does not end with it, conversational data included: a
    ChatML answer then ends `<|im_end|>`, `\n`, EOS. Applied to `prompt_ids`/`chosen_ids`/`rejected_ids`, this gives
    their ids. (TRL splits each prompt+answer on its own; where a BPE merge across that boundary happens for one
    completion only, TRL's chosen and rejected prompts differ by a token, while here they share one prompt.)"""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def add(row):
        out = {"prompt_ids": row["prompt_ids"]}
        if bos is not None and row["prompt_ids"][:1] != [bos]:
            out["prompt_ids"] = [bos] + row["prompt_ids"]
        for column in ("chosen_ids", "rejected_ids"):
            ids = row[column]
            out[column] = ids + [eos] if eos is not None and ids[-1:] != [eos] else ids
        return out

    return dataset.map(add, **data.map_kwargs(dataset, f"Adding BOS/EOS to {name}", num_proc))


@dataclass
class DataCollatorForPreference:
    """Pads `prompt_ids` + `chosen_ids` and `prompt_ids` + `rejected_ids` into one batch `[2B, T]`: chosen rows
    first, then rejected. Each sequence is truncated to `max_length` before padding. Precomputed
    `ref_chosen_logps` / `ref_rejected_logps` pass through as `[B]` tensors.

    With `prefix_sharing` or `padding_free`, the batch is packed instead (`packing.pack_sequences`, scored by
    `packing.batch_logprobs`): with `prefix_sharing` each pair is one sequence `prompt, chosen, rejected`, the prompt
    held once; with `padding_free` every sequence of the batch goes into one row with no padding. Completion `b` is
    pair `b`'s chosen, completion `B + b` its rejected, as in the `[2B, T]` rows. Each completion is truncated as in
    its own row; sharing the prompt needs `truncation_mode="keep_start"` (the prompt kept whole) when `max_length`
    is set."""

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    prefix_sharing: bool = False
    padding_free: bool = False

    def __post_init__(self):
        packing.check_prefix_truncation(self.prefix_sharing, self.max_length, self.truncation_mode)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [example["prompt_ids"] for example in examples]
        chosen = [example["chosen_ids"] for example in examples]
        rejected = [example["rejected_ids"] for example in examples]
        if self.prefix_sharing or self.padding_free:
            batch = packing.pack_prompt_completions(
                prompts, list(zip(chosen, rejected)), self.pad_token_id, self.max_length, self.truncation_mode,
                prefix_sharing=self.prefix_sharing, padding_free=self.padding_free,
                pad_to_multiple_of=self.pad_to_multiple_of,
            )
        else:
            batch = data.collate_prompt_completions(
                prompts + prompts, chosen + rejected, self.pad_token_id, self.max_length, self.truncation_mode,
                self.pad_to_multiple_of,
            )
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch


class ReferenceFreePreferenceTrainer(AlignTrainer):
    """What the pairwise trainers without a reference model (ORPO, SimPO) share: the constructor of TRL's ORPO and CPO
    trainers, their token ids (`add_bos_eos_ids`), the pair collator and their metric names. No reference model is
    ever built, loaded or copied. Subclasses set the `AlignTrainer` class attributes and implement `compute_loss`;
    their Config has `beta`, and `padding_value` where TRL's has it (ORPO's)."""

    dataset_columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __init__(
        self,
        model,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        compute_metrics=None,
        quantization_config=None,
    ):
        if model_init is not None:
            raise ValueError("`model_init` is not supported: pass the model (an object, an id or a path) as `model`.")
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks,
            optimizers, peft_config=peft_config, quantization_config=quantization_config,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )

    def prepare_dataset(self, dataset, name, args):
        dataset, self.dropped_rows[name] = prepare_preference_dataset(
            dataset, self.tokenizer, name, args, add_bos_eos=True
        )
        return dataset

    def default_collator(self, args):
        padding_value = getattr(args, "padding_value", None)
        pad_token_id = self.tokenizer.pad_token_id if padding_value is None else padding_value
        return DataCollatorForPreference(
            pad_token_id, args.max_length, args.truncation_mode, prefix_sharing=getattr(args, "prefix_sharing", False),
            padding_free=getattr(args, "padding_free", False),
        )

    def record_pair_metrics(self, chosen_logps, rejected_logps, mean_logit, completion_mask) -> None:
        """TRL's ORPO/CPO metrics from the mean completion log-probs `[B]` of the pairs: `rewards/*` (reward = β · mean
        log-prob), `logps/*`, and `logits/*`, the mean logit over the completion tokens (`mean_logit` and
        `completion_mask` `[2B, T]`, chosen rows first), as hf_align's DPO logs it. (TRL's ORPO and CPO average the
        logits over every position of the padded batch, prompt and padding included: a number that depends on how
        the batch was padded.)"""
        chosen_rewards = self.args.beta * chosen_logps.detach()
        rejected_rewards = self.args.beta * rejected_logps.detach()
        self.record_metric("rewards/chosen", chosen_rewards)
        self.record_metric("rewards/rejected", rejected_rewards)
        self.record_metric("rewards/accuracies", (chosen_rewards > rejected_rewards).float())
        self.record_metric("rewards/margins", chosen_rewards - rejected_rewards)
        self.record_metric("logps/chosen", chosen_logps)
        self.record_metric("logps/rejected", rejected_logps)
        chosen_mask, rejected_mask = completion_mask.chunk(2)
        chosen_mean_logit, rejected_mean_logit = mean_logit.chunk(2)
        self.record_token_mean("logits/chosen", chosen_mean_logit, chosen_mask)
        self.record_token_mean("logits/rejected", rejected_mean_logit, rejected_mask)
