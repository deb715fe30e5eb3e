"""GRPO: Group Relative Policy Optimization (Shao et al., DeepSeekMath, arXiv 2402.03300), and the variants TRL
exposes through its options: Dr. GRPO (arXiv 2503.20783: `scale_rewards="none"`, `loss_type="dr_grpo"`), DAPO
(arXiv 2503.14476: `loss_type="dapo"`, `epsilon_high`, `mask_truncated_completions`) and GSPO (arXiv 2507.18071:
`importance_sampling_level="sequence"`). A drop-in for `trl.GRPOTrainer` / `trl.GRPOConfig`: same constructor,
dataset format (`prompt`, text or conversational, plus any columns the reward functions read), reward-function
signature, loss and logged metric names.

For each prompt, G completions are sampled from the policy and scored; a completion's advantage is its reward
relative to its group, `A = (r - mean_G) / (std_G + 1e-4)`; the loss is the clipped surrogate
`-min(ρA, clip(ρ, 1-ε, 1+ε_high)A)` per token plus `β · KL_k3(π ‖ π_ref)` (times ρ with
`use_bias_correction_kl`, TRL's default), aggregated as `loss_type` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import losses
from ..online import OnlineConfig, OnlineTrainer

GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")

GRPO_CITATION = """@article{shao2024deepseekmath,
    title   = {{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}},
    author  = {Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Mingchuan Zhang and Y. K. Li and Y. Wu and Daya Guo},
    year    = 2024,
    eprint  = {arXiv:2402.03300},
}"""


@dataclass
class GRPOConfig(OnlineConfig):
    """Configuration of `GRPOTrainer`: `OnlineConfig` (generation, batch arithmetic, β, ε) plus how rewards become
    advantages and how token losses are aggregated; TRL's names and defaults."""

    loss_type: str = field(
        default="dapo",
        metadata={"help": "grpo (per-sequence token mean), dr_grpo (sum / max_completion_length), dapo (token mean "
                          "over the whole generation batch) or bnpo (token mean over the micro-batch)."},
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "Divide advantages by the group's std ('group'), the batch's ('batch') or "
                                           "not at all ('none', Dr. GRPO)."}
    )
    importance_sampling_level: str = field(
        default="token", metadata={"help": "Importance ratio per token ('token') or per sequence ('sequence', GSPO)."}
    )
    use_bias_correction_kl: bool = field(
        default=True,
        metadata={"help": "Multiply the per-token KL by the importance ratio (differentiable even where it is 1), so "
                          "that its gradient is the unbiased reverse-KL gradient (DeepSeek-V3.2, arXiv 2512.02556)."},
    )

    def __post_init__(self):
        self.scale_rewards = {True: "group", False: "none", "true": "group", "false": "none"}.get(
            self.scale_rewards, self.scale_rewards)
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}; expected one of {GRPO_LOSS_TYPES}.")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}.")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError("importance_sampling_level must be 'token' or 'sequence', got "
                             f"{self.importance_sampling_level!r}.")
        super().__post_init__()


class GRPOTrainer(OnlineTrainer):
    """Trains `model` (an object or an id) on prompts with rewards from `reward_funcs`: callables with TRL's
    signature `f(prompts, completions, completion_ids, **columns) -> list[float | None]`, reward models (sequence
    classifiers, objects or ids), or a list of both (weighted by `args.reward_weights`)."""

    config_class = GRPOConfig
    algorithm = "GRPO"
    paper = {"title": "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
             "id": "2402.03300", "citation": GRPO_CITATION}

    def compute_advantages(self, rewards_per_func, rollout):
        rewards = self.reward_scorer.combine(rewards_per_func)
        scale = self.args.scale_rewards
        self.record_zero_std_groups(losses.reward_std_is_zero(rewards, self.group_size, scale))
        return losses.group_relative_advantages(rewards, self.group_size, scale)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        policy = self.rollout_logprobs(model, inputs, with_stats=True)
        logps, mask = policy.token_logps, inputs["completion_mask"].float()
        old_logps = inputs.get("old_logps", logps.detach())
        log_weights = losses.log_importance_weights(logps, old_logps, mask, level=args.importance_sampling_level)
        advantages = inputs["advantages"]
        per_token_loss = losses.clipped_surrogate_loss(log_weights, advantages, args.epsilon, args.epsilon_high)
        if args.beta != 0:
            kl = losses.k3_kl(logps, inputs["ref_logps"])
            if args.use_bias_correction_kl:
                kl = kl * torch.exp(log_weights)
            per_token_loss = per_token_loss + args.beta * kl
            self.record_token_mean("kl", kl, mask)
        loss = self.aggregate(per_token_loss, mask, inputs["num_items_in_batch"])
        self.record_token_mean("entropy", policy.entropy, mask)
        self.record_clip_fractions(log_weights, advantages, mask)
        return (loss, {"logps": logps}) if return_outputs else loss

    def aggregate(self, per_token_loss, mask, num_items_in_batch) -> torch.Tensor:
        """The micro-batch's loss under `loss_type`, before the Trainer divides it by the gradient accumulation steps
        (TRL's numbers once divided)."""
        return losses.aggregate_token_loss(
            per_token_loss, mask, self.args.loss_type, max_completion_length=self.args.max_completion_length,
            num_items_in_batch=num_items_in_batch, num_processes=self.accelerator.num_processes,
            steps_per_generation=self.args.steps_per_generation if self.model.training else 1,
        )

    def record_clip_fractions(self, log_weights, advantages, mask) -> None:
        """TRL's `clip_ratio/*`: the low / high / region fractions, and the lowest low and highest high fraction of
        any sequence."""
        fractions = losses.clip_fractions(log_weights, advantages, mask, self.args.epsilon, self.args.epsilon_high)
        for key in ("low_mean", "high_mean", "region_mean"):
            self.record_metric(f"clip_ratio/{key}", fractions[key])
        low = self.accelerator.gather(fractions["low_per_seq"].detach())
        high = self.accelerator.gather(fractions["high_per_seq"].detach())
        if (~low.isnan()).any():
            self.record_value("clip_ratio/low_min", low[~low.isnan()].min())
            self.record_value("clip_ratio/high_max", high[~high.isnan()].max())

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {"num_generations": args.num_generations, "beta": args.beta, "loss_type": args.loss_type,
                "scale_rewards": args.scale_rewards, "epsilon": args.epsilon, "epsilon_high": args.epsilon_high,
                "importance_sampling_level": args.importance_sampling_level, "temperature": args.temperature}
