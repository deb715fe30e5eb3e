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

import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from .. import losses, models
from ..online import OnlineConfig, OnlineTrainer
from ..value import ValueHead, critic_token_values, policy_logprobs_and_values

CRITIC_ATTRIBUTE = "ppo_critic"
# In each checkpoint: the critic's weights (not in the model files), as safetensors, and the KL coefficient β.
CRITIC_WEIGHTS_NAME, KL_STATE_NAME = "ppo_critic.safetensors", "ppo_kl.json"

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
        )
        # Attached after peft wrapped the policy (which freezes every parameter it does not own) and before `train()`
        # builds the optimizer and the DDP wrapper.
        if value_model is None and (self.args.prefix_sharing or self.args.padding_free):
            raise ValueError("prefix_sharing and padding_free need a separate value_model: the value head on the "
                             "policy reads its hidden states row by row.")
        critic = ValueHead.for_model(self.model) if value_model is None else self.separate_critic_model(value_model)
        setattr(models.unwrap_causal_lm(self.model), CRITIC_ATTRIBUTE, critic.to(self.accelerator.device))
        controller = losses.AdaptiveKLController if self.args.adaptive_kl else None
        self.kl_controller = (controller(self.args.beta, self.args.target_kl, self.args.kl_horizon) if controller
                              else losses.FixedKLController(self.args.beta))

    def separate_critic_model(self, value_model):
        """`value_model` (an id / path, loaded as a one-label sequence classifier, or a model) checked and prepared as
        a critic that reads the policy's token ids."""
        if isinstance(value_model, str):
            value_model = models.load_model(value_model, self.args, AutoModelForSequenceClassification, num_labels=1)
        classifier = models.check_one_label_classifier(
            value_model, "value_model must be", "Pass its id or path to load it as one, or None for a value head on "
            "the policy.")
        if any(classifier is models.unwrap_causal_lm(func) for func in self.reward_scorer.reward_funcs
               if isinstance(func, torch.nn.Module)):
            # Training the critic would change the rewards it is trained to predict.
            raise ValueError("value_model must not be the same object as a reward model: pass the reward model's id "
                             "or path as value_model to train a copy of it.")
        vocabulary = classifier.get_input_embeddings().num_embeddings
        if vocabulary < len(self.tokenizer):
            raise ValueError(
                f"value_model has {vocabulary} token embeddings but the policy's tokenizer has {len(self.tokenizer)} "
                "tokens: the critic reads the policy's token ids, so it must use the same tokenizer."
            )
        models.prepare_tokenizer(self.tokenizer, classifier)  # its pooling finds the last token by the pad id
        if self.args.disable_dropout:
            models.disable_dropout(value_model)
        return value_model

    @property
    def critic(self):
        return getattr(models.unwrap_causal_lm(self.model), CRITIC_ATTRIBUTE)

    @property
    def separate_critic(self) -> bool:
        return not isinstance(self.critic, ValueHead)

    def logprobs_and_values(self, model, rollout: dict, with_stats: bool = False, batch_size: int | None = None):
        """Per-token log-probs (`CompletionLogProbs`) and values `[N, C]` of the rollout's completions."""
        temperature = self.args.temperature
        if not self.separate_critic:
            return policy_logprobs_and_values(model, self.critic, rollout, temperature=temperature,
                                              with_stats=with_stats, batch_size=batch_size)
        logps = self.rollout_logprobs(model, rollout, with_stats=with_stats, batch_size=batch_size)
        return logps, critic_token_values(self.critic, rollout, batch_size=batch_size)

    # -- rollouts --------------------------------------------------------------------------------------------------
    def needs_old_logps(self) -> bool:
        return False  # computed with the values in `compute_advantages`, in one pass

    def score_rollout(self, rows: list[dict]) -> dict:
        rollout = super().score_rollout(rows)
        width = rollout["completion_ids"].size(1)
        rollout["advantages"] = rollout["advantages"][:, :width]  # gathered at the widest process's width
        return rollout

    def compute_advantages(self, rewards_per_func, rollout):
        args = self.args
        batch_size = args.per_device_train_batch_size if self.model.training else args.per_device_eval_batch_size
        with torch.no_grad():
            old, values = self.logprobs_and_values(self.model, rollout, batch_size=batch_size)
        rollout["old_logps"], rollout["old_values"] = old.token_logps, values
        scores = self.reward_scorer.combine(rewards_per_func)[self.local_rows(rollout["completion_ids"].size(0))]
        # A completion no reward function applies to (NaN) has no score to learn from: it leaves the loss.
        scorable = ~torch.isnan(scores)
        rollout["completion_mask"] = rollout["completion_mask"] * scorable[:, None]
        mask = rollout["completion_mask"].float()
        scores = scores.nan_to_num(0.0)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * rollout["is_truncated"].float()
        token_kl = (old.token_logps - rollout["ref_logps"]) * mask if "ref_logps" in rollout else torch.zeros_like(mask)
        beta = self.kl_controller.value
        token_rewards = losses.kl_penalised_token_rewards(scores, token_kl, mask, beta)
        if args.whiten_rewards:
            token_rewards = self.whiten_over_processes(token_rewards, mask, shift_mean=False)
        advantages, returns = losses.generalized_advantage_estimation(token_rewards, values, mask, args.gamma,
                                                                      args.lam)
        rollout["returns"] = returns
        sequence_kl = self.accelerator.gather(token_kl.sum(-1))
        self.record_value("objective/kl", sequence_kl.mean())
        self.record_value("objective/kl_coef", beta)
        self.record_value("objective/scores", self.accelerator.gather(scores).mean())
        self.record_value("objective/rlhf_reward", (self.accelerator.gather(scores) - beta * sequence_kl).mean())
        if self.model.training:
            self.kl_controller.update(sequence_kl.mean().item(), sequence_kl.numel())
        return self.gather_tokens(self.whiten_over_processes(advantages, mask))

    def whiten_over_processes(self, values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True):
        """`losses.masked_whiten` with the mean and variance of every process's tokens."""
        return losses.masked_whiten(self.gather_tokens(values), self.gather_tokens(mask), shift_mean=shift_mean)[
            self.local_rows(values.size(0)), : values.size(1)]

    # -- loss ------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        policy, values = self.logprobs_and_values(model, inputs, with_stats=True)
        mask = inputs["completion_mask"].float()
        log_ratio = policy.token_logps - inputs["old_logps"]
        advantages = inputs["advantages"]
        policy_loss = losses.masked_mean(
            losses.clipped_surrogate_loss(log_ratio, advantages, args.epsilon, args.epsilon_high), mask)
        value_loss, value_clipfrac = losses.clipped_value_loss(
            values, inputs["old_values"], inputs["returns"], mask, args.cliprange_value)
        loss = policy_loss + args.vf_coef * value_loss

        self.record_metric("loss/policy", policy_loss)
        self.record_metric("loss/value", value_loss)
        self.record_metric("val/clipfrac", value_clipfrac)
        self.record_token_mean("policy/entropy", policy.entropy, mask)
        self.record_token_mean("policy/approxkl", 0.5 * log_ratio.detach() ** 2, mask)
        self.record_metric("policy/clipfrac", losses.clip_fractions(
            log_ratio, advantages, mask, args.epsilon, args.epsilon_high)["region_mean"])
        self.record_metric("val/explained_variance",
                           losses.explained_variance(inputs["old_values"], inputs["returns"], mask))
        self.record_token_mean("val/returns", inputs["returns"], mask)
        self.record_token_mean("val/values", values.detach(), mask)
        return (loss, {"logps": policy.sum}) if return_outputs else loss

    # -- saving ----------------------------------------------------------------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        # The saved model is the policy alone: the critic is training machinery. A state dict gathered by DeepSpeed /
        # FSDP is kept, less the critic's entries.
        if state_dict is not None:
            state_dict = {key: value for key, value in state_dict.items() if CRITIC_ATTRIBUTE not in key.split(".")}
        unwrapped = models.unwrap_causal_lm(self.model)
        critic = getattr(unwrapped, CRITIC_ATTRIBUTE)
        delattr(unwrapped, CRITIC_ATTRIBUTE)
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            setattr(unwrapped, CRITIC_ATTRIBUTE, critic)

    def save_training_state(self, checkpoint: str) -> None:
        super().save_training_state(checkpoint)
        if self.args.should_save:
            # `clone`: tied or shared tensors cannot be saved as safetensors views.
            save_file({name: tensor.detach().clone().contiguous() for name, tensor in self.critic.state_dict().items()},
                      os.path.join(checkpoint, CRITIC_WEIGHTS_NAME))
            with open(os.path.join(checkpoint, KL_STATE_NAME), "w") as file:
                json.dump({"kl_coef": self.kl_controller.value}, file)

    def load_training_state(self, checkpoint: str) -> None:
        super().load_training_state(checkpoint)
        weights = load_file(os.path.join(checkpoint, CRITIC_WEIGHTS_NAME), device=str(self.accelerator.device))
        self.critic.load_state_dict(weights)
        with open(os.path.join(checkpoint, KL_STATE_NAME)) as file:
            self.kl_controller.value = json.load(file)["kl_coef"]

    def _issue_warnings_after_load(self, load_result):
        # The model files of a checkpoint lack the critic by design: `load_training_state` restores it.
        load_result.missing_keys[:] = [key for key in load_result.missing_keys
                                       if CRITIC_ATTRIBUTE not in key.split(".")]
        super()._issue_warnings_after_load(load_result)

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {"beta": args.beta, "adaptive_kl": args.adaptive_kl, "gamma": args.gamma, "lam": args.lam,
                "vf_coef": args.vf_coef, "ppo_epochs": args.num_iterations,
                "minibatches": args.steps_per_generation, "critic": "separate" if self.separate_critic else "head"}

