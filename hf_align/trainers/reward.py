"""Reward modelling: a one-output sequence classifier trained on preference pairs with the Bradley–Terry loss
(InstructGPT, Ouyang et al., arXiv 2203.02155). A drop-in for `trl.RewardTrainer` / `trl.RewardConfig`: same
constructor, dataset formats (`chosen`/`rejected` with an optional `prompt`, implicit or explicit, text or
conversational, an optional `margin` column), token ids, loss and logged metric names (`accuracy`, `margin`,
`min_reward`, `mean_reward`, `max_reward`, `num_tokens`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForSequenceClassification

from .. import data, losses, models
from ..config import ActivationOffloadingArguments, AlignConfig, TokenizerArguments
from ..trainer import AlignTrainer

logger = logging.getLogger(__name__)

INSTRUCTGPT_CITATION = """@inproceedings{ouyang2022training,
    title     = {{Training language models to follow instructions with human feedback}},
    author    = {Long Ouyang and Jeff Wu and Xu Jiang and Diogo Almeida and Carroll L. Wainwright and Pamela Mishkin and Chong Zhang and Sandhini Agarwal and Katarina Slama and Alex Ray and John Schulman and Jacob Hilton and Fraser Kelton and Luke Miller and Maddie Simens and Amanda Askell and Peter Welinder and Paul F. Christiano and Jan Leike and Ryan Lowe},
    year      = 2022,
    booktitle = {Advances in Neural Information Processing Systems 35},
}"""


@dataclass
class RewardConfig(AlignConfig, TokenizerArguments, ActivationOffloadingArguments):
    """Configuration of `RewardTrainer`; TRL's field names and defaults.

    Pairs whose chosen or rejected sequence is longer than `max_length` are dropped (counted in
    `trainer.dropped_rows`), as TRL does: a reward read from a truncated sequence would score a different text.
    `truncation_mode` therefore does not apply."""

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (TRL's reward default)."})
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "c in c·mean((r_chosen + r_rejected)²), pulling rewards to zero mean (0.01 suggested)."},
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad sequence lengths to a multiple of this ('auto': none; TRL pads to 128 "
                                  "on AWS Neuron only)."}
    )


@dataclass
class DataCollatorForRewardPairs:
    """Pads `chosen_ids` and `rejected_ids` into one batch `[2B, T]` with its `attention_mask`: chosen rows first,
    then rejected (TRL's reward `DataCollatorForPreference`). A `margin` per pair passes through as `[B]`."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [torch.tensor(example["chosen_ids"]) for example in examples]
        ids += [torch.tensor(example["rejected_ids"]) for example in examples]
        batch = {
            "input_ids": data.pad(ids, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": data.pad([torch.ones_like(i) for i in ids], 0, self.pad_to_multiple_of),
        }
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([example["margin"] for example in examples], dtype=torch.float)
        return batch


class RewardTrainer(AlignTrainer):
    """Trains a sequence classifier with one output (loaded with `num_labels=1` when given as an id or path) so that
    `r(prompt + chosen) > r(prompt + rejected)`. The reward is the head's output at the last non-pad token (the
    model's own pooling, so `config.pad_token_id` is set from the tokenizer). With a `peft_config`, the adapter's
    task type is SEQ_CLS, so peft also trains the new `score` head (its `modules_to_save`)."""

    config_class = RewardConfig
    auto_model_class = AutoModelForSequenceClassification
    model_init_overrides = {"num_labels": 1}
    algorithm = "Reward"
    paper = {"title": "Training language models to follow instructions with human feedback", "id": "2203.02155",
             "citation": INSTRUCTGPT_CITATION}
    dataset_columns = ("chosen_ids", "rejected_ids", "margin")

    def __init__(
        self,
        model,
        args: RewardConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
    ):
        if not isinstance(model, str):
            models.check_one_label_classifier(
                model, "RewardTrainer needs", "Pass the model id or path instead to load it as one, or build it with "
                "`AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`.")
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks,
            optimizers, peft_config=_sequence_classification_adapter(peft_config),
            quantization_config=quantization_config, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )

    # -- data ------------------------------------------------------------------------------------------------------
    def prepare_dataset(self, dataset, name, args):
        data.check_columns(dataset, name, ["chosen", "rejected"])
        columns = data.dataset_columns(dataset, name)
        has_prompt, has_margin = "prompt" in columns, "margin" in columns
        text_columns = ("prompt", "chosen", "rejected") if has_prompt else ("chosen", "rejected")
        conversational = data.is_conversational_row(data.first_row(dataset, name), text_columns)
        tokenizer = self.tokenizer  # `process` must not capture `self`: `datasets` hashes and pickles it

        def process(row, index):
            for column in text_columns:
                where = f"{name} dataset, row {index}, column '{column}'"
                data.check_value(row[column], where, conversational=conversational)
            if has_margin:
                margin = row["margin"]
                if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                    raise data.DataError(
                        f"{name} dataset, row {index}, column 'margin': expected a finite number, got {margin!r}."
                    )
            out = {}
            for column in ("chosen", "rejected"):
                sequence = row["prompt"] + row[column] if has_prompt else row[column]
                out[f"{column}_ids"] = data.tokenize_sequence(
                    tokenizer, row, sequence, conversational=conversational,
                    where=f"{name} dataset, row {index}, column '{column}'",
                )["input_ids"]
            return out

        remove = [column for column in columns if column != "margin"]
        kwargs = data.map_kwargs(dataset, f"Tokenizing {name}", args.dataset_num_proc)
        dataset = dataset.map(process, with_indices=True, remove_columns=remove, **kwargs)
        if args.max_length is not None:
            max_length = args.max_length
            dataset, self.dropped_rows[name] = data.drop_rows(
                dataset, name,
                lambda row: len(row["chosen_ids"]) <= max_length and len(row["rejected_ids"]) <= max_length,
                f"their chosen or rejected sequence is longer than max_length={max_length} tokens",
                args.dataset_num_proc,
            )
        return dataset

    def default_collator(self, args):
        return DataCollatorForRewardPairs(self.tokenizer.pad_token_id, args.pad_to_multiple_of)

    # -- loss ------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        chosen_rewards, rejected_rewards = rewards.squeeze(-1).chunk(2)
        loss = losses.bradley_terry_loss(
            chosen_rewards, rejected_rewards, inputs.get("margin"), self.args.center_rewards_coefficient
        ).mean()
        self.record_tokens(inputs["attention_mask"])
        for reduction in ("min", "mean", "max"):
            self.record_metric(f"{reduction}_reward", rewards, reduction)
        self.record_metric("accuracy", (chosen_rewards > rejected_rewards).float())
        self.record_metric("margin", chosen_rewards - rejected_rewards)
        if return_outputs:
            return loss, {"rewards_chosen": chosen_rewards, "rewards_rejected": rejected_rewards}
        return loss

    def card_hyperparameters(self) -> dict:
        return {"max_length": self.args.max_length, "center_rewards_coefficient": self.args.center_rewards_coefficient}


def _sequence_classification_adapter(peft_config):
    """`peft_config` with task type SEQ_CLS (a copy when it had another), so that peft adds the classifier head to
    the trained `modules_to_save`; a CAUSAL_LM adapter would leave the new, random head frozen."""
    if peft_config is None:
        return peft_config
    from peft import TaskType  # a `peft_config` is given: peft is installed

    if peft_config.task_type == TaskType.SEQ_CLS:
        return peft_config
    if peft_config.task_type is not None:
        logger.warning(
            "peft_config.task_type is %s; a reward model's adapter is SEQ_CLS (so the score head is trained): using "
            "SEQ_CLS.", peft_config.task_type,
        )
    return dataclasses.replace(peft_config, task_type=TaskType.SEQ_CLS)
