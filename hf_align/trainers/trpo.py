"""TRPO for LLMs (Schulman et al., Trust Region Policy Optimization, arXiv 1502.05477): maximise the surrogate
`E[ρ_t A_t]` (ρ = π_θ / π_old per completion token) subject to `E[KL(π_old ‖ π_θ)] ≤ δ` (`max_kl`), by a natural-
gradient step: conjugate gradient on Fisher-vector products (double backprop through the token-level KL), the step
`sqrt(2δ / xᵀFx)`, and a backtracking line search that accepts a step only if its measured KL is within δ and its
measured surrogate improvement is positive and at least `accept_ratio` of the linear prediction
(`hf_align.trust_region.trpo_update`).

The search runs over the trainable parameters of the policy: the LoRA adapters under peft (the default way to use
it: vectors of the adapters' size, a few MB), or every weight in full fine-tuning, where conjugate gradient holds
4–5 vectors the size of the model and each Fisher-vector product costs about two backward passes, `cg_iterations`
of them per update: fine for small models, prohibitive at billions of parameters, where LoRA-restricted TRPO is the
practical choice.

Advantages (`advantage_estimator`): "gae", PPO's (`estimators.generalized_advantages`: per-token rewards with the KL
penalty and the score at the end, GAE over the critic's values, whitened), with the critic trained by the optimizer
on the clipped value loss (gradients reach only the critic, never the policy, whose update is the trust-region step
alone); or "grpo", group-relative (GRPO's `(r - mean_G) / (std_G + 1e-4)` over `num_generations` completions per
prompt, no critic used). One TRPO update per rollout: the whole rollout is one batch
(`per_device_train_batch_size` completions; `gradient_accumulation_steps`, `steps_per_generation` and
`num_iterations` are 1), so the Fisher matrix is taken exactly at the sampling policy. Single process only.
Logged: `trpo/kl` (the KL reached), `trpo/line_search_steps`, `trpo/cg_residual`, `trpo/accepted`,
`trpo/step_fraction`, `trpo/surrogate_improvement`, and the PPO / GRPO rollout metrics.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import estimators, losses, trust_region
from ..online import OnlineTrainer
from ..rollout import Rollout
from .ppo import PPOConfig

TRPO_CITATION = """@inproceedings{schulman2015trust,
    title     = {{Trust Region Policy Optimization}},
    author    = {John Schulman and Sergey Levine and Philipp Moritz and Michael Jordan and Pieter Abbeel},
    year      = 2015,
    booktitle = {Proceedings of the 32nd International Conference on Machine Learning},
}"""

ADVANTAGE_ESTIMATORS = ("gae", "grpo")


@dataclass
class TRPOConfig(PPOConfig):
    """Configuration of `TRPOTrainer`: `PPOConfig` (generation, KL-penalised rewards, GAE, the critic's value loss and
    its learning rate) plus the trust region. `learning_rate` trains only the critic."""

    max_kl: float = field(default=0.01, metadata={"help": "δ: the largest mean token KL(π_old ‖ π_new) of a step."})
    damping: float = field(default=0.1, metadata={"help": "λ added to the Fisher matrix (F + λI) for CG."})
    cg_iterations: int = field(default=10, metadata={"help": "Conjugate-gradient iterations (Fisher products)."})
    max_backtracks: int = field(default=10, metadata={"help": "Line-search halvings before the step is refused."})
    backtrack_ratio: float = field(default=0.5, metadata={"help": "Step shrink factor of each backtrack."})
    accept_ratio: float = field(
        default=0.1, metadata={"help": "Least fraction of the predicted surrogate gain a step must deliver."}
    )
    advantage_estimator: str = field(
        default="gae", metadata={"help": "gae (critic, PPO's rollout) or grpo (group-relative, no critic)."}
    )
    num_iterations: int = field(default=1, metadata={"help": "Must be 1: one trust-region step per rollout."})
    beta: float = field(
        default=0.0, metadata={"help": "KL-to-reference penalty in the GAE rewards (the trust region already bounds "
                                       "each step); must be 0 with advantage_estimator='grpo'."}
    )
    min_generations: ClassVar[int] = 1

    def __post_init__(self):
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got "
                             f"{self.advantage_estimator!r}.")
        if self.max_kl <= 0:
            raise ValueError(f"max_kl must be > 0, got {self.max_kl}.")
        for name in ("num_iterations", "gradient_accumulation_steps"):
            if getattr(self, name) != 1:
                raise ValueError(f"TRPO takes one trust-region step per rollout, with the Fisher matrix at the "
                                 f"sampling policy: {name} must be 1, got {getattr(self, name)}.")
        if self.steps_per_generation not in (None, 1) or self.generation_batch_size is not None:
            raise ValueError("TRPO uses the whole rollout as one batch: leave steps_per_generation and "
                             "generation_batch_size unset (set per_device_train_batch_size).")
        if self.advantage_estimator == "grpo" and (self.num_generations < 2 or self.beta != 0):
            raise ValueError("advantage_estimator='grpo' compares completions within groups (num_generations >= 2) "
                             "and has no reward penalty (beta = 0).")
        super().__post_init__()


class TRPOTrainer(OnlineTrainer):
    """Trains `model` with TRPO on prompts scored by `reward_funcs` (reward models, reward functions, or a list).
    `value_model`, for `advantage_estimator="gae"`: None for a value head on the policy, or a one-label sequence
    classifier as a separate critic; with "grpo" there is no critic."""

    config_class = TRPOConfig
    algorithm = "TRPO"
    paper = {"title": "Trust Region Policy Optimization", "id": "1502.05477", "citation": TRPO_CITATION}

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: TRPOConfig | None = None,
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
        if self.accelerator.num_processes > 1:
            raise ValueError("TRPOTrainer runs on one process: its conjugate-gradient vectors are not averaged "
                             "across processes.")
        critic_ids = {id(p) for p in self.critic.parameters()} if self.critic is not None else set()
        self.policy_parameters = [p for p in self.model.parameters() if p.requires_grad and id(p) not in critic_ids]
        self.trpo_history: list[trust_region.TRPOStats] = []  # every update's statistics (logged averaged)

    def estimator(self):
        if self.args.advantage_estimator == "gae":
            return self.args.gae_estimator(self.kl_controller.value)
        return estimators.Estimator("group_relative")

    def needs_old_logps(self) -> bool:
        return True  # the trust region is around the sampling policy

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        rollout = self._prepare_inputs(inputs)
        self._step += 1
        stats = self.trust_region_step(model, rollout)
        for key, value in (("kl", stats.kl), ("line_search_steps", stats.backtracks),
                           ("cg_residual", stats.cg_residual), ("accepted", float(stats.accepted)),
                           ("step_fraction", stats.step_fraction), ("surrogate_improvement", stats.improvement)):
            self.record_value(f"trpo/{key}", value)
        self.trpo_history.append(stats)
        if self.critic is None:
            loss = torch.tensor(-stats.surrogate_after, device=self.accelerator.device)
        else:
            loss = self.critic_step(model, rollout)
        self.check_finite_step(model, loss)
        return loss

    def trust_region_step(self, model, rollout: Rollout) -> trust_region.TRPOStats:
        mask = rollout.loss_mask.float()
        old_logps, advantages = rollout.old_logps, rollout.advantages

        def logps():
            return self.rollout_logprobs(model, rollout).token_logps

        args = self.args
        return trust_region.trpo_update(
            self.policy_parameters,
            surrogate_fn=lambda: trust_region.token_surrogate(logps(), old_logps, advantages, mask),
            kl_fn=lambda: trust_region.sampled_token_kl(logps(), old_logps, mask),
            max_kl=args.max_kl, damping=args.damping, cg_iterations=args.cg_iterations,
            accept_ratio=args.accept_ratio, backtrack_ratio=args.backtrack_ratio, max_backtracks=args.max_backtracks,
        )

    def critic_step(self, model, rollout: Rollout) -> torch.Tensor:
        """Backpropagates the clipped value loss into the critic alone (the Trainer's optimizer then steps it)."""
        mask = rollout.loss_mask.float()
        with self.frozen(self.policy_parameters):
            _, values = self.logprobs_and_values(model, rollout)
        value_loss, clipfrac = losses.clipped_value_loss(values, rollout.values, rollout.returns, mask,
                                                         self.args.cliprange_value)
        loss = self.args.vf_coef * value_loss
        self.accelerator.backward(loss)
        self.record_metric("loss/value", value_loss)
        self.record_metric("val/clipfrac", clipfrac)
        self.record_metric("val/explained_variance", losses.explained_variance(values.detach(), rollout.returns,
                                                                                mask))
        return loss.detach()

    @staticmethod
    @contextmanager
    def frozen(parameters):
        """No gradient into `parameters` inside the block (the policy's: its update is the trust-region step)."""
        for parameter in parameters:
            parameter.requires_grad_(False)
        try:
            yield
        finally:
            for parameter in parameters:
                parameter.requires_grad_(True)

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {"max_kl": args.max_kl, "damping": args.damping, "cg_iterations": args.cg_iterations,
                "advantage_estimator": args.advantage_estimator, "num_generations": args.num_generations,
                "beta": args.beta}
