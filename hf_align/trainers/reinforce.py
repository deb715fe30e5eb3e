"""REINFORCE (Williams 1992) and REINFORCE++ (Hu et al., arXiv 2501.03262): policy gradients from returns-to-go, with
no critic.

Both build the same per-token rewards and returns. A completion's (weighted) score `r` is its reward at its last token
(EOS, or the truncation point); with `beta > 0` every token also gets `-β KL_t`, the first-order (k1) estimate
`KL_t = log π_old(a_t) - log π_ref(a_t)` measured with the sampling policy. The return-to-go is

    G_t = Σ_{s ≥ t} γ^(s-t) r_s                    (`losses.kl_penalised_token_rewards`, `losses.discounted_returns`)

**REINFORCE** (`ReinforceTrainer`): the loss `-Σ_t (G_t - b) log π(a_t)`, summed over each completion's tokens and
averaged over completions (`losses.reinforce_loss`). The baseline `b` of a completion is the mean total return `G_0`
of the *other* G - 1 completions of its prompt (RLOO's leave-one-out mean, arXiv 2402.14740): it does not depend on
the completion itself, so the gradient stays unbiased (a mean that included it would shrink the gradient by (G-1)/G).
With γ = 1 and β = 0, `G_t - b = r - mean_{j≠i} r_j` on every token. Plain REINFORCE has no importance ratio, so its
Config refuses settings that train on a completion after the policy has moved (an optimizer step between sampling and
the completion's last use: `num_iterations > 1`, or a generation batch spread over more optimizer steps).

**REINFORCE++** (`ReinforcePPTrainer`): the score is clipped to `reward_clip_range` before it enters the returns, and
the returns of every token of every completion of the whole generation batch (all processes) are whitened together,
`A_t = (G_t - μ) / sqrt(σ² + 1e-8)` (§3, global advantage normalisation; `losses.masked_whiten`), not per group. The
`"reinforce++_baseline"` estimator (§3.2) first subtracts from each score the mean score of its prompt's group. The
loss is PPO's clipped surrogate per token (arXiv 1707.06347), `-min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε_high) A_t)` with
`ρ_t = π(a_t) / π_old(a_t)`, averaged over every completion token of the generation batch (the `"dapo"` aggregation
of `losses.aggregate_token_loss`, independent of how the batch is split into micro-batches).

Where REINFORCE++ here differs from the paper: its baseline variant recommends a k2 KL term in the loss instead of the
KL in the reward; here both estimators keep the k1 KL in the reward (ALGORITHMS.md), and `beta=0` drops it.

Several processes: the returns are per token, and each process's completions are padded only to its own longest. The
completion masks and KL estimates are padded to the longest completion of any process before they are gathered
(`OnlineTrainer.gather_tokens`), so the returns and the whitening see the whole batch; each process then keeps its own
rows of the `[N_all, C_max]` advantages, cut back to its own width (`OnlineTrainer.local_part`). The estimators are
`estimators.reinforce_returns` and `estimators.reinforce_plus_plus`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .. import estimators, losses
from ..online import OnlineConfig, OnlineTrainer

ADVANTAGE_ESTIMATORS = ("reinforce++", "reinforce++_baseline")

REINFORCE_PP_CITATION = """@article{hu2025reinforce,
    title   = {{REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Normalization}},
    author  = {Jian Hu and Jason Klein Liu and Haotian Xu and Wei Shen},
    year    = 2025,
    eprint  = {arXiv:2501.03262},
}"""


@dataclass
class ReinforceConfig(OnlineConfig):
    """Configuration of `ReinforceTrainer`: `OnlineConfig` plus the discount γ. `beta > 0` adds the per-token KL
    penalty to the rewards."""

    # Plain REINFORCE has no importance ratio: every completion must be trained on by the policy that sampled it.
    on_policy: ClassVar[bool] = True

    gamma: float = field(default=1.0, metadata={"help": "Discount of the returns-to-go, in (0, 1]."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}.")
        # The condition of `OnlineTrainer.needs_old_logps`: no optimizer step between sampling and last use.
        uses_per_generation = self.steps_per_generation * self.num_iterations
        if self.on_policy and self.gradient_accumulation_steps % uses_per_generation:
            raise ValueError(
                "REINFORCE is on-policy: an optimizer step may only use completions sampled by the policy it updates, "
                f"so gradient_accumulation_steps ({self.gradient_accumulation_steps}) must be a multiple of "
                f"steps_per_generation × num_iterations ({self.steps_per_generation} × {self.num_iterations}). Set "
                "num_iterations=1 and steps_per_generation (or generation_batch_size) to divide the accumulation, or "
                "use ReinforcePPTrainer, whose clipped importance ratio allows reuse."
            )


class ReinforceTrainer(OnlineTrainer):
    """Trains `model` on prompts with rewards from `reward_funcs` (callables with TRL's signature, reward models, or
    a list) by REINFORCE with a leave-one-out baseline."""

    config_class = ReinforceConfig
    algorithm = "REINFORCE"
    paper = {}  # Williams (1992) has no arXiv id, which the model card links to.

    def estimator(self):
        return estimators.Estimator("reinforce_returns", {"beta": self.kl_controller.value, "gamma": self.args.gamma})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = self.rollout_logprobs(model, inputs, with_stats=True)
        mask = inputs.loss_mask.float()
        loss = losses.reinforce_loss(policy.token_logps, inputs.advantages, mask)
        self.record_token_mean("entropy", policy.entropy, mask)
        return (loss, {"logps": policy.token_logps}) if return_outputs else loss

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {"num_generations": args.num_generations, "beta": args.beta, "gamma": args.gamma,
                "temperature": args.temperature, "max_completion_length": args.max_completion_length}


@dataclass
class ReinforcePPConfig(ReinforceConfig):
    """Configuration of `ReinforcePPTrainer`: `ReinforceConfig` plus the advantage estimator and the score clip, with
    the KL penalty on by default (OpenRLHF's `init_kl_coef`)."""

    on_policy: ClassVar[bool] = False  # the clipped ratio allows training on a generation batch several times
    min_generations: ClassVar[int] = 1  # the paper's plain estimator samples one completion per prompt

    beta: float = field(default=0.01, metadata={"help": "Weight of the per-token k1 KL penalty in the rewards."})
    advantage_estimator: str = field(
        default="reinforce++",
        metadata={"help": "reinforce++ (scores as they are) or reinforce++_baseline (minus their group's mean score "
                          "first); both are then whitened over the whole batch."},
    )
    reward_clip_range: list[float] | None = field(
        default_factory=lambda: [-10.0, 10.0],
        metadata={"help": "Clip the score to [min, max] before it enters the returns (OpenRLHF's default)."},
    )

    def __post_init__(self):
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"Unknown advantage_estimator {self.advantage_estimator!r}; expected one of "
                             f"{ADVANTAGE_ESTIMATORS}.")
        if self.advantage_estimator == "reinforce++_baseline" and self.num_generations < 2:
            raise ValueError("advantage_estimator='reinforce++_baseline' subtracts the mean score of each prompt's "
                             f"group: num_generations must be at least 2, got {self.num_generations}.")
        clip = self.reward_clip_range
        if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
            raise ValueError(f"reward_clip_range must be [min, max] with min < max, got {clip}.")
        super().__post_init__()


class ReinforcePPTrainer(ReinforceTrainer):
    """Trains `model` on prompts with rewards from `reward_funcs` (callables with TRL's signature, reward models, or
    a list) by REINFORCE++: KL-penalised returns whitened over the whole batch, PPO-clipped."""

    config_class = ReinforcePPConfig
    algorithm = "REINFORCE++"
    paper = {"title": "REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Normalization",
             "id": "2501.03262", "citation": REINFORCE_PP_CITATION}

    def estimator(self):
        args = self.args
        return estimators.Estimator("reinforce++", {
            "beta": self.kl_controller.value, "gamma": args.gamma, "reward_clip_range": args.reward_clip_range,
            "group_baseline": args.advantage_estimator == "reinforce++_baseline"})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        policy = self.rollout_logprobs(model, inputs, with_stats=True)
        logps, mask = policy.token_logps, inputs.loss_mask.float()
        log_ratio = logps - (inputs.old_logps if inputs.old_logps is not None else logps.detach())
        advantages = inputs.advantages
        per_token_loss = losses.clipped_surrogate_loss(log_ratio, advantages, args.epsilon, args.epsilon_high)
        loss = losses.aggregate_token_loss(
            per_token_loss, mask, "dapo", num_items_in_batch=inputs.num_items_in_batch,
            num_processes=self.accelerator.num_processes,
            steps_per_generation=args.steps_per_generation if self.model.training else 1,
        )
        self.record_token_mean("entropy", policy.entropy, mask)
        fractions = losses.clip_fractions(log_ratio, advantages, mask, args.epsilon, args.epsilon_high)
        for key in ("low_mean", "high_mean", "region_mean"):
            self.record_metric(f"clip_ratio/{key}", fractions[key])
        return (loss, {"logps": logps}) if return_outputs else loss

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {**super().card_hyperparameters(), "advantage_estimator": args.advantage_estimator,
                "reward_clip_range": args.reward_clip_range, "epsilon": args.epsilon,
                "epsilon_high": args.epsilon_high}
