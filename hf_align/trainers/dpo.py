"""DPO: Direct Preference Optimization (Rafailov et al., arXiv 2305.18290), with the hinge, IPO and robust variants
and cDPO label smoothing. A drop-in for `trl.DPOTrainer` / `trl.DPOConfig`: same constructor, dataset formats
(`prompt`/`chosen`/`rejected`, text or conversational, prompt implicit or explicit) and logged metric names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import losses, models, preference
from ..config import AlignConfig, PackingArguments
from ..packing import batch_logprobs, batch_token_count
from ..preference import DataCollatorForPreference
from ..trainer import AlignTrainer

DPO_CITATION = """@inproceedings{rafailov2023direct,
    title     = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
    author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
    year      = 2023,
    booktitle = {Advances in Neural Information Processing Systems 36},
}"""


@dataclass
class DPOConfig(AlignConfig, PackingArguments):
    """Configuration of `DPOTrainer`; TRL's field names and defaults.

    `loss_type` is one of `losses.DPO_LOSS_TYPES` or a list of them, combined with `loss_weights`.
    `label_smoothing` ε: for `sigmoid` it gives cDPO, for `robust` the label-flip rate."""

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's DPO default)."})
    beta: float = field(default=0.1, metadata={"help": "β: strength of the implicit KL to the reference."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"], metadata={"help": f"One or more of {losses.DPO_LOSS_TYPES}."}
    )
    loss_weights: list[float] | None = field(default=None, metadata={"help": "Weights of the loss types."})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε for cDPO (sigmoid) and robust DPO."})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute reference log-probs once before training, then drop the reference."}
    )
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "Batch size of that pass."})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad sequence lengths to a multiple."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        unknown = [t for t in self.loss_type if t not in losses.DPO_LOSS_TYPES]
        if unknown:
            raise ValueError(f"Unknown loss_type {unknown}; hf_align implements {losses.DPO_LOSS_TYPES}.")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError("`loss_weights` needs one weight per `loss_type`.")
        if "robust" in self.loss_type and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {self.label_smoothing}.")
        super().__post_init__()


class DPOTrainer(AlignTrainer):
    """Trains `model` on preference pairs against a reference: `ref_model` if given; with peft, the starting policy
    (its adapter disabled while that is the identity, else a frozen copy of the starting adapter); otherwise a frozen
    in-memory copy of `model` (none at all with `precompute_ref_log_probs`)."""

    config_class = DPOConfig
    algorithm = "DPO"
    paper = {"title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
             "id": "2305.18290", "citation": DPO_CITATION}
    dataset_columns = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
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
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks,
            optimizers, peft_config=peft_config, quantization_config=quantization_config,
        )
        self.setup_reference(ref_model, self.reference_logps)

    def prepare_dataset(self, dataset, name, args):
        dataset, self.dropped_rows[name] = preference.prepare_preference_dataset(
            dataset, self.tokenizer, name, args, keep_columns=("ref_chosen_logps", "ref_rejected_logps")
        )
        return dataset

    def prepare_eval_dataset(self, dataset, name):
        dataset = super().prepare_eval_dataset(dataset, name)
        return self.precompute_eval_reference(dataset, name, self.reference_logps, "ref_chosen_logps")

    def default_collator(self, args):
        return DataCollatorForPreference(
            self.tokenizer.pad_token_id, args.max_length, args.truncation_mode, args.pad_to_multiple_of,
            args.prefix_sharing, args.padding_free,
        )

    def reference_logps(self, batch) -> dict[str, torch.Tensor]:
        """Summed completion log-probs of the batch under the reference, `{"ref_chosen_logps": [B], ...}`."""
        with models.reference_model(self.model, self.ref_model) as reference:
            logps = batch_logprobs(reference, batch).sum
        chosen, rejected = logps.chunk(2)
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = batch_logprobs(model, inputs, with_stats=True)
        chosen_logps, rejected_logps = policy.sum.chunk(2)
        reference = inputs if "ref_chosen_logps" in inputs else self.reference_logps(inputs)
        chosen_logratios = chosen_logps - reference["ref_chosen_logps"]
        rejected_logratios = rejected_logps - reference["ref_rejected_logps"]
        chosen_lengths, rejected_lengths = policy.lengths.chunk(2)
        weights = self.args.loss_weights or [1.0] * len(self.args.loss_type)
        loss = sum(
            weight * losses.dpo_loss(
                loss_type, chosen_logratios, rejected_logratios, beta=self.args.beta,
                label_smoothing=self.args.label_smoothing, chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
            ).mean()
            for loss_type, weight in zip(self.args.loss_type, weights)
        )
        self._record_preference_metrics(policy, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios)
        self.record_tokens(batch_token_count(inputs))
        return (loss, {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps}) if return_outputs else loss

    def _record_preference_metrics(self, policy, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios):
        chosen_rewards = self.args.beta * chosen_logratios.detach()
        rejected_rewards = self.args.beta * rejected_logratios.detach()
        self.record_metric("rewards/chosen", chosen_rewards)
        self.record_metric("rewards/rejected", rejected_rewards)
        self.record_metric("rewards/accuracies", (chosen_rewards > rejected_rewards).float())
        self.record_metric("rewards/margins", chosen_rewards - rejected_rewards)
        self.record_metric("logps/chosen", chosen_logps)
        self.record_metric("logps/rejected", rejected_logps)
        chosen_mask, rejected_mask = policy.mask.chunk(2)
        chosen_mean_logit, rejected_mean_logit = policy.mean_logit.chunk(2)
        self.record_token_mean("logits/chosen", chosen_mean_logit, chosen_mask)
        self.record_token_mean("logits/rejected", rejected_mean_logit, rejected_mask)
        self.record_token_mean("entropy", policy.entropy, policy.mask)
        self.record_token_mean("mean_token_accuracy", policy.is_top1.chunk(2)[0].float(), chosen_mask)

    def card_hyperparameters(self) -> dict:
        return {"beta": self.args.beta, "loss_type": self.args.loss_type, "label_smoothing": self.args.label_smoothing}
