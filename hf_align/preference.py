"""Machinery shared by the pairwise preference trainers (DPO, IPO, ORPO, SimPO, step-wise DPO, ...): preparing
`prompt`/`chosen`/`rejected` datasets and collating chosen and rejected sequences into one batch; and the base of the
trainers that need no reference model (`ReferenceFreePreferenceTrainer`)."""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from collections.abc import Sequence

import torch

from . import data, generation, packing
from .trainer import AlignTrainer

# What TRL's CPO and ORPO trainers generate up to when `max_length` is None (its fallback total length).
TRL_FALLBACK_MAX_LENGTH = 512


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


def truncate_completions(dataset, max_completion_length: int | None, name: str, num_proc=None):
    """Keeps the first `max_completion_length` tokens of each `chosen_ids` / `rejected_ids` (an EOS past them is cut
    too, as `max_length` cuts it). TRL's ORPO and CPO apply `max_completion_length` only to encoder-decoder models
    (the tokenizer truncates each completion); for a decoder-only model they ignore it, while here it limits the
    completion as its name says. Run after `add_bos_eos_ids`."""
    if max_completion_length is None:
        return dataset

    def cut(row):
        return {column: row[column][:max_completion_length] for column in ("chosen_ids", "rejected_ids")}

    return dataset.map(cut, **data.map_kwargs(dataset, f"Truncating completions of {name}", num_proc))


@dataclass
class DataCollatorForPreference:
    """Pads `prompt_ids` + `chosen_ids` and `prompt_ids` + `rejected_ids` into one batch `[2B, T]`: chosen rows
    first, then rejected. Each sequence is truncated to `max_length` before padding. Precomputed
    `ref_chosen_logps` / `ref_rejected_logps` pass through as `[B]` tensors.

    With `prefix_sharing` or `padding_free`, the batch is packed instead (`packing.pack_sequences`, scored by
    `sequence_logprobs.batch_logprobs`): with `prefix_sharing` each pair is one sequence `prompt, chosen, rejected`, the prompt
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

    @classmethod
    def from_config(cls, pad_token_id: int, args):
        """The collator `args` (a Config with `PackingArguments` and `pad_to_multiple_of`) sets up."""
        return cls(pad_token_id, args.max_length, args.truncation_mode, args.pad_to_multiple_of, args.prefix_sharing,
                   args.padding_free)

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


SAMPLE_TABLE_TRACKERS = ("wandb", "comet_ml")  # the trackers that take a sample table: `report_to` and module names


def installed_sample_trackers() -> list[str]:
    return [name for name in SAMPLE_TABLE_TRACKERS if importlib.util.find_spec(name) is not None]


@dataclass
class ReferenceFreePreferenceArguments:
    """The fields TRL's ORPOConfig and CPOConfig share besides the loss; `check_reference_free_arguments` validates
    them once `report_to` is resolved (call it at the end of the Config's `__post_init__`)."""

    max_completion_length: int | None = field(
        default=None, metadata={"help": "Most tokens of each completion (its EOS included); longer ones are cut. "
                                "None: no limit beyond max_length."}
    )
    generate_during_eval: bool = field(
        default=False, metadata={"help": "At each evaluation, sample completions for a batch of random eval prompts "
                                 "and log them as a table to W&B or Comet (needs 'wandb' or 'comet_ml' in report_to)."}
    )
    is_encoder_decoder: bool | None = field(
        default=None, metadata={"help": "TRL's flag for encoder-decoder models; hf_align trains decoder-only models, "
                                "so only None or False."}
    )

    def check_reference_free_arguments(self) -> None:
        if self.is_encoder_decoder:
            raise ValueError("is_encoder_decoder=True: hf_align trains decoder-only causal language models "
                             "(AutoModelForCausalLM), not encoder-decoder ones such as T5 or BART. Leave "
                             "is_encoder_decoder unset (None) or False.")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be at least 1 (or None), got {self.max_completion_length}.")
        if self.generate_during_eval:
            installed = installed_sample_trackers()
            if not installed:
                raise ValueError("`generate_during_eval=True` requires Weights and Biases or Comet to be installed. "
                                 "Please install `wandb` or `comet-ml` to resolve.")
            if not any(tracker in self.report_to for tracker in SAMPLE_TABLE_TRACKERS):
                raise ValueError(f"`generate_during_eval=True` logs its table of samples to W&B or Comet, and neither "
                                 f"is in report_to={self.report_to}: add {' or '.join(map(repr, installed))} to "
                                 "report_to, or set generate_during_eval=False.")


class ReferenceFreePreferenceTrainer(AlignTrainer):
    """What the pairwise trainers without a reference model (ORPO, CPO, SimPO) share: the constructor of TRL's ORPO
    and CPO trainers, their token ids (`add_bos_eos_ids`, then `truncate_completions`), the pair collator, their metric
    names and `generate_during_eval`. No reference model is ever built, loaded or copied. Subclasses set the
    `AlignTrainer` class attributes and implement `compute_loss`; their Config has `beta`, the fields of
    `ReferenceFreePreferenceArguments`, and `padding_value` where TRL's has it (ORPO's)."""

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
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model; hf_align trains decoder-only causal "
                             "language models (AutoModelForCausalLM).")
        if getattr(args, "generate_during_eval", False):
            self.dataset_columns = (*self.dataset_columns, "prompt")  # kept by `remove_unused_columns=True` too
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks,
            optimizers, peft_config=peft_config, quantization_config=quantization_config,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )

    def prepare_dataset(self, dataset, name, args):
        keep = ("prompt",) if args.generate_during_eval else ()  # the text `log_sample_table` generates from
        dataset, self.dropped_rows[name] = prepare_preference_dataset(
            dataset, self.tokenizer, name, args, keep_columns=keep, add_bos_eos=True
        )
        return truncate_completions(dataset, args.max_completion_length, name, args.dataset_num_proc)

    def default_collator(self, args):
        padding_value = getattr(args, "padding_value", None)
        pad_token_id = self.tokenizer.pad_token_id if padding_value is None else padding_value
        return DataCollatorForPreference(
            pad_token_id, args.max_length, args.truncation_mode, prefix_sharing=getattr(args, "prefix_sharing", False),
            padding_free=getattr(args, "padding_free", False),
        )

    def record_pair_metrics(self, chosen_logps, rejected_logps, mean_logit, completion_mask,
                            chosen_rewards=None, rejected_rewards=None) -> None:
        """TRL's ORPO/CPO metrics from the completion log-probs `[B]` of the pairs (as the loss scores them: mean or
        sum): `rewards/*` (`chosen_rewards` / `rejected_rewards` `[B]`, by default β · log-prob), `logps/*`, and
        `logits/*`, the mean logit over the completion tokens (`mean_logit` and `completion_mask` `[2B, T]`, chosen
        rows first), as hf_align's DPO logs it. (TRL's ORPO and CPO average the logits over every position of the
        padded batch, prompt and padding included: a number that depends on how the batch was padded.)"""
        if chosen_rewards is None:
            chosen_rewards, rejected_rewards = self.args.beta * chosen_logps, self.args.beta * rejected_logps
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
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

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        if self.args.generate_during_eval:
            self.log_sample_table(dataloader.dataset)
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def log_sample_table(self, dataset) -> None:
        """`generate_during_eval`, as TRL's ORPO and CPO trainers do it: one sampled completion (temperature 1) for
        each of `eval_batch_size` random rows of `dataset`, logged as the table `game_log` (columns Prompt and Policy)
        to W&B and/or Comet, whichever `report_to` names. Every process generates (a ZeRO-3 model needs them all);
        the main one logs. A completion gets `max_completion_length` new tokens, else what `max_length` leaves after
        the longest prompt (TRL's `generate(max_length=...)`)."""
        import pandas

        rows = dataset.select(random.sample(range(len(dataset)), k=min(self.args.eval_batch_size, len(dataset))))
        prompts = list(rows["prompt"])
        max_new_tokens = self.args.max_completion_length or max(
            1, (self.args.max_length or TRL_FALLBACK_MAX_LENGTH) - max(len(ids) for ids in rows["prompt_ids"])
        )
        sampling = generation.SamplingConfig(max_new_tokens=max_new_tokens, batch_size=len(prompts))
        completions = generation.generate_completions(self.model, self.tokenizer, prompts, sampling)
        if not self.is_world_process_zero():
            return
        shown = [prompt if isinstance(prompt, str) else self.tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True) for prompt in prompts]
        table = pandas.DataFrame({"Prompt": shown, "Policy": completions.texts})
        if "wandb" in self.args.report_to:
            import wandb

            wandb.log({"game_log": wandb.Table(dataframe=table)})
        if "comet_ml" in self.args.report_to:
            from trl.trainer.utils import log_table_to_comet_experiment

            log_table_to_comet_experiment(name="game_log.csv", table=table)
