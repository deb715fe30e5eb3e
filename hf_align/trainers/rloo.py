"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al., "Back to Basics", arXiv 2402.14740). A drop-in for
`trl.RLOOTrainer` / `trl.RLOOConfig`: same constructor, dataset format, reward functions, loss and metric names.

Each prompt gets G ≥ 2 completions. A completion's reward is its (weighted, optionally clipped) score minus
`β · Σ_t (log π_old - log π_ref)` (the sequence's first-order KL, folded into the reward as in the paper); its
advantage is that reward minus the mean reward of the *other* G - 1 completions of its prompt (optionally whitened
over the batch). The loss is PPO's clipped surrogate on the *sequence* ratio `exp(Σ_t log π - log π_old)`, averaged
over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import estimators, losses
from ..config import RouterAuxLossArguments
from ..online import OnlineConfig, OnlineTrainer
from ..reference_sync import ReferenceSyncArguments

RLOO_CITATION = """@inproceedings{ahmadian2024back,
    title     = {{Back to Basics: Revisiting REINFORCE-Style Optimization for Learning from Human Feedback in LLMs}},
    author    = {Arash Ahmadian and Chris Cremer and Matthias Gallé and Marzieh Fadaee and Julia Kreutzer and Olivier Pietquin and Ahmet Üstün and Sara Hooker},
    year      = 2024,
    booktitle = {Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics},
}"""


@dataclass
class RLOOConfig(OnlineConfig, ReferenceSyncArguments, RouterAuxLossArguments):
    """Configuration of `RLOOTrainer`: `OnlineConfig` with TRL's RLOO defaults (G = 2, β = 0.05) plus advantage
    whitening and reward clipping."""

    num_generations: int = field(default=2, metadata={"help": "Completions per prompt (k of RLOO, at least 2)."})
    beta: float = field(default=0.05, metadata={"help": "Weight of the sequence KL subtracted from the reward."})
    normalize_advantages: bool = field(
        default=False, metadata={"help": "Whiten advantages over the generation batch (mean 0, std 1)."}
    )
    reward_clip_range: list[float] | None = field(
        default=None, metadata={"help": "Clip the weighted reward to (min, max) before the KL term."}
    )

    def __post_init__(self):
        self.check_reference_sync()
        super().__post_init__()


class RLOOTrainer(OnlineTrainer):
    """Trains `model` on prompts with rewards from `reward_funcs` (callables with TRL's signature, reward models, or
    a list), with leave-one-out baselines."""

    config_class = RLOOConfig
    algorithm = "RLOO"
    paper = {"title": "Back to Basics: Revisiting REINFORCE-Style Optimization for Learning from Human Feedback in "
                      "LLMs", "id": "2402.14740", "citation": RLOO_CITATION}

    def needs_old_logps(self) -> bool:
        return True  # the KL in the reward is measured with the sampling policy

    def estimator(self):
        args = self.args
        return estimators.Estimator("leave_one_out", {"beta": self.kl_controller.value,
                                                      "normalize": args.normalize_advantages,
                                                      "reward_clip_range": args.reward_clip_range})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        policy = self.rollout_logprobs(model, inputs, with_stats=True)
        mask = inputs.loss_mask.float()
        log_ratio = losses.log_importance_weights(policy.token_logps, inputs.old_logps, mask, level="sequence_sum")
        advantages = inputs.advantages
        loss = losses.clipped_surrogate_loss(log_ratio, advantages, args.epsilon, args.epsilon_high).mean()
        loss = self.add_router_aux_loss(loss, policy)
        self.record_token_mean("entropy", policy.entropy, mask)
        fractions = losses.clip_fractions(log_ratio, advantages, mask, args.epsilon, args.epsilon_high)
        for key in ("low_mean", "high_mean", "region_mean"):
            self.record_metric(f"clip_ratio/{key}", fractions[key])
        self.record_metric("clip_ratio/low_min", fractions["low_per_seq"], reduction="min")
        self.record_metric("clip_ratio/high_max", fractions["high_per_seq"], reduction="max")
        return (loss, {"logps": policy.sum}) if return_outputs else loss

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {"num_generations": args.num_generations, "beta": args.beta, "epsilon": args.epsilon,
                "normalize_advantages": args.normalize_advantages, "temperature": args.temperature}

