"""SFT: supervised fine-tuning by next-token negative log-likelihood. A drop-in for `trl.SFTTrainer` /
`trl.SFTConfig`: same constructor, dataset formats (language modeling `text` or `messages`; prompt-completion, text or
conversational), token ids, loss normalisation and logged metric names (`entropy`, `mean_token_accuracy`,
`num_tokens`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from trl.chat_template_utils import has_generation_markers
from trl.data_utils import pack_dataset

from .. import data, losses
from ..config import ActivationOffloadingArguments, AlignConfig, RouterAuxLossArguments, TokenizerArguments
from ..sequence_logprobs import batch_logprobs
from ..trainer import AlignTrainer

IGNORE_INDEX = -100  # label of a token outside the loss
SFT_LOSS_TYPES = ("nll", "dft")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


@dataclass
class SFTConfig(AlignConfig, TokenizerArguments, ActivationOffloadingArguments, RouterAuxLossArguments):
    """Configuration of `SFTTrainer`; TRL's field names and defaults.

    Which tokens are trained: for prompt-completion data the completion only (`completion_only_loss`, on unless set
    to False); for conversational data with `assistant_only_loss`, only the assistant turns (the chat template must
    mark them with `{% generation %}`); otherwise every token. Sequences longer than `max_length` are truncated per
    `truncation_mode`. With `packing`, rows are packed into `max_length`-token rows by `packing_strategy`: best-fit
    decreasing (`bfd`: a row longer than `max_length` is truncated; `bfd_split`: it is split), where attention and the
    loss stay within each original sequence, or `wrapped` (rows concatenated and cut every `max_length` tokens,
    attention running across them). `padding_free` (implied by the best-fit strategies, as in TRL) flattens each batch
    into one row: nothing is computed on padding, and `max_length` still truncates each row."""

    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate (TRL's SFT default)."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text of LM datasets."})
    dataset_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Dataset preparation options; the one key is `skip_prepare_dataset` (use the "
                                "rows' `input_ids` and, if present, `labels` as they are: no tokenization, "
                                "truncation or packing)."}
    )
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the dataset (seeded; before packing)."})
    packing: bool = field(
        default=False, metadata={"help": "Pack rows into max_length-token rows (see packing_strategy)."}
    )
    packing_strategy: str = field(
        default="bfd", metadata={"help": "bfd (best-fit decreasing, longer rows truncated), bfd_split (best-fit "
                                 "decreasing, longer rows split) or wrapped (concatenated and cut every max_length "
                                 "tokens, across row boundaries)."}
    )
    padding_free: bool = field(
        default=False, metadata={"help": "Flatten each batch into one row with no padding, position ids restarting "
                                 "at each sequence (always so with the best-fit packing strategies)."}
    )
    eval_packing: bool | None = field(
        default=None, metadata={"help": "Pack the eval dataset (None: as `packing` says)."}
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Train only on completions (prompt-completion data). None: on for prompt-completion data."},
    )
    assistant_only_loss: bool = field(
        default=False, metadata={"help": "Train only on assistant turns (conversational data)."}
    )
    loss_type: str = field(
        default="nll", metadata={"help": "nll (negative log-likelihood) or dft (Dynamic Fine-Tuning, arXiv "
                                 "2508.05629: each token's NLL weighted by its probability, held constant)."}
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad sequence lengths to a multiple of this ('auto': none; TRL pads to 128 "
                                  "on AWS Neuron only)."}
    )

    def __post_init__(self):
        if self.loss_type == "chunked_nll":  # TRL's deprecated alias: its nll is chunked too
            self.loss_type = "nll"
        if self.loss_type not in SFT_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {SFT_LOSS_TYPES}, got {self.loss_type!r}.")
        if self.packing_strategy == "bfd-requeue":  # TRL's deprecated name
            self.packing_strategy = "bfd_split"
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy must be one of {PACKING_STRATEGIES}, got {self.packing_strategy!r}.")
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise ValueError("`packing=True` packs rows into `max_length` tokens: set `max_length`.")
        if isinstance(self.dataset_kwargs, str):
            import json

            self.dataset_kwargs = json.loads(self.dataset_kwargs)
        unknown = sorted(set(self.dataset_kwargs or {}) - {"skip_prepare_dataset"})
        if unknown:
            raise ValueError(f"dataset_kwargs: unknown keys {unknown}; the one key is 'skip_prepare_dataset'.")
        super().__post_init__()

    @property
    def skip_prepare_dataset(self) -> bool:
        return bool((self.dataset_kwargs or {}).get("skip_prepare_dataset", False))

    @property
    def padding_free_batches(self) -> bool:
        """Whether batches are flattened into one row: `padding_free`, or packing best-fit (TRL's rule)."""
        return self.padding_free or (self.packing and self.packing_strategy in ("bfd", "bfd_split"))


@dataclass
class DataCollatorForLanguageModeling:
    """Pads `input_ids` and `labels` (the ids, with -100 on tokens outside the loss; the ids themselves when absent)
    into `[B, T]` with an `attention_mask`.

    With `padding_free` (used for packed rows), the batch is flattened into one row `[1, N]` with no attention mask and
    `position_ids` that restart at 0 at each sequence (from the rows' `seq_lengths`): the model keeps attention within
    each sequence, and the first token of each sequence is left out of the loss (no token of its sequence predicts it)."""

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = [torch.tensor(example["input_ids"]) for example in examples]
        labels = [torch.tensor(example.get("labels", example["input_ids"])) for example in examples]
        if not self.padding_free:
            return {
                "input_ids": data.pad(input_ids, self.pad_token_id, self.pad_to_multiple_of),
                "attention_mask": data.pad([torch.ones_like(ids) for ids in input_ids], 0, self.pad_to_multiple_of),
                "labels": data.pad(labels, IGNORE_INDEX, self.pad_to_multiple_of),
            }
        position_ids = torch.cat([
            torch.arange(length)
            for example in examples
            for length in example.get("seq_lengths", [len(example["input_ids"])])
        ])
        batch = {
            "input_ids": data.pad([torch.cat(input_ids)], self.pad_token_id, self.pad_to_multiple_of),
            "position_ids": data.pad([position_ids], 0, self.pad_to_multiple_of),
            "labels": data.pad([torch.cat(labels)], IGNORE_INDEX, self.pad_to_multiple_of),
        }
        batch["labels"][batch["position_ids"] == 0] = IGNORE_INDEX
        return batch


class SFTTrainer(AlignTrainer):
    """Fine-tunes a causal LM on `train_dataset`, in any of TRL's SFT formats:

    - language modeling: a `text` column (`args.dataset_text_field`; eos appended) or a `messages` column (chat);
    - prompt-completion: `prompt` and `completion`, both strings (eos appended to the completion) or both message lists.

    Rows are tokenized exactly as TRL tokenizes them, into `input_ids` and `labels` (-100 where not trained). The
    loss is the NLL of the trained tokens from the chunked LM head (`sequence_logprobs.batch_logprobs`; the `[B, T, V]`
    logits are never built), normalised like TRL: by the trained-token count of the whole gradient-accumulation step.
    A `formatting_func(row) -> str` turns each row into a language-modeling text first."""

    config_class = SFTConfig
    algorithm = "SFT"
    dataset_columns = ("input_ids", "labels", "seq_lengths")
    # The loss is divided by `num_items_in_batch` (the accumulation step's token count) whenever Trainer provides it;
    # Trainer then leaves it unscaled, and divides by the accumulation steps otherwise (its default rule).
    loss_is_scaled_for_ga = None

    def __init__(
        self,
        model,
        args: SFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
    ):
        self.formatting_func = formatting_func
        if compute_loss_func is not None and args is not None and args.loss_type == "dft":
            raise ValueError("`compute_loss_func` replaces the loss, so `loss_type='dft'` would not apply: give one.")
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks,
            optimizers, peft_config=peft_config, quantization_config=quantization_config,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )
        self.compute_loss_func = compute_loss_func

    # -- data ------------------------------------------------------------------------------------------------------
    def prepare_dataset(self, dataset, name, args):
        if args.skip_prepare_dataset:
            return self._check_prepared(dataset, name)
        dataset = self._tokenize(dataset, name, args)
        packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
        if args.shuffle_dataset:  # before packing too, so that packed rows mix unrelated sequences (TRL's order)
            dataset = dataset.shuffle(seed=args.seed)
        if packing:
            kwargs = data.map_kwargs(dataset, f"Packing {name}", args.dataset_num_proc)
            dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, kwargs)
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
        return dataset

    @staticmethod
    def _check_prepared(dataset, name: str):
        """A dataset given ready (`skip_prepare_dataset`): token ids in `input_ids`, optionally `labels` (-100 where
        not trained) and `seq_lengths` (packed rows)."""
        columns = data.dataset_columns(dataset, name)
        if "input_ids" not in columns:
            raise data.DataError(f"The {name} dataset needs an 'input_ids' column with `skip_prepare_dataset=True` "
                                 f"(its columns: {columns}).")
        masks = sorted({"completion_mask", "assistant_masks"} & set(columns))
        if masks and "labels" not in columns:
            raise data.DataError(f"The {name} dataset has {masks} but no 'labels', and `skip_prepare_dataset=True` "
                                 "skips turning masks into labels: give 'labels' (-100 where not trained).")
        return dataset

    def _tokenize(self, dataset, name, args):
        """The rows as `input_ids` and `labels` (-100 where not trained), truncated to `max_length`; rows with no
        trained token left are dropped (counted in `dropped_rows`)."""
        num_proc = args.dataset_num_proc
        if self.formatting_func is not None:
            if args.completion_only_loss:
                raise ValueError(
                    "A `formatting_func` turns every row into one text, which has no completion: "
                    "`completion_only_loss=True` cannot apply. Format the rows beforehand, or unset it."
                )
            text_field, formatting_func = args.dataset_text_field, self.formatting_func
            kwargs = data.map_kwargs(dataset, f"Formatting {name}")
            dataset = dataset.map(lambda row: {text_field: formatting_func(row)}, **kwargs)
        kind, text_columns = self._dataset_format(dataset, name, args)
        # A `messages` column is conversational whatever its first row holds (a bad first row must not make it text).
        conversational = kind == "messages" or data.is_conversational_row(data.first_row(dataset, name), text_columns)
        completion_only = self._check_loss_options(kind, conversational, name, args)

        # `process` captures only picklable values (no `self`): `datasets` hashes it and sends it to worker processes.
        tokenizer, assistant_only = self.tokenizer, args.assistant_only_loss
        max_length, truncation_mode = args.max_length, args.truncation_mode

        def process(row, index):
            where = f"{name} dataset, row {index}"
            for column in text_columns:
                data.check_value(row[column], f"{where}, column '{column}'", conversational=conversational)
            input_ids, trained = _tokenize_row(
                tokenizer, row, where, kind, text_columns, conversational, completion_only, assistant_only
            )
            if assistant_only and not any(trained):
                raise data.DataError(
                    f"{where}, column '{text_columns[-1]}': no assistant token to train on "
                    "(`assistant_only_loss=True`)."
                )
            labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, trained)]
            return {
                "input_ids": data.truncate(input_ids, max_length, truncation_mode),
                "labels": data.truncate(labels, max_length, truncation_mode),
            }

        columns = data.dataset_columns(dataset, name)
        kwargs = data.map_kwargs(dataset, f"Tokenizing {name}", num_proc)
        dataset = dataset.map(process, with_indices=True, remove_columns=columns, **kwargs)
        dataset, self.dropped_rows[name] = data.drop_rows(
            dataset, name, lambda row: any(label != IGNORE_INDEX for label in row["labels"][1:]),
            f"no trained token is left within max_length={args.max_length} (nothing predicts a row's first token, "
            "so a one-token row has none)", num_proc,
        )
        return dataset

    def _dataset_format(self, dataset, name: str, args) -> tuple[str, tuple[str, ...]]:
        """`(kind, text columns)`: kind is "prompt-completion", "messages" or "text"."""
        columns = data.dataset_columns(dataset, name)
        if self.formatting_func is not None:
            return "text", (args.dataset_text_field,)
        if "prompt" in columns or "completion" in columns:
            data.check_columns(dataset, name, ["prompt", "completion"])
            return "prompt-completion", ("prompt", "completion")
        if "messages" in columns:
            return "messages", ("messages",)
        if args.dataset_text_field in columns:
            return "text", (args.dataset_text_field,)
        raise data.DataError(
            f"The {name} dataset has none of the SFT formats: a '{args.dataset_text_field}' column, a 'messages' "
            f"column, or 'prompt' and 'completion' columns (its columns: {columns})."
        )

    def _check_loss_options(self, kind: str, conversational: bool, name: str, args) -> bool:
        """Raises when `completion_only_loss` / `assistant_only_loss` cannot apply to the data; returns whether the
        loss is on completions only."""
        completion_only = args.completion_only_loss
        if completion_only is None:
            completion_only = kind == "prompt-completion"
        if completion_only and kind != "prompt-completion":
            raise ValueError(
                f"`completion_only_loss=True` needs prompt-completion data; the {name} dataset is language modeling "
                f"({kind!r})."
            )
        if args.assistant_only_loss and not conversational:
            raise ValueError(f"`assistant_only_loss=True` needs conversational data; the {name} dataset is text.")
        if args.assistant_only_loss and not has_generation_markers(self.tokenizer.chat_template or ""):
            raise ValueError(
                "`assistant_only_loss=True` needs a chat template that marks the assistant turns with "
                "`{% generation %}` ... `{% endgeneration %}`; the tokenizer's template has no such markers."
            )
        return completion_only

    def default_collator(self, args):
        return DataCollatorForLanguageModeling(
            self.tokenizer.pad_token_id, args.padding_free_batches, args.pad_to_multiple_of
        )

    # -- loss ------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean NLL of the tokens whose label is not -100 (labels are the input ids elsewhere). With
        `num_items_in_batch` (trained tokens of the accumulation step, over every process) the sum is divided by it
        and scaled by the process count, since DDP averages gradients, as TRL and transformers do."""
        attention_mask = inputs.get("attention_mask")
        with torch.no_grad() if self.compute_loss_func is not None else contextlib.nullcontext():
            policy = batch_logprobs(
                model, {"input_ids": inputs["input_ids"], "attention_mask": attention_mask,
                        "completion_mask": inputs["labels"] != IGNORE_INDEX, "position_ids": inputs.get("position_ids")},
                with_stats=True,
            )
        if self.compute_loss_func is not None:
            # TRL's contract: the user's function gets the model's own outputs (full logits) and the labels; the
            # log-probs above only feed the metrics.
            loss = self.compute_loss_func(model(**{k: v for k, v in inputs.items() if k != "labels"}),
                                          inputs["labels"], num_items_in_batch=num_items_in_batch)
        else:
            token_loss = losses.dft_loss if self.args.loss_type == "dft" else losses.masked_nll
            loss = token_loss(policy.token_logps, policy.mask, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        if self.compute_loss_func is None:  # TRL leaves the load-balancing loss to a user's loss function
            # A per-micro-batch mean: where Trainer leaves gradient accumulation to the loss (`num_items_in_batch`),
            # it is averaged over the accumulation steps here (TRL's rule).
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = self.add_router_aux_loss(loss, policy, scale=1 / steps)
        self.record_token_mean("entropy", policy.entropy, policy.mask)
        self.record_token_mean("mean_token_accuracy", policy.is_top1.float(), policy.mask)
        self.record_tokens(attention_mask if attention_mask is not None else torch.ones_like(inputs["input_ids"]))
        return (loss, {"token_logps": policy.token_logps}) if return_outputs else loss

    def card_hyperparameters(self) -> dict:
        return {"max_length": self.args.max_length, "packing": self.args.packing}


def _tokenize_row(tokenizer, row, where, kind, text_columns, conversational, completion_only, assistant_only):
    """`(input_ids, trained)`: the row's token ids as TRL's `SFTTrainer` makes them, and whether each is trained.
    `where` names the row in errors."""
    if kind == "prompt-completion":
        ids = data.tokenize_prompt_completions(tokenizer, row, ("completion",), where, conversational=conversational)
        input_ids = ids["prompt_ids"] + ids["completion_ids"]
        trained = [not completion_only] * len(ids["prompt_ids"]) + [True] * len(ids["completion_ids"])
        if assistant_only:
            assistant = data.tokenize_sequence(
                tokenizer, row, row["prompt"] + row["completion"], conversational=True, assistant_masks=True,
                where=f"{where}, column 'completion'",
            )["assistant_masks"]
            trained = [keep and bool(mask) for keep, mask in zip(trained, assistant)]
        return input_ids, trained
    tokenized = data.tokenize_sequence(
        tokenizer, row, row[text_columns[0]], conversational=conversational, assistant_masks=assistant_only,
        where=f"{where}, column '{text_columns[0]}'",
    )
    input_ids = tokenized["input_ids"]
    return input_ids, [bool(mask) for mask in tokenized.get("assistant_masks", [1] * len(input_ids))]
