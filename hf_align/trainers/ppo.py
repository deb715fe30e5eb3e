"""PPO for RLHF (Schulman et al., arXiv 1707.06347; Ouyang et al., InstructGPT, arXiv 2203.02155): the classic
actor–critic setup, with the policy, a critic, the reference and a reward model or reward functions.

Each rollout: one completion per prompt (`num_generations`, default 1) sampled from the policy; the sampling
policy's per-token log-probs and values, and the reference's log-probs, computed once. The reward of token t is
`r_t = -β · (log π_old - log π_ref)_t`, plus the completion's score on its last token (a completion that no reward
function applies to, all None, is left out of the loss); advantages and returns come from GAE(γ, λ) over the
critic's values, and the advantages are whitened over the whole batch (every process). Then
`num_iterations` PPO epochs over the rollout, each in `steps_per_generation` minibatches, minimise

    L = mean_t -min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε_high) A_t)  +  vf_coef · 0.5 · mean_t max((V-R)², (clip(V, V_old±ε_v)-R)²)

over the completion tokens of the minibatch. β is fixed, or adapted after each rollout to keep the KL near
`target_kl` (Ziegler et al., arXiv 1909.08593).

The critic (`value_model`): by default a value head (`hf_align.value.ValueHead`) on the policy's last hidden state,
trained with it: one forward pass gives log-probs and values, and under peft the policy (adapter on), the reference
(adapter disabled) and the critic (adapter and head) share one copy of the frozen base weights. Or a separate critic:
a one-label sequence classifier that uses the policy's tokenizer, trained in full (object or id; e.g. the reward
model's path, as in InstructGPT: a copy is loaded, which trains while the reward model stays fixed). Either is
attached to the policy as its `ppo_critic` submodule, so that the optimizer, DDP and gradient clipping see it; it is
left out of saved models. Checkpoints keep it apart, with β, so that a resumed run goes on exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .. import estimators, losses
from ..online import OnlineConfig, OnlineTrainer

PPO_CITATION = """@article{schulman2017proximal,
    title   = {{Proximal Policy Optimization Algorithms}},
    author  = {John Schulman and Filip Wolski and Prafulla Dhariwal and Alec Radford and Oleg Klimov},
    year    = 2017,
    eprint  = {arXiv:1707.06347},
}"""


@dataclass
class PPOConfig(OnlineConfig):
    """Configuration of `PPOTrainer`: `OnlineConfig` (generation and batch arithmetic: `num_iterations` is the number
    of PPO epochs over each rollout, `steps_per_generation` its minibatches) with PPO-RLHF defaults (the values of
    TRL's former PPOConfig where it had them), plus the KL controller, GAE and the value loss."""

    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate."})
    num_generations: int = field(default=1, metadata={"help": "Completions per prompt (PPO needs no groups)."})
    num_iterations: int = field(default=4, metadata={"help": "PPO epochs over each rollout."})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient β of the per-token reward (initial value)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt β to keep the KL near target_kl."})
    target_kl: float = field(default=6.0, metadata={"help": "Target sequence KL of the adaptive controller."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (in samples) of the adaptive controller."})
    gamma: float = field(default=1.0, metadata={"help": "Discount γ of GAE."})
    lam: float = field(default=0.95, metadata={"help": "λ of GAE."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clipping range of the value loss around V_old."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a completion without a stop token."}
    )
    min_generations: ClassVar[int] = 1

    def __post_init__(self):
        if self.beta < 0 or self.vf_coef < 0:
            raise ValueError(f"beta and vf_coef must be >= 0, got beta={self.beta}, vf_coef={self.vf_coef}.")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}.")
        if self.cliprange_value <= 0:
            raise ValueError(f"cliprange_value must be > 0, got {self.cliprange_value}.")
        if self.adaptive_kl:
            if self.beta == 0:
                # β adapts multiplicatively, so it would stay 0; and beta=0 builds no reference to measure the KL with.
                raise ValueError("adaptive_kl needs an initial beta > 0: the controller scales beta, and beta=0 "
                                 "builds no reference model to measure the KL against.")
            if self.target_kl <= 0 or self.kl_horizon <= 0:
                raise ValueError(f"target_kl and kl_horizon must be > 0, got target_kl={self.target_kl}, "
                                 f"kl_horizon={self.kl_horizon}.")
        super().__post_init__()

    def kl_controller(self) -> losses.FixedKLController | losses.AdaptiveKLController:
        if self.adaptive_kl:
            return losses.AdaptiveKLController(self.beta, self.target_kl, self.kl_horizon)
        return losses.FixedKLController(self.beta)

    def gae_estimator(self, beta: float) -> estimators.Estimator:
        """PPO's estimator with these settings and the KL coefficient `beta` (the controller's current value)."""
        return estimators.Estimator("gae", {"beta": beta, "gamma": self.gamma, "lam": self.lam,
                                            "whiten_rewards": self.whiten_rewards,
                                            "missing_eos_penalty": self.missing_eos_penalty})


class PPOTrainer(OnlineTrainer):
    """Trains `model` (an object or an id) with PPO on prompts scored by `reward_funcs` (reward models, reward
    functions with TRL's signature, or a list). `value_model`: None for a value head on the policy, or a one-label
    sequence classifier (object, id or path) as a separate critic."""

    config_class = PPOConfig
    algorithm = "PPO"
    paper = {"title": "Proximal Policy Optimization Algorithms", "id": "1707.06347", "citation": PPO_CITATION}

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: PPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        value_model=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        super().__init__(
            model, reward_funcs, args, train_dataset, eval_dataset, processing_class, reward_processing_classes,
            callbacks, optimizers, quantization_config=quantization_config, peft_config=peft_config,
            value_model=value_model,
        )

    def estimator(self):
        return self.args.gae_estimator(self.kl_controller.value)

    def needs_old_logps(self) -> bool:
        return True  # the clipped ratio's denominator (computed with the values, in one pass)

    # -- loss ------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        policy, values = self.logprobs_and_values(model, inputs, with_stats=True)
        mask = inputs.loss_mask.float()
        log_ratio = policy.token_logps - inputs.old_logps
        advantages = inputs.advantages
        policy_loss = losses.masked_mean(
            losses.clipped_surrogate_loss(log_ratio, advantages, args.epsilon, args.epsilon_high), mask)
        value_loss, value_clipfrac = losses.clipped_value_loss(
            values, inputs.values, inputs.returns, mask, args.cliprange_value)
        loss = policy_loss + args.vf_coef * value_loss

        self.record_metric("loss/policy", policy_loss)
        self.record_metric("loss/value", value_loss)
        self.record_metric("val/clipfrac", value_clipfrac)
        self.record_token_mean("policy/entropy", policy.entropy, mask)
        self.record_token_mean("policy/approxkl", 0.5 * log_ratio.detach() ** 2, mask)
        self.record_metric("policy/clipfrac", losses.clip_fractions(
            log_ratio, advantages, mask, args.epsilon, args.epsilon_high)["region_mean"])
        self.record_metric("val/explained_variance",
                           losses.explained_variance(inputs.values, inputs.returns, mask))
        self.record_token_mean("val/returns", inputs.returns, mask)
        self.record_token_mean("val/values", values.detach(), mask)
        return (loss, {"logps": policy.sum}) if return_outputs else loss

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {"beta": args.beta, "adaptive_kl": args.adaptive_kl, "gamma": args.gamma, "lam": args.lam,
                "vf_coef": args.vf_coef, "ppo_epochs": args.num_iterations,
                "minibatches": args.steps_per_generation, "critic": "separate" if self.separate_critic else "head"}

