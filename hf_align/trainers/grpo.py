"""GRPO: Group Relative Policy Optimization (Shao et al., DeepSeekMath, arXiv 2402.03300), and the variants TRL
exposes through its options: Dr. GRPO (arXiv 2503.20783: `scale_rewards="none"`, `loss_type="dr_grpo"`), DAPO
(arXiv 2503.14476: `loss_type="dapo"`, `epsilon_high`, `mask_truncated_completions`), GSPO (arXiv 2507.18071:
`importance_sampling_level="sequence"`), the other policy losses of TRL 1.16's `loss_type` (CISPO, SAPO, LUSPO,
VESPO), two-sided clipping (`delta`), high-entropy token selection (`top_entropy_quantile`), off-policy sequence
masking (`off_policy_mask_threshold`), an entropy bonus (fixed or adaptive) and reward-decoupled normalisation of
several rewards (`multi_objective_aggregation="normalize_then_sum"`, GDPO). A drop-in for `trl.GRPOTrainer` /
`trl.GRPOConfig`: same constructor, dataset format (`prompt`, text or conversational, plus any columns the reward
functions read), reward-function signature, loss and logged metric names.

For each prompt, G completions are sampled from the policy and scored; a completion's advantage is its reward
relative to its group, `A = (r - mean_G) / (std_G + 1e-4)`; the loss is the clipped surrogate
`-min(ρA, clip(ρ, 1-ε, 1+ε_high)A)` per token (or the `loss_type`'s) plus `β · KL_k3(π ‖ π_ref)` (times ρ
with `use_bias_correction_kl`, TRL's default), aggregated as `loss_type` says.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import distributed, estimators, losses, models
from .. import tools as tools_module
from ..generation import stop_token_ids
from ..config import RouterAuxLossArguments, VLLMImportanceSamplingArguments
from ..online import OnlineConfig, OnlineTrainer
from ..reference_sync import ReferenceSyncArguments
from ..rollout import token_rollout

GRPO_LOSS_TYPES = losses.PG_LOSS_TYPES
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
ENTROPY_CONTROLLER_STATE = "entropy_controller.json"

GRPO_CITATION = """@article{shao2024deepseekmath,
    title   = {{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}},
    author  = {Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Mingchuan Zhang and Y. K. Li and Y. Wu and Daya Guo},
    year    = 2024,
    eprint  = {arXiv:2402.03300},
}"""


@dataclass
class GRPOConfig(OnlineConfig, VLLMImportanceSamplingArguments, ReferenceSyncArguments, RouterAuxLossArguments):
    """Configuration of `GRPOTrainer`: `OnlineConfig` (generation, batch arithmetic, β, ε) plus how rewards become
    advantages and how token losses are formed and aggregated; TRL's names and defaults. TRL's vLLM importance
    sampling fields are accepted (they only act with `use_vllm=True`, which raises)."""

    loss_type: str = field(
        default="dapo",
        metadata={"help": "grpo (per-sequence token mean), dr_grpo (sum / max_completion_length), dapo (token mean "
                          "over the whole generation batch), bnpo (token mean over the micro-batch), cispo (truncated "
                          "importance weights, arXiv 2506.13585), sapo (soft gate, arXiv 2511.20347), luspo "
                          "(sequence sums, arXiv 2602.05261; needs importance_sampling_level='sequence') or vespo "
                          "(Gamma-kernel sequence weights, arXiv 2602.10693)."},
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "Divide advantages by the group's std ('group'), the batch's ('batch') or "
                                           "not at all ('none', Dr. GRPO)."}
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={"help": "With several reward functions: sum the weighted rewards, then normalise as scale_rewards "
                          "says ('sum_then_normalize'); or normalise each function within its group, sum, and whiten "
                          "over the batch ('normalize_then_sum', GDPO, arXiv 2601.05242)."},
    )
    importance_sampling_level: str = field(
        default="token", metadata={"help": "Importance ratio per token ('token') or per sequence ('sequence', GSPO)."}
    )
    delta: float | None = field(
        default=None,
        metadata={"help": "Two-sided clipping (INTELLECT-2, arXiv 2505.07291): also cap the unclipped ratio at delta, "
                          "so a negative-advantage token cannot push with an unbounded ratio. Must exceed "
                          "1 + epsilon_high. None: off."},
    )
    sapo_temperature_pos: float = field(
        default=1.0, metadata={"help": "SAPO's gate temperature for tokens with a positive advantage."}
    )
    sapo_temperature_neg: float = field(
        default=1.05, metadata={"help": "SAPO's gate temperature for tokens with a non-positive advantage."}
    )
    vespo_k_pos: float = field(
        default=2.0, metadata={"help": "VESPO's exponent k for non-negative advantages: how fast sequences with an "
                                         "importance ratio below 1 are down-weighted."}
    )
    vespo_lambda_pos: float = field(
        default=3.0, metadata={"help": "VESPO's decay λ for non-negative advantages: how fast sequences with a ratio "
                                         "above 1 are down-weighted."}
    )
    vespo_k_neg: float = field(default=3.0, metadata={"help": "VESPO's exponent k for negative advantages."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "VESPO's decay λ for negative advantages."})
    top_entropy_quantile: float = field(
        default=1.0,
        metadata={"help": "Keep in the policy loss only this top fraction of tokens by entropy (arXiv 2506.01939, "
                          "which recommends 0.2); 1 keeps all, 0 only the highest. Ranked over every process's "
                          "completion tokens."},
    )
    off_policy_mask_threshold: float | None = field(
        default=None,
        metadata={"help": "Leave out of the policy loss each negative-advantage sequence whose mean token KL from the "
                          "sampling policy exceeds this (DeepSeek-V3.2, arXiv 2512.02556, eq. 9; e.g. 0.5). Only "
                          "acts when the rollout is reused (num_iterations > 1 or steps_per_generation > "
                          "gradient_accumulation_steps). None: off."},
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={"help": "Subtract entropy_coef × the mean token entropy from the loss (an exploration bonus, the "
                          "same scale for every loss_type; over the tokens top_entropy_quantile keeps). With "
                          "use_adaptive_entropy, the starting coefficient."},
    )
    use_adaptive_entropy: bool = field(
        default=False,
        metadata={"help": "Skywork-OR1's control (arXiv 2505.22312): after each optimizer step raise the coefficient "
                          "by entropy_coef_delta when the step's entropy was at most entropy_target, else lower it; "
                          "the bonus applies only while the last step's entropy is at most entropy_target."},
    )
    entropy_coef_min: float = field(default=0.0, metadata={"help": "Lowest adaptive entropy coefficient."})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "Highest adaptive entropy coefficient."})
    entropy_coef_delta: float = field(
        default=0.005, metadata={"help": "Change of the adaptive entropy coefficient per optimizer step."}
    )
    entropy_target: float = field(
        default=0.2,
        metadata={"help": "Mean token entropy (nats) adaptive control holds the policy above, measured on the tokens "
                          "the policy loss uses. Language models start around 2-10 nats: set it near the `entropy` "
                          "logged early in training, or the bonus only wakes at near-total collapse."},
    )
    use_bias_correction_kl: bool = field(
        default=True,
        metadata={"help": "Multiply the per-token KL by the importance ratio (differentiable even where it is 1), so "
                          "that its gradient is the unbiased reverse-KL gradient (DeepSeek-V3.2, arXiv 2512.02556)."},
    )
    overlong_buffer_len: int | None = field(
        default=None,
        metadata={"help": "DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): completions longer than "
                          "max_completion_length - overlong_buffer_len tokens lose reward linearly, down to "
                          "-overlong_penalty_factor at max_completion_length; added to the weighted reward sum before "
                          "advantages. None: off."},
    )
    overlong_penalty_factor: float = field(
        default=1.0, metadata={"help": "The largest soft overlong punishment (at max_completion_length tokens)."}
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO's dynamic sampling (arXiv 2503.14476, §3.2): drop the groups whose rewards all tie "
                          "(their advantages are 0) and sample groups for further prompts until the generation batch "
                          "is full again. Each process fills its own share, so it must hold whole groups "
                          "(per_device_train_batch_size × steps_per_generation a multiple of num_generations)."},
    )
    max_dynamic_sampling_rounds: int = field(
        default=3,
        metadata={"help": "Most extra generation rounds dynamic sampling runs per generation batch; if the batch is "
                          "still short after them it is filled with tied groups (logged as "
                          "dynamic_sampling/kept_tied_groups)."},
    )
    max_tool_calling_iterations: int | None = field(
        default=None,
        metadata={"help": "Most tool-calling rounds of a multi-turn rollout (None: no limit). It acts with `tools` "
                          "or `environment_factory`."},
    )
    cast_lm_head_to_fp32: bool = field(
        default=False,
        metadata={"help": "Keep the LM head's weights in float32 and run it in float32, outside autocast, for training "
                          "log-probs and sampling alike (ScaleRL, arXiv 2510.13786). Acts on bf16/fp16 weights or "
                          "under autocast (bf16 mixed precision); an fp32 run on a CPU computes so already."},
    )

    def __post_init__(self):
        self.check_reference_sync()
        self.scale_rewards = {True: "group", False: "none", "true": "group", "false": "none"}.get(
            self.scale_rewards, self.scale_rewards)
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}; expected one of {GRPO_LOSS_TYPES}.")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}.")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, got "
                             f"{self.multi_objective_aggregation!r}.")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.scale_rewards != "group":
            raise ValueError(f"scale_rewards={self.scale_rewards!r} does not apply to GDPO "
                             "(multi_objective_aggregation='normalize_then_sum'): each reward function is normalised "
                             "by its group's std and their weighted sum by the batch's. Leave scale_rewards unset.")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError("importance_sampling_level must be 'token' or 'sequence', got "
                             f"{self.importance_sampling_level!r}.")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ValueError("loss_type='luspo' is GSPO's sequence loss scaled by length: set "
                             "importance_sampling_level='sequence'.")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise ValueError("loss_type='vespo' weighs whole sequences by itself; importance_sampling_level='sequence' "
                             "would only change the KL's bias correction. Leave it 'token'.")
        if min(self.sapo_temperature_pos, self.sapo_temperature_neg) <= 0:
            raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be > 0.")
        if min(self.vespo_k_pos, self.vespo_k_neg) < 0 or min(self.vespo_lambda_pos, self.vespo_lambda_neg) <= 0:
            raise ValueError("vespo_k_pos and vespo_k_neg must be >= 0, vespo_lambda_pos and vespo_lambda_neg > 0.")
        if not 0 <= self.top_entropy_quantile <= 1:
            raise ValueError(f"top_entropy_quantile must be between 0 and 1, got {self.top_entropy_quantile}.")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ValueError(f"off_policy_mask_threshold is a KL and must be >= 0, got "
                             f"{self.off_policy_mask_threshold}.")
        if self.max_tool_calling_iterations is not None and self.max_tool_calling_iterations < 1:
            raise ValueError(f"max_tool_calling_iterations must be at least 1 (or None: no limit), got "
                             f"{self.max_tool_calling_iterations}.")
        if self.entropy_coef_min > self.entropy_coef_max or self.entropy_coef_delta < 0:
            raise ValueError("Adaptive entropy control needs entropy_coef_min <= entropy_coef_max and "
                             "entropy_coef_delta >= 0.")
        if self.overlong_buffer_len is not None:
            if not 0 < self.overlong_buffer_len <= self.max_completion_length:
                raise ValueError(f"overlong_buffer_len must be between 1 and max_completion_length "
                                 f"({self.max_completion_length}), got {self.overlong_buffer_len}.")
            if self.multi_objective_aggregation != "sum_then_normalize":
                raise ValueError("overlong_buffer_len adds a penalty to the summed reward: it needs "
                                 "multi_objective_aggregation='sum_then_normalize'.")
        if self.overlong_penalty_factor < 0:
            raise ValueError(f"overlong_penalty_factor must be >= 0, got {self.overlong_penalty_factor}.")
        if self.max_dynamic_sampling_rounds < 0:
            raise ValueError(f"max_dynamic_sampling_rounds must be >= 0, got {self.max_dynamic_sampling_rounds}.")
        super().__post_init__()  # resolves epsilon_high
        process_rows = self.per_device_train_batch_size * self.steps_per_generation
        if self.dynamic_sampling and process_rows % self.num_generations:
            raise ValueError(f"dynamic_sampling fills each process's share of the generation batch with whole groups: "
                             f"per_device_train_batch_size × steps_per_generation ({process_rows}) must be a "
                             f"multiple of num_generations ({self.num_generations}).")
        if self.delta is not None and self.delta <= 1 + self.epsilon_high:
            raise ValueError(f"delta ({self.delta}) caps the ratio above the clip range: it must exceed 1 + "
                             f"epsilon_high ({1 + self.epsilon_high}) (INTELLECT-2 uses 4).")
        if self.loss_type == "cispo" and self.epsilon_high <= 1:
            raise ValueError(f"loss_type='cispo' truncates importance ratios at epsilon_high (ε_max), which is "
                             f"{self.epsilon_high}: every weight would sit below 1. Set epsilon_high (ScaleRL uses 5).")

    @property
    def uses_entropy_bonus(self) -> bool:
        return self.entropy_coef != 0 or self.use_adaptive_entropy


@dataclass
class EntropyControl:
    """Adaptive entropy control's state: the coefficient, the last optimizer step's mean token entropy (inf: none
    measured yet, so no bonus) and the [entropy sum, token count] of the optimizer step under way."""

    coef: float
    last_step_entropy: float = math.inf
    window: torch.Tensor | float = 0.0


def _fp32_linear_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    # A bound method (not a closure), so that a deep copy of the model (the reference) calls its own weights.
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), self.weight, self.bias)


def _to_dtype(_module, _args, output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return output.to(dtype)


def cast_lm_head_to_fp32(model) -> None:
    """Puts `model`'s LM head (inside any peft / DDP wrapper) in float32 and makes it compute in float32 outside
    autocast (TRL's `cast_lm_head_to_fp32`). A head tied to the input embeddings shares their weight: the embeddings'
    output is cast back to the model's dtype, which the layers after it expect."""
    causal_lm = models.unwrap_causal_lm(model)
    head = causal_lm.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # a peft adapter on the head keeps its own dtype, and applies on top
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"cast_lm_head_to_fp32 needs a linear LM head; {type(causal_lm).__name__} has "
                         f"{type(head).__name__}.")
    dtype = head.weight.dtype
    head.float()
    head.forward = types.MethodType(_fp32_linear_forward, head)
    embeddings = causal_lm.get_input_embeddings()
    if embeddings.weight is head.weight and dtype != torch.float32:
        embeddings.register_forward_hook(functools.partial(_to_dtype, dtype=dtype))


class GRPOTrainer(OnlineTrainer):
    """Trains `model` (an object or an id) on prompts with rewards from `reward_funcs`: callables with TRL's
    signature `f(prompts, completions, completion_ids, **columns) -> list[float | None]`, reward models (sequence
    classifiers, objects or ids), or a list of both (weighted by `args.reward_weights`)."""

    config_class = GRPOConfig
    algorithm = "GRPO"
    paper = {"title": "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
             "id": "2402.03300", "citation": GRPO_CITATION}

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        # TRL's multi-turn rollouts: an environment per row (its methods are tools, its `get_reward` a reward
        # function), standalone tools, or a custom rollout function.
        self.environment_pool = tools_module.EnvironmentPool(environment_factory) if environment_factory else None
        self.tools = list(tools or [])
        self.rollout_func = rollout_func
        if self.environment_pool is not None:
            environment_rewards = self.environment_pool.reward_functions()
            given = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            reward_funcs = given + environment_rewards
            if args is not None and args.reward_weights is not None:
                # TRL's weight for an environment's reward; on a copy, so that the caller's Config stays as given.
                args = copy.copy(args)
                args.reward_weights = list(args.reward_weights) + [1.0] * len(environment_rewards)
        if rollout_func is not None and (self.tools or self.environment_pool is not None):
            raise ValueError("rollout_func samples the completions itself: give it, or tools / environment_factory, "
                             "not both.")
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class,
                         reward_processing_classes, callbacks, optimizers, quantization_config, peft_config)
        self.tool_rendering = None
        if self.tools or self.environment_pool is not None:
            self.tool_rendering = tools_module.tool_tokenizer(self.tokenizer)  # checked before training

    def sample(self, rows):
        """One completion per row: a single sampled turn, or with tools / environments a multi-turn episode (tool
        results in the sequence, out of the loss: `Rollout.tool_mask`), or what `rollout_func` returns."""
        if self.tool_rendering is None and self.rollout_func is None:
            return super().sample(rows)
        stop_ids = stop_token_ids(self.model, self.tokenizer)
        prompts = [row["prompt"] for row in rows]
        if self.rollout_func is not None:
            episodes, columns = tools_module.episodes_from_rollout(self.rollout_func(prompts, self), prompts,
                                                                   self.tokenizer, stop_ids)
            rows = [{**row, **{key: values[i] for key, values in columns.items()}} for i, row in enumerate(rows)]
        else:
            environments = None
            if self.environment_pool is not None:
                environments, prompts = self.environment_pool.start(rows)
                rows = [{**row, "environments": environment} for row, environment in zip(rows, environments)]
            with distributed.gathered_for_generation(self.accelerator, self.model,
                                                     self.args.ds3_gather_for_generation) as generator:
                episodes = tools_module.sample_episodes(
                    generator, self.tool_rendering, prompts, self.sampling_config(len(prompts)), tools=self.tools,
                    environments=environments, max_iterations=self.args.max_tool_calling_iterations or sys.maxsize,
                    max_completion_length=self.args.max_completion_length)
            calls, failures = self.accelerator.reduce(torch.tensor(
                [float(episodes.tool_calls), float(episodes.tool_failures)], device=self.accelerator.device)).tolist()
            self.record_value("tools/call_frequency", calls / (len(rows) * self.accelerator.num_processes))
            self.record_value("tools/failure_frequency", failures / calls if calls > 0 else 0.0)
        rollout = token_rollout(episodes.prompt_ids, episodes.completion_ids, is_truncated=episodes.is_truncated,
                                pad_token_id=self.tokenizer.pad_token_id, tool_mask=episodes.tool_mask,
                                mask_truncated=self.args.mask_truncated_completions, device=self.accelerator.device)
        if self.args.pad_to_multiple_of:
            rollout = rollout.padded_to_multiple(self.args.pad_to_multiple_of, self.tokenizer.pad_token_id)
        return rollout.replace(rows=rows, completions=episodes.completions)

    @functools.cached_property
    def entropy_control(self) -> EntropyControl:
        return EntropyControl(coef=self.args.entropy_coef)

    def _load_model(self, model, args, quantization_config):
        model = super()._load_model(model, args, quantization_config)
        if args.cast_lm_head_to_fp32:
            cast_lm_head_to_fp32(model)  # before the reference is copied from it
        return model

    def estimator(self):
        if self.args.multi_objective_aggregation == "normalize_then_sum":
            return estimators.Estimator("decoupled")
        return estimators.Estimator("group_relative", {"scale": self.args.scale_rewards})

    def reward_shaping(self, completion_lengths):
        """DAPO's soft overlong punishment (eq. 13, `losses.soft_overlong_penalty`) with `overlong_buffer_len`."""
        args = self.args
        if args.overlong_buffer_len is None:
            return {}
        return {"overlong_penalty": losses.soft_overlong_penalty(
            completion_lengths, args.max_completion_length, args.overlong_buffer_len, args.overlong_penalty_factor)}

    @property
    def dynamic_sampling_rounds(self) -> int | None:
        return self.args.max_dynamic_sampling_rounds if self.args.dynamic_sampling else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        policy = self.rollout_logprobs(model, inputs, with_stats=True, entropy_grad=args.uses_entropy_bonus)
        logps, mask = policy.token_logps, inputs.loss_mask.float()
        old_logps = inputs.old_logps if inputs.old_logps is not None else logps.detach()
        log_weights = losses.log_importance_weights(logps, old_logps, mask, level=args.importance_sampling_level)
        advantages = inputs.advantages
        per_token_loss = self.policy_loss(logps, old_logps, log_weights, advantages, mask)
        if args.off_policy_mask_threshold is not None:
            per_token_loss = per_token_loss * losses.off_policy_sequence_mask(
                advantages, logps, old_logps, mask, args.off_policy_mask_threshold)
        loss_tokens = mask  # the tokens the policy loss (and the entropy bonus) act on
        if args.top_entropy_quantile < 1:
            loss_tokens = losses.high_entropy_mask(policy.entropy, mask, args.top_entropy_quantile,
                                                   pool=self.gathered_entropies(policy.entropy, mask)).float()
            per_token_loss = per_token_loss * loss_tokens
        if args.beta != 0:
            kl = losses.k3_kl(logps, inputs.ref_logps)
            if args.use_bias_correction_kl:
                kl = kl * torch.exp(log_weights)
            per_token_loss = per_token_loss + args.beta * kl
            self.record_token_mean("kl", kl, mask)
        loss = self.aggregate(per_token_loss, mask, inputs.num_items_in_batch)
        if args.uses_entropy_bonus:
            self.record_metric("policy_loss", loss)
            loss = loss - self.entropy_bonus(policy.entropy, loss_tokens)
        loss = self.add_router_aux_loss(loss, policy)
        self.record_token_mean("entropy", policy.entropy, mask)
        return (loss, {"logps": logps}) if return_outputs else loss

    def policy_loss(self, logps, old_logps, log_weights, advantages, mask) -> torch.Tensor:
        """The per-token policy loss of `loss_type` (`[N, T]` or `[N, 1]`), and its TRL metrics."""
        args = self.args
        if args.loss_type == "sapo":
            return losses.sapo_loss(log_weights, advantages, args.sapo_temperature_pos, args.sapo_temperature_neg)
        if args.loss_type == "cispo":
            positive = (advantages > 0).reshape(advantages.shape[0], -1)
            truncated = (log_weights.exp() > args.epsilon_high) & positive
            self.record_masked_mean("cispo_clip_ratio", truncated.float(), mask)
            return losses.weighted_reinforce_loss(logps, losses.cispo_weights(log_weights, args.epsilon_high),
                                                  advantages)
        if args.loss_type == "vespo":
            weights = losses.vespo_weights(logps - old_logps, mask, advantages, args.vespo_k_pos,
                                           args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg)
            self.record_masked_mean("vespo/phi_seq_mean", weights, mask)
            return losses.weighted_reinforce_loss(logps, weights, advantages)
        self.record_clip_fractions(log_weights, advantages, mask)
        return losses.clipped_surrogate_loss(log_weights, advantages, args.epsilon, args.epsilon_high, args.delta)

    def aggregate(self, per_token_loss, mask, num_items_in_batch) -> torch.Tensor:
        """The micro-batch's loss under `loss_type`, before the Trainer divides it by the gradient accumulation steps
        (TRL's numbers once divided)."""
        return losses.aggregate_token_loss(
            per_token_loss, mask, self.args.loss_type, max_completion_length=self.args.max_completion_length,
            num_items_in_batch=num_items_in_batch, num_processes=self.accelerator.num_processes,
            steps_per_generation=self.args.steps_per_generation if self.model.training else 1,
        )

    def gathered_entropies(self, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The token entropies of every process's completions, `[n_all]` (what `top_entropy_quantile` ranks among)."""
        local = entropy[mask.bool()].detach().float()
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=math.nan))
        return gathered[~gathered.isnan()]

    def entropy_bonus(self, entropy: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """`c · H`: the coefficient times the mean entropy of `tokens`, to subtract from the loss. With
        `use_adaptive_entropy`, `c` is 0 unless the last optimizer step's entropy was at most `entropy_target`, and
        training micro-batches feed the controller, which moves `c` at each optimizer step's last micro-batch."""
        args, control = self.args, self.entropy_control
        training = self.model.training
        applied = control.coef
        if args.use_adaptive_entropy and control.last_step_entropy > args.entropy_target:
            applied = 0.0
        if training and args.use_adaptive_entropy:
            control.window = control.window + torch.stack([(entropy.detach() * tokens).sum(), tokens.sum()])
            if self.accelerator.sync_gradients:
                total, count = self.accelerator.reduce(control.window, reduction="sum").tolist()
                control.last_step_entropy = total / max(count, 1.0)
                control.coef = losses.adaptive_entropy_coef(
                    control.coef, control.last_step_entropy, args.entropy_target, args.entropy_coef_delta,
                    args.entropy_coef_min, args.entropy_coef_max)
                control.window = 0.0
        if training and self.accelerator.sync_gradients:
            self.record_value("entropy_coef", control.coef)
        return applied * losses.masked_mean(entropy, tokens)

    def record_masked_mean(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """The mean over every process of per-token values `[N, T]` on the tokens of `mask`, or of per-sequence values
        `[N, 1]` over the sequences (TRL's `global_masked_mean`)."""
        if values.shape[1] == 1:
            self.record_metric(name, values)
        else:
            self.record_token_mean(name, values, mask)

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

    # -- checkpoints: adaptive entropy control resumes where it was ------------------------------------------------
    def save_training_state(self, checkpoint: str) -> None:
        super().save_training_state(checkpoint)
        if self.args.use_adaptive_entropy and self.args.should_save:
            control = self.entropy_control
            with open(os.path.join(checkpoint, ENTROPY_CONTROLLER_STATE), "w") as file:
                json.dump({"coef": control.coef, "last_step_entropy": control.last_step_entropy}, file)

    def load_training_state(self, checkpoint: str) -> None:
        super().load_training_state(checkpoint)
        if self.args.use_adaptive_entropy:
            with open(os.path.join(checkpoint, ENTROPY_CONTROLLER_STATE)) as file:
                self.entropy_control = EntropyControl(**json.load(file))

    def card_hyperparameters(self) -> dict:
        args = self.args
        hyperparameters = {
            "num_generations": args.num_generations, "beta": args.beta, "loss_type": args.loss_type,
            "scale_rewards": args.scale_rewards, "epsilon": args.epsilon, "epsilon_high": args.epsilon_high,
            "importance_sampling_level": args.importance_sampling_level, "temperature": args.temperature,
        }
        options = {"delta": None, "top_entropy_quantile": 1.0, "off_policy_mask_threshold": None, "entropy_coef": 0.0,
                   "use_adaptive_entropy": False, "multi_objective_aggregation": "sum_then_normalize"}
        return {**hyperparameters, **{name: getattr(args, name) for name, default in options.items()
                                      if getattr(args, name) != default}}
