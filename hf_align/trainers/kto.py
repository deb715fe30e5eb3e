"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al., arXiv 2402.01306) on examples labelled good or bad, no pairs
needed. A drop-in for `trl.KTOTrainer` / `trl.KTOConfig`: same constructor, dataset formats (`prompt`/`completion`/
`label`, text or conversational; paired `prompt`/`chosen`/`rejected` data is unpaired as TRL does), KL batch of
mismatched pairs, loss and logged metric names."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from datasets import Dataset, Features, Value
from trl.data_utils import unpair_preference_dataset

from .. import data, losses, models
from .. import packing, sequence_logprobs
from ..config import (
    ActivationOffloadingArguments,
    AlignConfig,
    PackingArguments,
    ReferenceArguments,
    RouterAuxLossArguments,
)
from ..logprobs import CompletionLogProbs
from ..reference_sync import ReferenceSync, ReferenceSyncArguments
from ..trainer import AlignTrainer

logger = logging.getLogger(__name__)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

KTO_CITATION = """@article{ethayarajh2024kto,
    title  = {{KTO: Model Alignment as Prospect Theoretic Optimization}},
    author = {Kawin Ethayarajh and Winnie Xu and Niklas Muennighoff and Dan Jurafsky and Douwe Kiela},
    year   = 2024,
    eprint = {arXiv:2402.01306},
}"""


@dataclass
class KTOConfig(AlignConfig, PackingArguments, ReferenceArguments, ReferenceSyncArguments,
                ActivationOffloadingArguments, RouterAuxLossArguments):
    """Configuration of `KTOTrainer`; TRL's field names and defaults.

    `loss_type="kto"` estimates the reference point z0 from mismatched pairs built per batch by position, so it needs
    `train_sampling_strategy="sequential"` (the default) and `per_device_train_batch_size >= 2`;
    `"apo_zero_unpaired"` (arXiv 2408.06266) is KTO with z0 = 0 and needs neither."""

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's KTO default)."})
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={"help": "Training sampler. `kto` needs 'sequential': each batch's KL pairs are its own rows."},
    )
    beta: float = field(default=0.1, metadata={"help": "β: strength of the implicit KL to the reference."})
    loss_type: str = field(default="kto", metadata={"help": f"One of {KTO_LOSS_TYPES}."})
    desirable_weight: float = field(default=1.0, metadata={"help": "λD, the weight of desirable examples' losses."})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "λU, the weight of undesirable examples' losses."}
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad sequence lengths to a multiple of this ('auto': none; TRL pads to 128 "
                                  "on AWS Neuron only)."}
    )

    def __post_init__(self):
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}; expected one of {KTO_LOSS_TYPES}.")
        self.check_reference_sync()
        super().__post_init__()


@dataclass
class DataCollatorForUnpairedPreference:
    """Pads `prompt_ids + completion_ids` into `input_ids` / `attention_mask` / `completion_mask` `[B, T]` and, when
    the rows carry `KL_completion_ids`, the mismatched `prompt_ids + KL_completion_ids` into `KL_input_ids` /
    `KL_attention_mask` / `KL_completion_mask`. Each sequence is truncated to `max_length` before padding. `label` is
    a `[B]` bool tensor; precomputed `ref_logps` / `ref_KL_logps` pass through as `[B]` tensors.

    With `prefix_sharing` or `padding_free` the batch is packed instead (`packing.pack_sequences`): completion `i` is
    row `i`'s, completion `B + i` its mismatched KL completion; with `prefix_sharing` both follow row `i`'s prompt,
    held once, and the policy scores them in one forward."""

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
        completions = [[example["completion_ids"]] for example in examples]
        if "KL_completion_ids" in examples[0]:
            for example, row in zip(examples, completions):
                row.append(example["KL_completion_ids"])
        if self.prefix_sharing or self.padding_free:
            batch = packing.pack_prompt_completions(
                prompts, completions, self.pad_token_id, self.max_length, self.truncation_mode,
                prefix_sharing=self.prefix_sharing, padding_free=self.padding_free,
                pad_to_multiple_of=self.pad_to_multiple_of,
            )
        else:
            settings = (self.pad_token_id, self.max_length, self.truncation_mode, self.pad_to_multiple_of)
            batch = data.collate_prompt_completions(prompts, [row[0] for row in completions], *settings)
            if len(completions[0]) == 2:
                kl_batch = data.collate_prompt_completions(prompts, [row[1] for row in completions], *settings)
                batch.update({f"KL_{key}": value for key, value in kl_batch.items()})
        batch["label"] = torch.tensor([bool(example["label"]) for example in examples])
        for key in ("ref_logps", "ref_KL_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch


def add_kl_completions(dataset, batch_size: int):
    """TRL's mismatched pairs: within each run of `batch_size` rows (one per-device batch under sequential sampling,
    so every micro-batch pairs its own rows, whatever the gradient accumulation), row i gets the completion of row
    i-1 and the first row that of the last: (x1, y_n), (x2, y1), ..., (x_n, y_{n-1}). Always one process: with
    several, TRL's runs follow the shards and no longer line up with the batches."""

    def rotate(rows):
        completions = rows["completion_ids"]
        return {"KL_completion_ids": completions[-1:] + completions[:-1]}

    kwargs = {"desc": "Pairing KL completions"} if isinstance(dataset, Dataset) else {}
    return dataset.map(rotate, batched=True, batch_size=batch_size, **kwargs)


def check_labels(dataset, name: str, num_proc: int | None = None):
    """Raises `DataError` naming the row unless each `label` is a bool (0 / 1 accepted); stores them as bools."""

    def check(row, index):
        label = row["label"]
        if not isinstance(label, bool) and label not in (0, 1):
            raise data.DataError(
                f"{name} dataset, row {index}, column 'label': expected a bool (True: desirable, False: "
                f"undesirable), got {label!r}."
            )
        return {"label": bool(label)}

    kwargs = data.map_kwargs(dataset, f"Checking labels of {name}", num_proc)
    if dataset.features is not None:  # `map` keeps a column's type: a float or JSON label column would stay so
        kwargs["features"] = Features({**dataset.features, "label": Value("bool")})
    return dataset.map(check, with_indices=True, **kwargs)


class KTOTrainer(AlignTrainer):
    """Trains `model` on examples labelled desirable or undesirable against a reference: `ref_model` if given; with
    peft, the starting policy (its adapter disabled while that is the identity, else a frozen copy of the starting
    adapter); otherwise a frozen in-memory copy of `model` (none at all with `precompute_ref_log_probs`)."""

    config_class = KTOConfig
    algorithm = "KTO"
    paper = {"title": "KTO: Model Alignment as Prospect Theoretic Optimization", "id": "2402.01306",
             "citation": KTO_CITATION}
    dataset_columns = ("prompt_ids", "completion_ids", "KL_completion_ids", "label", "ref_logps", "ref_KL_logps")

    def __init__(
        self,
        model,
        ref_model=None,
        args: KTOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is not None and args.loss_type == "kto":
            if args.per_device_train_batch_size < 2:
                raise ValueError(
                    f"KTO needs per_device_train_batch_size >= 2, got {args.per_device_train_batch_size}: the KL "
                    "reference point pairs each prompt with another row's completion of the same batch, and a batch "
                    "of one row would pair it with its own (the KL term would equal the reward)."
                )
            if args.train_sampling_strategy != "sequential":
                raise ValueError(
                    f"KTO needs train_sampling_strategy='sequential', got {args.train_sampling_strategy!r}: the KL "
                    "completions are paired by position within each per-device batch, and any other order breaks "
                    "that pairing. Shuffle the dataset beforehand instead."
                )
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks,
            optimizers, peft_config=peft_config, quantization_config=quantization_config,
        )
        self.setup_reference(ref_model, self.reference_logps)
        self.reference_sync = ReferenceSync.attach(self)

    @property
    def uses_kl(self) -> bool:
        return self.args.loss_type == "kto"

    # -- data ------------------------------------------------------------------------------------------------------
    def prepare_dataset(self, dataset, name, args):
        num_proc = args.dataset_num_proc
        columns = data.dataset_columns(dataset, name)
        if "chosen" in columns and "rejected" in columns:
            dataset = self._unpair(dataset, name, num_proc)
        data.check_columns(dataset, name, ["prompt", "completion", "label"])
        dataset = check_labels(dataset, name, num_proc)
        dataset = data.tokenize_dataset(
            dataset, self.tokenizer, name, text_columns=("prompt", "completion"), completion_columns=("completion",),
            keep_columns=("label",), num_proc=num_proc,
        )
        dataset, self.dropped_rows[name] = data.drop_overlong_prompts(
            dataset, name, args.max_length, args.truncation_mode, num_proc
        )
        if args.loss_type == "kto":
            # TRL pairs every dataset, eval ones included, in runs of the per-device *train* batch size.
            dataset = add_kl_completions(dataset, args.per_device_train_batch_size)
        if name == "train" and isinstance(dataset, Dataset):
            self._warn_on_imbalance(dataset["label"], args)
        return dataset

    def _unpair(self, dataset, name, num_proc):
        """Two rows per pair, as TRL's `unpair_preference_dataset`: the chosen completion labelled desirable, the
        rejected one undesirable. Rows are checked against the paired dataset first, so errors name its rows."""
        dataset = data.extract_implicit_prompt(dataset, name, num_proc)
        dataset = data.check_rows(dataset, name, ("prompt", "chosen", "rejected"), num_proc)
        pairs = f"{len(dataset)} pairs -> {2 * len(dataset)} rows" if isinstance(dataset, Dataset) else "streamed"
        dataset = unpair_preference_dataset(dataset, **data.map_kwargs(dataset, f"Unpairing {name}", num_proc))
        logger.warning(
            "The %s dataset is paired (prompt/chosen/rejected): unpaired into two rows per pair, chosen -> label True, "
            "rejected -> label False (%s). As in TRL, each block of up to 1000 pairs gives all its chosen rows, then "
            "all its rejected ones, so with sequential sampling a batch holds one kind only; to mix them, pass "
            "`trl.data_utils.unpair_preference_dataset(dataset).shuffle(seed=0)` instead.", name, pairs,
        )
        return dataset

    @staticmethod
    def _warn_on_imbalance(labels, args) -> None:
        """The KTO paper (arXiv 2402.01306) recommends λD·nD / (λU·nU) in [1, 4/3] (TRL cites its eq. 8). TRL checks
        only imbalanced counts; this also warns on balanced counts with weights that leave the range."""
        n_desirable = sum(labels)
        n_undesirable = len(labels) - n_desirable
        weighted_d = args.desirable_weight * max(n_desirable, 1)
        weighted_u = args.undesirable_weight * max(n_undesirable, 1)
        ratio = weighted_d / weighted_u
        if 1.0 <= ratio <= 4 / 3:
            return
        logger.warning(
            "The train dataset has %d desirable and %d undesirable examples: with desirable_weight=%g and "
            "undesirable_weight=%g, λD·nD / (λU·nU) = %.2f is outside [1, 4/3], the range the KTO paper recommends "
            "(arXiv 2402.01306). Set EITHER desirable_weight in [%.2f, %.2f] OR undesirable_weight in "
            "[%.2f, %.2f] (not both).",
            n_desirable, n_undesirable, args.desirable_weight, args.undesirable_weight, ratio,
            weighted_u / max(n_desirable, 1), 4 / 3 * weighted_u / max(n_desirable, 1),
            weighted_d / (4 / 3 * max(n_undesirable, 1)), weighted_d / max(n_undesirable, 1),
        )

    def prepare_eval_dataset(self, dataset, name):
        dataset = super().prepare_eval_dataset(dataset, name)
        return self.precompute_eval_reference(dataset, name, self.reference_logps, "ref_logps")

    def default_collator(self, args):
        return DataCollatorForUnpairedPreference(
            self.tokenizer.pad_token_id, args.max_length, args.truncation_mode, args.pad_to_multiple_of,
            args.prefix_sharing, args.padding_free,
        )

    # -- loss ------------------------------------------------------------------------------------------------------
    def reference_logps(self, batch) -> dict[str, torch.Tensor]:
        """Summed completion log-probs under the reference: `ref_logps` `[B]`, and `ref_KL_logps` `[B]` of the
        mismatched pairs when the loss uses them."""
        with models.reference_model(self.model, self.ref_model) as reference:
            completions, kl_logps = self.sequence_logps(reference, batch)
        out = {"ref_logps": completions.sum}
        if self.uses_kl:
            out["ref_KL_logps"] = kl_logps
        return out

    @staticmethod
    def sequence_logps(model, batch, with_stats: bool = False) -> tuple[CompletionLogProbs, torch.Tensor | None]:
        """The log-probs of the batch's completions (`[B, ...]`) and the summed log-probs `[B]` of its mismatched KL
        completions, without gradient (None when the batch has none). A packed batch scores both in one forward."""
        if "completion_index" in batch:
            scored = sequence_logprobs.batch_logprobs(model, batch, with_stats=with_stats)
            rows = len(batch["label"])
            completions = scored.map_tokens(lambda values: values[:rows])
            return completions, scored.sum[rows:].detach() if len(scored.sum) > rows else None
        completions = sequence_logprobs.batch_logprobs(model, batch, with_stats=with_stats)
        if "KL_input_ids" not in batch:
            return completions, None
        with torch.no_grad():
            kl = sequence_logprobs.batch_logprobs(model, {key[3:]: value for key, value in batch.items() if key.startswith("KL_")})
        return completions, kl.sum

    def reference_point(self, kl_logps, reference) -> torch.Tensor:
        """z0: the mean of `logp(y'|x) - ref(y'|x)` over this batch's mismatched pairs, averaged over every process
        (each computes it from its own micro-batch), clamped at 0; no gradient flows through it."""
        kl = (kl_logps - reference["ref_KL_logps"]).mean()
        return self.accelerator.gather(kl.reshape(1)).mean().clamp(min=0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reference = inputs if "ref_logps" in inputs else self.reference_logps(inputs)
        policy, kl_logps = self.sequence_logps(model, inputs, with_stats=True)
        if self.uses_kl:
            z0 = self.reference_point(kl_logps, reference)
        else:
            z0 = inputs["input_ids"].new_zeros((), dtype=torch.float32)
        logratios = policy.sum - reference["ref_logps"]
        desirable = inputs["label"].bool()
        loss = losses.kto_loss(
            logratios, desirable, z0, beta=self.args.beta, desirable_weight=self.args.desirable_weight,
            undesirable_weight=self.args.undesirable_weight,
        ).mean()
        loss = self.add_router_aux_loss(loss, policy)
        self._record_kto_metrics(policy, logratios, desirable, z0)
        self.record_tokens(packing.batch_token_count(inputs, num_completions=len(desirable)))
        return (loss, {"logps": policy.sum}) if return_outputs else loss

    def _record_kto_metrics(self, policy, logratios, desirable, z0) -> None:
        # Sums and counts over every process: a batch with no desirable (or no undesirable) example adds nothing to
        # that kind's means instead of a NaN; `rewards/margins` is derived when the log is written.
        rewards = self.args.beta * logratios.detach()
        logps = policy.sum.detach()
        self.record_metric("kl", z0)
        self.record_sum("rewards/chosen", rewards[desirable])
        self.record_sum("rewards/rejected", rewards[~desirable])
        self.record_sum("logps/chosen", logps[desirable])
        self.record_sum("logps/rejected", logps[~desirable])
        self.record_token_mean("logits/chosen", policy.mean_logit[desirable], policy.mask[desirable])
        self.record_token_mean("logits/rejected", policy.mean_logit[~desirable], policy.mask[~desirable])
        self.record_token_mean("entropy", policy.entropy, policy.mask)

    def pending_metrics(self, mode: str) -> dict[str, float]:
        metrics = super().pending_metrics(mode)
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics

    def card_hyperparameters(self) -> dict:
        return {
            "beta": self.args.beta, "loss_type": self.args.loss_type, "desirable_weight": self.args.desirable_weight,
            "undesirable_weight": self.args.undesirable_weight,
        }
