"""CPO: Contrastive Preference Optimization (Xu et al., arXiv 2401.08417), and the reference-free losses TRL trains with
its CPOTrainer: hinge (SLiC), IPO, SimPO and AlphaPO's reward shape. The preference loss needs no reference model
(none is copied, loaded or kept); CPO adds an NLL term on the chosen completions. A drop-in for
`trl.experimental.cpo.CPOTrainer` / `CPOConfig`: same constructor, field names and defaults, dataset formats
(`prompt`/`chosen`/`rejected`, text or conversational, prompt implicit or explicit), token ids and logged metric
names."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import losses
from ..config import AlignConfig, PackingArguments
from ..packing import batch_token_count
from ..sequence_logprobs import batch_logprobs
from ..preference import ReferenceFreePreferenceArguments, ReferenceFreePreferenceTrainer

CPO_CITATION = """@inproceedings{xu2024contrastive,
    title     = {{Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation}},
    author    = {Haoran Xu and Amr Sharaf and Yunmo Chen and Weiting Tan and Lingfeng Shen and Benjamin Van Durme and Kenton Murray and Young Jin Kim},
    year      = 2024,
    booktitle = {Proceedings of the 41st International Conference on Machine Learning},
}"""
LOSS_TYPE_CHOICES = (*losses.CPO_LOSS_TYPES, "alphapo")  # "alphapo": TRL's shorthand, resolved by CPOConfig


@dataclass
class CPOConfig(AlignConfig, PackingArguments, ReferenceFreePreferenceArguments):
    """Configuration of `CPOTrainer`; the field names and defaults of TRL's `trl.experimental.cpo.CPOConfig`.

    `loss_type` is one of `losses.CPO_LOSS_TYPES`, or `"alphapo"`: TRL's shorthand for AlphaPO, which becomes
    `loss_type="simpo"` with `cpo_alpha=0` (whatever `cpo_alpha` was given); the reward shape is `alpha` (AlphaPO's α;
    0 is SimPO), and it applies to every loss type. `label_smoothing` applies to `sigmoid` and `simpo` only: TRL ignores
    it for `hinge` and `ipo` with a warning, here that is an error."""

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's CPO default)."})
    beta: float = field(
        default=0.1, metadata={"help": "β: scale of the reward margin in the loss (IPO's τ for loss_type='ipo')."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "ε in [0, 0.5): probability that a pair's label is flipped (conservative "
                               "sigmoid / simpo loss)."}
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "sigmoid (CPO), hinge (SLiC), ipo, simpo, or alphapo (= simpo with cpo_alpha 0).",
                  "choices": LOSS_TYPE_CHOICES},
    )
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the NLL term on the chosen completions."})
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "γ: target reward margin of loss_type='simpo' (unused by the others)."}
    )
    alpha: float = field(
        default=0.0, metadata={"help": "AlphaPO's reward shape α: reward (1 - p^-α)/α of the completion's probability "
                               "p; 0: log p (the standard reward)."}
    )

    def __post_init__(self):
        if self.loss_type == "alphapo":
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        if self.loss_type not in losses.CPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPE_CHOICES}, got {self.loss_type!r}.")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss_type not in losses.CPO_LABEL_SMOOTHING_LOSS_TYPES:
            raise ValueError(f"label_smoothing={self.label_smoothing} needs loss_type 'sigmoid' or 'simpo': "
                             f"loss_type={self.loss_type!r} has no label-smoothed form. Set label_smoothing=0.")
        if self.cpo_alpha < 0:
            raise ValueError(f"cpo_alpha, the weight of the NLL term, must be >= 0, got {self.cpo_alpha}.")
        super().__post_init__()
        self.check_reference_free_arguments()


class CPOTrainer(ReferenceFreePreferenceTrainer):
    """Trains `model` on preference pairs with `mean_B(losses.cpo_loss) + cpo_alpha · NLL(yw)`: the NLL is TRL's, the
    token mean over the chosen completions of the batch (`losses.masked_nll`); `sigmoid` and `hinge` score each
    completion by its summed log-prob, `ipo` and `simpo` by its mean token log-prob. The logged rewards are β times
    the (AlphaPO-shaped) rewards, `nll_loss` is logged when `cpo_alpha` > 0 (TRL logs a constant 0 otherwise)."""

    config_class = CPOConfig
    algorithm = "CPO"
    paper = {"title": "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine "
             "Translation", "id": "2401.08417", "citation": CPO_CITATION}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        policy = batch_logprobs(model, inputs, with_stats=True)
        logps = policy.mean if args.loss_type in losses.CPO_MEAN_LOGP_LOSS_TYPES else policy.sum
        chosen_logps, rejected_logps = logps.chunk(2)
        loss = losses.cpo_loss(
            args.loss_type, chosen_logps, rejected_logps, beta=args.beta, label_smoothing=args.label_smoothing,
            simpo_gamma=args.simpo_gamma, alpha=args.alpha,
        ).mean()
        if args.cpo_alpha:
            chosen_token_logps, chosen_mask = policy.token_logps.chunk(2)[0], policy.mask.chunk(2)[0]
            nll = losses.masked_nll(chosen_token_logps, chosen_mask)
            loss = loss + args.cpo_alpha * nll
            self.record_metric("nll_loss", nll)

        chosen_rewards = args.beta * losses.alphapo_reward(chosen_logps.detach(), args.alpha)
        rejected_rewards = args.beta * losses.alphapo_reward(rejected_logps.detach(), args.alpha)
        self.record_pair_metrics(chosen_logps, rejected_logps, policy.mean_logit, policy.mask, chosen_rewards,
                                 rejected_rewards)
        self.record_tokens(batch_token_count(inputs))
        return (loss, {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps}) if return_outputs else loss

    def card_hyperparameters(self) -> dict:
        args = self.args
        settings = {"loss_type": args.loss_type, "beta": args.beta, "cpo_alpha": args.cpo_alpha}
        if args.loss_type == "simpo":
            settings["simpo_gamma"] = args.simpo_gamma
        if args.alpha:
            settings["alpha (AlphaPO)"] = args.alpha
        if args.label_smoothing:
            settings["label_smoothing"] = args.label_smoothing
        return settings
