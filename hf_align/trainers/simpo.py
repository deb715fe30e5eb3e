"""SimPO: Simple Preference Optimization with a Reference-Free Reward (Meng et al., arXiv 2405.14734). The implicit
reward is the length-normalised log-likelihood `β · mean token log-prob`, pushed apart by a target margin γ; no
reference model is copied, loaded or kept beside the policy. TRL has no SimPO trainer of its own: this is
`trl.experimental.cpo.CPOTrainer` with `CPOConfig(loss_type="simpo", cpo_alpha=0)`, same constructor, dataset formats,
token ids, loss and logged metric names."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import losses
from ..config import AlignConfig, PackingArguments
from ..packing import batch_logprobs, batch_token_count
from ..preference import ReferenceFreePreferenceTrainer

SIMPO_CITATION = """@inproceedings{meng2024simpo,
    title     = {{SimPO: Simple Preference Optimization with a Reference-Free Reward}},
    author    = {Yu Meng and Mengzhou Xia and Danqi Chen},
    year      = 2024,
    booktitle = {Advances in Neural Information Processing Systems 37},
}"""


@dataclass
class SimPOConfig(AlignConfig, PackingArguments):
    """Configuration of `SimPOTrainer`, with the field names of TRL's `CPOConfig` for SimPO (`beta`, `simpo_gamma`,
    `label_smoothing`). Defaults β = 2.0 and γ = 0.5, values on SimPO's scale (the paper tunes both per model):
    TRL's CPOConfig defaults to β = 0.1, CPO's value, far below what length-normalised rewards need; its γ default is
    0.5 as here. CPO's `loss_type` and `cpo_alpha` are fixed to "simpo" and 0."""

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's CPO default)."})
    beta: float = field(default=2.0, metadata={"help": "β: scale of the reward β · mean token log-prob."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "γ: target reward margin between chosen and rejected."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "ε: probability that a pair's label is flipped (conservative loss)."}
    )

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"SimPO needs beta > 0, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        super().__post_init__()


class SimPOTrainer(ReferenceFreePreferenceTrainer):
    """Trains `model` on preference pairs with `-log σ(β·ℓ(yw) - β·ℓ(yl) - γ)`, `ℓ` the mean token log-prob of a
    completion (see `losses.simpo_loss`)."""

    config_class = SimPOConfig
    algorithm = "SimPO"
    paper = {"title": "SimPO: Simple Preference Optimization with a Reference-Free Reward", "id": "2405.14734",
             "citation": SIMPO_CITATION}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = batch_logprobs(model, inputs, with_stats=True)
        chosen_logps, rejected_logps = policy.mean.chunk(2)
        loss = losses.simpo_loss(
            chosen_logps, rejected_logps, self.args.beta, self.args.simpo_gamma, self.args.label_smoothing
        ).mean()
        self.record_pair_metrics(chosen_logps, rejected_logps, policy.mean_logit, policy.mask)
        self.record_tokens(batch_token_count(inputs))
        return (loss, {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps}) if return_outputs else loss

    def card_hyperparameters(self) -> dict:
        return {"beta": self.args.beta, "simpo_gamma": self.args.simpo_gamma,
                "label_smoothing": self.args.label_smoothing}
