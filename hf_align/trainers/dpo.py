"""DPO: Direct Preference Optimization (Rafailov et al., arXiv 2305.18290) and the variants of TRL 1.16's `DPOTrainer`:
every loss type of `losses.DPO_LOSS_TYPES` (alone or weighted together, e.g. MPO's `["sigmoid", "bco_pair", "sft"]`),
cDPO label smoothing, f-divergence regularisers (f-DPO), WPO weighting, LD-DPO and TR-DPO's reference updates. A
drop-in for `trl.DPOTrainer` / `trl.DPOConfig`: same constructor, dataset formats (`prompt`/`chosen`/`rejected`, text or
conversational, prompt implicit or explicit) and logged metric names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import losses, models, preference
from ..config import (
    ActivationOffloadingArguments,
    AlignConfig,
    PackingArguments,
    PadTokenArguments,
    ReferenceArguments,
    RouterAuxLossArguments,
)
from ..logprobs import CompletionLogProbs
from ..packing import batch_token_count
from ..sequence_logprobs import batch_logprobs
from ..preference import DataCollatorForPreference
from ..reference_sync import ReferenceSync, ReferenceSyncArguments
from ..trainer import AlignTrainer

DPO_CITATION = """@inproceedings{rafailov2023direct,
    title     = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
    author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
    year      = 2023,
    booktitle = {Advances in Neural Information Processing Systems 36},
}"""


@dataclass
class DPOConfig(AlignConfig, PackingArguments, ReferenceArguments, ReferenceSyncArguments, PadTokenArguments,
                ActivationOffloadingArguments, RouterAuxLossArguments):
    """Configuration of `DPOTrainer`; TRL's field names and defaults.

    `loss_type` is one of `losses.DPO_LOSS_TYPES` or a list of them, combined with `loss_weights`.
    `label_smoothing` ε: for `sigmoid` (and `sigmoid_norm`, `aot`, `aot_unpaired`) it gives cDPO, for `robust` the
    label-flip rate, for `exo_pair` EXO's ε. Settings that cannot work raise a ValueError naming the field."""

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's DPO default)."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"One or more of {losses.DPO_LOSS_TYPES}; several are added up with `loss_weights`."},
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per `loss_type` (MPO, for instance, weighs sigmoid, bco_pair and sft); "
                  "default: 1 each."},
    )
    ld_alpha: float | None = field(
        default=None,
        metadata={"help": "LD-DPO's α in [0, 1]: weight of the tokens of the longer completion past the length of the "
                  "shorter one, in both completions' log-probs (None or 1: plain sums; 0: only the shared length)."},
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={"help": f"f-DPO's divergence to the reference, one of {losses.F_DIVERGENCE_TYPES}; other than "
                  f"reverse_kl only with the loss types {losses.F_DIVERGENCE_LOSS_TYPES}."},
    )
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "α of f_divergence_type='alpha_divergence'."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "ε: cDPO label smoothing (sigmoid, sigmoid_norm, aot*), robust DPO's label-flip rate in "
                  "[0, 0.5), EXO's ε in (0, 1) (the paper suggests 1e-3)."},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "β: strength of the implicit KL to the reference (IPO's τ for loss_type='ipo')."},
    )
    use_weighting: bool = field(
        default=False,
        metadata={"help": "WPO: weigh each pair's loss by the policy's length-normalised probabilities of its two "
                  "completions (one more forward pass without gradient per batch)."},
    )
    discopop_tau: float = field(
        default=0.05, metadata={"help": "τ > 0 of loss_type='discopop', the temperature of its blend."}
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad sequence lengths to a multiple of this ('auto': none; TRL pads to 128 "
                                  "on AWS Neuron only)."}
    )

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        unknown = [t for t in self.loss_type if t not in losses.DPO_LOSS_TYPES]
        if unknown:
            raise ValueError(f"Unknown loss_type {unknown}; hf_align implements {losses.DPO_LOSS_TYPES}.")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError("`loss_weights` needs one weight per `loss_type`.")
        if self.f_divergence_type not in losses.F_DIVERGENCE_TYPES:
            raise ValueError(f"f_divergence_type must be one of {losses.F_DIVERGENCE_TYPES}, got "
                             f"{self.f_divergence_type!r}.")
        without_f_form = [t for t in self.loss_type if t not in losses.F_DIVERGENCE_LOSS_TYPES]
        if self.f_divergence_type != "reverse_kl" and without_f_form:
            raise ValueError(
                f"f_divergence_type={self.f_divergence_type!r} applies only to the loss types built on the "
                f"chosen-minus-rejected score, {losses.F_DIVERGENCE_LOSS_TYPES}; loss_type {without_f_form} needs "
                "f_divergence_type='reverse_kl'."
            )
        if "robust" in self.loss_type and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {self.label_smoothing}.")
        if "exo_pair" in self.loss_type and not 0.0 < self.label_smoothing < 1.0:
            raise ValueError(f"loss_type='exo_pair' needs 0 < label_smoothing < 1 (EXO's ε; the paper suggests 1e-3), "
                             f"got {self.label_smoothing}.")
        if "discopop" in self.loss_type and self.discopop_tau <= 0:
            raise ValueError(f"discopop_tau must be positive, got {self.discopop_tau}.")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1] (or None), got {self.ld_alpha}.")
        sorting = [t for t in self.loss_type if t in ("aot", "aot_unpaired")]
        if self.use_weighting and sorting:
            raise ValueError(f"use_weighting=True (WPO) weighs each pair, but loss_type {sorting} sorts the batch and "
                             "loses the pairs: turn one of them off.")
        self.check_reference_sync()
        super().__post_init__()


class DPOLoss:
    """DPO's loss on a collated batch of pairs (`DataCollatorForPreference`), with the metrics TRL logs for it recorded
    on `trainer` (whose `args` are a `DPOConfig`): `DPOTrainer`'s loss, and each SPIN round's."""

    def __init__(self, trainer: AlignTrainer):
        self.trainer = trainer

    @property
    def args(self) -> DPOConfig:
        return self.trainer.args

    def pair_logps(self, logprobs: CompletionLogProbs) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and the rejected completions' log-probs, `[B]` each, from a batch's `[2B, ...]` token log-probs:
        their sums, or with `ld_alpha` LD-DPO's (`losses.length_desensitized_logps`). The same for the policy and the
        reference."""
        if self.args.ld_alpha is None:
            return logprobs.sum.chunk(2)
        (chosen, rejected), (chosen_mask, rejected_mask) = logprobs.token_logps.chunk(2), logprobs.mask.chunk(2)
        return losses.length_desensitized_logps(chosen, chosen_mask, rejected, rejected_mask, self.args.ld_alpha)

    def __call__(self, model, inputs, reference_logps=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(loss, {"chosen_logps", "rejected_logps"})` of the batch `inputs` under `model`. The reference log-probs
        are the batch's `ref_chosen_logps` / `ref_rejected_logps`, or `reference_logps(inputs)` where it has none."""
        policy = batch_logprobs(model, inputs, with_stats=True)
        chosen_logps, rejected_logps = self.pair_logps(policy)
        reference = inputs if "ref_chosen_logps" in inputs else reference_logps(inputs)
        chosen_logratios = chosen_logps - reference["ref_chosen_logps"]
        rejected_logratios = rejected_logps - reference["ref_rejected_logps"]
        per_pair = self.pair_losses(policy, chosen_logratios, rejected_logratios, reference)
        if self.args.use_weighting:
            per_pair = per_pair * self.wpo_pair_weights(model, inputs, policy)
        loss = self.trainer.add_router_aux_loss(per_pair.mean(), policy)
        self.record_metrics(policy, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios)
        self.trainer.record_tokens(batch_token_count(inputs))
        return loss, {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps}

    def pair_losses(self, policy: CompletionLogProbs, chosen_logratios, rejected_logratios, reference) -> torch.Tensor:
        """`Σ_k loss_weights[k] · loss_type[k]` per pair, `[B]` (`losses.dpo_loss`); TRL's loss is its batch mean."""
        args = self.args
        chosen_lengths, rejected_lengths = policy.lengths.chunk(2)
        chosen_nll = None
        if "sft" in args.loss_type:
            chosen_nll = losses.masked_nll(policy.token_logps.chunk(2)[0], policy.mask.chunk(2)[0])
        weights = args.loss_weights or [1.0] * len(args.loss_type)
        return sum(
            weight * losses.dpo_loss(
                loss_type, chosen_logratios, rejected_logratios, beta=args.beta, label_smoothing=args.label_smoothing,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                reference_margins=reference["ref_chosen_logps"] - reference["ref_rejected_logps"],
                chosen_nll=chosen_nll, f_divergence_type=args.f_divergence_type,
                f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
            )
            for loss_type, weight in zip(args.loss_type, weights)
        )

    @staticmethod
    def wpo_pair_weights(model, inputs, policy: CompletionLogProbs) -> torch.Tensor:
        """WPO's weight `w(yw) · w(yl)` of each pair, `[B]`, without gradient (`losses.wpo_weights`). Each token's
        `log Σ_v π(v)²` is `2 logp(y_t) - logp_{T=1/2}(y_t)` (for logits z, `log softmax(2z)_y = 2 z_y - logsumexp(2z)`):
        the chunked log-probs never hold a whole row of logits after the pass, so the temperature-1/2 ones take a second
        forward pass."""
        with torch.no_grad():
            sharpened = batch_logprobs(model, inputs, temperature=0.5)
        token_logps = policy.token_logps.detach()
        weights = losses.wpo_weights(token_logps, 2 * token_logps - sharpened.token_logps, policy.mask)
        chosen, rejected = weights.chunk(2)
        return chosen * rejected

    def card_hyperparameters(self) -> dict:
        """The `DPOConfig` fields a model card lists."""
        names = ("beta", "loss_type", "loss_weights", "label_smoothing", "f_divergence_type", "use_weighting",
                 "ld_alpha", "sync_ref_model")
        return {name: getattr(self.args, name) for name in names}

    def record_metrics(self, policy, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios) -> None:
        trainer = self.trainer
        chosen_rewards = self.args.beta * chosen_logratios.detach()
        rejected_rewards = self.args.beta * rejected_logratios.detach()
        trainer.record_metric("rewards/chosen", chosen_rewards)
        trainer.record_metric("rewards/rejected", rejected_rewards)
        trainer.record_metric("rewards/accuracies", (chosen_rewards > rejected_rewards).float())
        trainer.record_metric("rewards/margins", chosen_rewards - rejected_rewards)
        trainer.record_metric("logps/chosen", chosen_logps)
        trainer.record_metric("logps/rejected", rejected_logps)
        chosen_mask, rejected_mask = policy.mask.chunk(2)
        chosen_mean_logit, rejected_mean_logit = policy.mean_logit.chunk(2)
        trainer.record_token_mean("logits/chosen", chosen_mean_logit, chosen_mask)
        trainer.record_token_mean("logits/rejected", rejected_mean_logit, rejected_mask)
        trainer.record_token_mean("entropy", policy.entropy, policy.mask)
        trainer.record_token_mean("mean_token_accuracy", policy.is_top1.chunk(2)[0].float(), chosen_mask)


class DPOTrainer(AlignTrainer):
    """Trains `model` on preference pairs against a reference: `ref_model` if given; with peft, the starting policy
    (its adapter disabled while that is the identity, else a frozen copy of the starting adapter); otherwise a frozen
    in-memory copy of `model` (none at all with `precompute_ref_log_probs`). The loss is `DPOLoss`'s."""

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
        self.dpo_loss = DPOLoss(self)
        self.setup_reference(ref_model, self.reference_logps)
        self.reference_sync = ReferenceSync.attach(self)

    def prepare_dataset(self, dataset, name, args):
        dataset, self.dropped_rows[name] = preference.prepare_preference_dataset(
            dataset, self.tokenizer, name, args, keep_columns=("ref_chosen_logps", "ref_rejected_logps")
        )
        return dataset

    def prepare_eval_dataset(self, dataset, name):
        dataset = super().prepare_eval_dataset(dataset, name)
        return self.precompute_eval_reference(dataset, name, self.reference_logps, "ref_chosen_logps")

    def default_collator(self, args):
        return DataCollatorForPreference.from_config(self.tokenizer.pad_token_id, args)

    def reference_logps(self, batch) -> dict[str, torch.Tensor]:
        """The batch's completion log-probs under the reference (`DPOLoss.pair_logps`),
        `{"ref_chosen_logps": [B], ...}`."""
        with models.reference_model(self.model, self.ref_model) as reference:
            chosen, rejected = self.dpo_loss.pair_logps(batch_logprobs(reference, batch))
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self.dpo_loss(model, inputs, self.reference_logps)
        return (loss, outputs) if return_outputs else loss

    def card_hyperparameters(self) -> dict:
        return self.dpo_loss.card_hyperparameters()
