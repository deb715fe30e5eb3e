"""What every online trainer shares (GRPO and its family, Online DPO): prompts in, completions sampled from the
policy in groups, scored by reward functions / reward models, advantages estimated (`estimators`), and each generation
batch served as several optimisation steps. A trainer chooses an estimator, any reward shaping, and its loss.

The batch arithmetic is TRL's (GRPOConfig): the dataloader yields one *generation batch* per process,
`per_device_train_batch_size × steps_per_generation` rows (each prompt `num_generations` times, from
`rollout.GroupSampler`); it is sampled and scored once, shuffled, split into `steps_per_generation` micro-batches, and
reused `num_iterations` times. Rewards are gathered from every process so that groups split across processes are
normalised whole; each process keeps its own rows' advantages.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from accelerate.utils import gather, gather_object, set_seed
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from . import data, distributed, estimators, generation, losses, models
from .completion_log import CompletionLog, active_trackers
from .config import AlignConfig, PackingArguments, VLLMArguments
from .generation import SamplingConfig
from .logprobs import CompletionLogProbs
from .reference_sync import ReferenceSync, ReferenceSyncArguments
from .rewards import RewardScorer
from .rollout import GroupSampler, Rollout, sample_rollout
from .sequence_logprobs import completion_token_logprobs
from .trainer import AlignTrainer
from .value import CRITIC_ATTRIBUTE, CRITIC_WEIGHTS_NAME, ValueHead, critic_token_values, policy_logprobs_and_values

logger = logging.getLogger(__name__)


@dataclass
class OnlineConfig(AlignConfig, PackingArguments, VLLMArguments):
    """Fields every online trainer shares, with TRL's GRPOConfig names and defaults (except `max_completion_length`,
    see below). `per_device_train_batch_size` counts completions, not prompts: with the defaults a generation batch
    holds `per_device_train_batch_size × num_processes × gradient_accumulation_steps` completions, which must be a
    multiple of `num_generations`. TRL's vLLM fields are accepted; `use_vllm=True` raises (`VLLMArguments`)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (TRL's default)."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the group size G)."})
    num_generations_eval: int | None = field(
        default=None, metadata={"help": "Completions per prompt during evaluation (default: num_generations)."}
    )
    max_completion_length: int = field(default=512, metadata={"help": "Most tokens of a sampled completion."})
    ds3_gather_for_generation: bool = field(
        default=True, metadata={"help": "Under DeepSpeed ZeRO-3, gather the whole policy on every device while it "
                                        "samples (fast). False: ZeRO gathers one layer at a time as it runs (slower), "
                                        "for a policy too large for one device."}
    )
    shuffle_dataset: bool = field(default=True, metadata={"help": "Draw prompts in a random order (seeded)."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Completions per generation batch, all processes (exclusive with the next)."}
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-batches per generation batch (default: gradient_accumulation_steps)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(
        default=None, metadata={"help": "Min-p sampling: drop tokens less likely than min_p × the top token's "
                                        "probability (0 to 1; typical 0.01-0.2; None: off)."}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Penalise tokens already in the prompt or the completion so far (> 1: fewer "
                                         "repeats, < 1: more; 1: off)."}
    )
    cache_implementation: str | None = field(
        default=None, metadata={"help": "KV cache `generate` uses, e.g. 'static' or 'dynamic' (None: the model's)."}
    )
    generation_kwargs: dict | str | None = field(
        default=None, metadata={"help": "More `transformers.GenerationConfig` arguments (e.g. suppress_tokens); they "
                                          "override the sampling fields above. A JSON string is parsed."}
    )
    chat_template_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for the chat template when conversational prompts are "
                                          "rendered for sampling, and for the reward models' templates (e.g. "
                                          "{\"enable_thinking\": false}). A JSON string is parsed."}
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad prompts and completions to a multiple of this many tokens (fewer shapes "
                                            "to compile). 'auto', TRL's default: none (TRL pads to 128 on AWS Neuron); "
                                            "'none' / 'null': none."}
    )
    use_transformers_continuous_batching: bool = field(
        default=False, metadata={"help": "Sample with transformers' continuous batching (`generate_batch`, a paged KV "
                                           "cache) instead of `generate`. It cannot apply repetition_penalty, "
                                           "cache_implementation or generation_kwargs that read the completion so far "
                                           "(an error at Config time)."}
    )
    transformers_continuous_batching_config: dict | str | None = field(
        default=None, metadata={"help": "`transformers.ContinuousBatchingConfig` arguments (max_memory_percent 0.5 "
                                          "unless given). On a CPU give num_blocks and max_batch_tokens: the default "
                                          "sizes the cache from the machine's RAM. A JSON string is parsed."}
    )
    use_transformers_paged: bool = field(
        default=False, metadata={"help": "Deprecated name of use_transformers_continuous_batching (TRL's)."}
    )
    log_completions: bool = field(
        default=False, metadata={"help": "At each logging step, print the latest generation batch's prompts, "
                                           "completions, rewards and advantages (with rich), save them to "
                                           "<output_dir>/completions/completions_<step>.parquet, and log them as a "
                                           "table to W&B / trackio when reported to."}
    )
    log_multimodal: bool = field(
        default=True, metadata={"help": "Log images with the completions (TRL's); hf_align samples text only, so there "
                                          "are none to log."}
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Rows of the completions table printed, drawn at random (None: all)."}
    )
    log_unique_prompts: bool = field(
        default=False, metadata={"help": "One row per distinct prompt in the W&B / trackio completions table."}
    )
    log_completions_hub_repo: str | None = field(
        default=None, metadata={"help": "A Hub dataset repo ('user/name', or 'name' in your namespace) the "
                                          "completions parquet files are pushed to, every 2 minutes and when training "
                                          "ends (needs log_completions; private with hub_private_repo)."}
    )
    beta: float = field(
        default=0.0, metadata={"help": "KL coefficient against the reference; 0 builds no reference at all."}
    )
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes over each generation batch (μ)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping range ε of the importance ratio."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clipping range (default: epsilon; DAPO recommends 0.28)."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (default: 1 each)."}
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Leave completions that hit max_completion_length out of the loss."}
    )
    min_generations: ClassVar[int] = 2  # group-relative trainers compare within groups; PPO needs none

    def __post_init__(self):
        super().__post_init__()
        for name in ("generation_kwargs", "chat_template_kwargs", "transformers_continuous_batching_config"):
            if isinstance(getattr(self, name), str):  # from a command line
                setattr(self, name, json.loads(getattr(self, name)))
        if self.use_transformers_paged:
            warnings.warn("use_transformers_paged is deprecated (as in TRL): use use_transformers_continuous_batching.",
                          FutureWarning, stacklevel=3)
            self.use_transformers_continuous_batching = True
        if self.log_completions_hub_repo is not None and not self.log_completions:
            raise ValueError("log_completions_hub_repo pushes the completions that log_completions saves: set "
                             "log_completions=True, or leave log_completions_hub_repo unset.")
        self.sampling(batch_size=1)  # checks the sampling fields now, not at the first generation
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.num_generations < self.min_generations:
            raise ValueError(f"num_generations must be at least {self.min_generations} (a group to compare within), "
                             f"got {self.num_generations}.")
        self.num_generations_eval = self.num_generations_eval or self.num_generations
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("Set generation_batch_size or steps_per_generation, not both.")
        if self.generation_batch_size is not None:
            if self.generation_batch_size % global_batch:
                raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be a multiple of the "
                                 f"global batch size ({global_batch} = per_device_train_batch_size × processes).")
            self.steps_per_generation = self.generation_batch_size // global_batch
        else:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            self.generation_batch_size = global_batch * self.steps_per_generation
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"The generation batch ({self.generation_batch_size} completions = per_device_train_batch_size × "
                f"processes × steps_per_generation) must be a multiple of num_generations ({self.num_generations}), "
                "so that it holds whole groups."
            )
        eval_batch = self.per_device_eval_batch_size * self.world_size
        if self.eval_strategy != "no" and eval_batch % self.num_generations_eval:
            raise ValueError(f"The global eval batch ({eval_batch}) must be a multiple of num_generations_eval "
                             f"({self.num_generations_eval}).")

    def sampling(self, batch_size: int) -> SamplingConfig:
        """How completions are sampled, `batch_size` sequences per `generate` call."""
        return SamplingConfig(
            max_new_tokens=self.max_completion_length, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            cache_implementation=self.cache_implementation, generation_kwargs=self.generation_kwargs,
            pad_to_multiple_of=self.pad_to_multiple_of, batch_size=batch_size,
            chat_template_kwargs=self.chat_template_kwargs,
            continuous_batching=self.use_transformers_continuous_batching,
            continuous_batching_config=self.transformers_continuous_batching_config,
        )

    def kl_controller(self) -> losses.FixedKLController | losses.AdaptiveKLController | None:
        """What sets β of the KL in the reward (estimators with a `beta` option): fixed at `beta`; None for a
        trainer with no reward to put a KL in."""
        return losses.FixedKLController(self.beta)

    def greedy_sampling(self, batch_size: int) -> SamplingConfig:
        """How a greedy baseline is decoded (estimators that need one): greedily, with the prompts rendered and the
        engine chosen as for the samples (`chat_template_kwargs`, continuous batching); the sampling filters and
        `generation_kwargs` do not apply."""
        return SamplingConfig(
            max_new_tokens=self.max_completion_length, temperature=0, batch_size=batch_size,
            chat_template_kwargs=self.chat_template_kwargs,
            continuous_batching=self.use_transformers_continuous_batching,
            continuous_batching_config=self.transformers_continuous_batching_config,
        )


@dataclass
class DataCollatorForPrompts:
    """Keeps a batch as its list of rows: the prompt and every other column, which reward functions receive."""

    def __call__(self, examples: list[dict]) -> list[dict]:
        return list(examples)


def completions_as_passed(prompts: list, texts: list[str]) -> list:
    """The completions as reward functions get them (TRL's format): the texts, or one assistant message each when
    the prompts are conversational."""
    if data.is_conversational_row({"prompt": prompts[0]}, ["prompt"]):
        return [[{"role": "assistant", "content": text}] for text in texts]
    return list(texts)


def group_rows(keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """The row indexes `[n]` of the groups where `keep` (`[n / G]` bool) is True, in order."""
    return torch.arange(keep.numel() * group_size).view(-1, group_size)[keep.cpu()].reshape(-1)


class OnlineTrainer(AlignTrainer):
    """The constructor of TRL's GRPOTrainer / RLOOTrainer, reward scoring, the reference (none with `beta=0`;
    `ref_model` when given; the adapter disabled under peft; else a frozen copy), the critic when the estimator reads
    values, the generation metrics and the completions table (`log_completions`, `completion_log`).

    Each generation batch goes through the stages of `make_rollout`, each a method from `Rollout` to `Rollout`:

        sample    the policy's completions of the rows' prompts                                  `sample`
        score     the reward functions' scores (DAPO's dynamic sampling refills tied groups)     `score`
        estimate  what the estimator declares (old log-probs, values, greedy rewards), the       `estimate`
                  reference's log-probs, and the advantages (`estimators`)
        update    `compute_loss` on each micro-batch of the shuffled rollout (the Trainer's step)

    A trainer chooses its estimator (`estimator`), its reward shaping (`reward_shaping`) and its loss
    (`compute_loss`)."""

    config_class = OnlineConfig
    dataset_columns = ("prompt",)

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: OnlineConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        ref_model=None,
        value_model=None,
    ):
        if reward_funcs is None or (isinstance(reward_funcs, list) and not reward_funcs):
            raise ValueError("`reward_funcs` is required: a reward function, a reward model (object or id), or a list.")
        super().__init__(
            model, args, None, train_dataset, eval_dataset, processing_class, None, callbacks, optimizers,
            peft_config=peft_config, quantization_config=quantization_config,
        )
        self.reward_scorer = RewardScorer(
            reward_funcs, self.args.reward_weights, reward_processing_classes,
            model_init_kwargs=self.args.model_init_kwargs, device=self.accelerator.device,
            chat_template_kwargs=self.args.chat_template_kwargs,
            prepare_model=functools.partial(distributed.prepare_frozen_model, self.accelerator),
        )
        self.ref_model = self.build_reference(ref_model) if self.args.beta != 0 else None
        if isinstance(self.args, ReferenceSyncArguments):
            self.reference_sync = ReferenceSync.attach(self)
        self.kl_controller = self.args.kl_controller()
        estimator = self.estimator()
        if estimator is not None and "values" in estimator.needs:
            # After peft wrapped the policy (which freezes every parameter it does not own), before `train()` builds
            # the optimizer and the DDP wrapper.
            self.attach_critic(value_model)
        elif value_model is not None:
            raise ValueError(f"value_model is a critic; {type(self).__name__} with these settings estimates "
                             "advantages without one. Leave value_model unset.")
        # A group can be split between processes: each process samples from its own random stream (seed + its index),
        # or they would draw the same completions for their shares of the group.
        set_seed(self.args.seed, device_specific=True)
        self._step = 0  # micro-steps taken, as TRL counts them (for the generation cadence)
        self._buffered_rollouts: list[Rollout] | None = None
        self._warned_ties = False
        args = self.args
        # Every process gathers its rows for the table; the main process keeps, writes and pushes it.
        self.completion_log = CompletionLog(
            os.path.join(args.output_dir, "completions"), args.generation_batch_size, args.num_completions_to_print,
            args.log_unique_prompts, args.log_completions_hub_repo, args.hub_private_repo, args.hub_token,
        ) if args.log_completions and self.accelerator.is_main_process else None

    # -- what a trainer chooses ------------------------------------------------------------------------------------
    def estimator(self) -> estimators.Estimator | None:
        """The advantage estimator and its options (None: the trainer's own `estimate` stage)."""
        raise NotImplementedError

    def reward_shaping(self, completion_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named terms `[N]` added to the weighted reward of completions of `completion_lengths` tokens (every
        process's), each logged as `rewards/<name>/mean`; none by default."""
        return {}

    def needs_old_logps(self) -> bool:
        """Whether the loss needs the sampling policy's log-probs: only when an optimizer step falls between sampling
        and the rollout's last use (otherwise the ratio is 1 and the loss uses the detached current log-probs)."""
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        return self.model.training and self.args.gradient_accumulation_steps % generate_every != 0

    # -- data ------------------------------------------------------------------------------------------------------
    def prepare_dataset(self, dataset, name, args):
        """Checks that every row has a non-empty `prompt` (string or message list); all columns are kept for the
        reward functions."""
        if not hasattr(dataset, "__len__"):
            raise ValueError(f"The {name} dataset must be a `datasets.Dataset` (with a length), not a stream.")
        data.check_prompts(dataset, name, self.tokenizer, args.dataset_num_proc, args.chat_template_kwargs)
        return dataset

    def default_collator(self, args):
        return DataCollatorForPrompts()

    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        return GroupSampler(
            len(dataset), self.args.num_generations, self.args.generation_batch_size // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset, seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        return GroupSampler(len(eval_dataset), self.args.num_generations_eval, shuffle=False)

    def get_train_dataloader(self):
        # One generation batch per process per dataloader step: `steps_per_generation` micro-batches' worth of rows.
        return self._get_dataloader(
            dataset=self.train_dataset, description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler, is_training=True,
        )

    # -- the generation-batch loop ---------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return loss

    def _prepare_inputs(self, rows: list[dict]) -> Rollout:
        if not self.model.training:
            return self.make_rollout(rows)
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or self._buffered_rollouts is None:
            self._buffered_rollouts = self.make_rollout(rows).shuffled().split(self.args.steps_per_generation)
        return self._buffered_rollouts[self._step % self.args.steps_per_generation]

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        if self.completion_log is not None:
            self.completion_log.push()  # a run shorter than the push schedule would leave nothing on the Hub
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.completion_log is not None:
            self.completion_log.write(self.state.global_step, active_trackers(self.args.report_to))

    @property
    def group_size(self) -> int:
        return self.args.num_generations if self.model.training else self.args.num_generations_eval

    def sampling_config(self, num_rows: int) -> SamplingConfig:
        return self.args.sampling(batch_size=max(num_rows, 1))

    def make_rollout(self, rows: list[dict]) -> Rollout:
        """One generation batch, this process's share: `rows` hold each prompt `group_size` times. Sample, score
        (with dynamic sampling, replace the groups whose rewards all tie), estimate."""
        rollout = self.score(self.sample(rows))
        if self.model.training and self.dynamic_sampling_rounds is not None:
            rollout = self.dynamically_sampled(rollout)
        self.record_generation_metrics(rollout)
        return self.estimate(rollout.replace(
            num_items_in_batch=self.accelerator.reduce(rollout.loss_mask.sum(), reduction="sum")))

    # -- stage 1: sample -------------------------------------------------------------------------------------------
    def sample(self, rows: list[dict]) -> Rollout:
        """One completion per row from the policy: the tokens, the masks, and the completions as reward functions
        get them."""
        prompts = [row["prompt"] for row in rows]
        with distributed.gathered_for_generation(self.accelerator, self.model,
                                                 self.args.ds3_gather_for_generation) as generator:
            rollout, sampled = sample_rollout(
                generator, self.tokenizer, prompts, self.sampling_config(len(prompts)),
                mask_truncated=self.args.mask_truncated_completions, device=self.accelerator.device,
            )
        if self.args.pad_to_multiple_of:
            rollout = rollout.padded_to_multiple(self.args.pad_to_multiple_of, self.tokenizer.pad_token_id)
        return rollout.replace(rows=list(rows), completions=completions_as_passed(prompts, sampled.texts))

    # -- stage 2: score --------------------------------------------------------------------------------------------
    def score(self, rollout: Rollout) -> Rollout:
        """The rewards `[n, F]` of this process's completions. What the reward functions logged as metrics is
        recorded here, for every completion sampled."""
        rewards_per_func = self.reward_scores(rollout.rows, rollout.completions, rollout.completion_ids,
                                              rollout.completion_lengths)
        log_columns, logged_metrics = self.reward_scorer.pop_logs()
        self.record_logged_metrics(logged_metrics)
        return rollout.replace(rewards_per_func=rewards_per_func.to(self.accelerator.device), log_columns=log_columns)

    def reward_scores(self, rows: list[dict], completions: list, completion_ids: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
        """Rewards `[n, F]` of `completions` (one per row, TRL's format; their ids `[n, C]`, the first `lengths`
        tokens of each row), with the rows' other columns."""
        completion_ids = [ids[:length].tolist() for ids, length in zip(completion_ids, lengths.tolist())]
        prompts = [row["prompt"] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
        return self.reward_scorer.score(prompts, completions, completion_ids, columns, self.state)

    def scalar_rewards(self, rewards_per_func: torch.Tensor, shaping: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward `[N]` advantages come from: the weighted sum of the functions' rewards `[N, F]` plus the
        trainer's reward shaping terms (`reward_shaping`)."""
        rewards = self.reward_scorer.combine(rewards_per_func)
        for term in shaping.values():
            rewards = rewards + term
        return rewards

    @property
    def dynamic_sampling_rounds(self) -> int | None:
        """With DAPO's dynamic sampling, the most extra generation rounds per generation batch; None: off."""
        return None

    def dynamically_sampled(self, rollout: Rollout) -> Rollout:
        """DAPO's dynamic sampling (arXiv 2503.14476, §3.2): this process's share of the generation batch with the
        groups whose rewards all tie (advantages 0: nothing to learn) replaced by groups for further prompts, sampled
        in up to `dynamic_sampling_rounds` extra rounds; if groups are still missing then, tied groups fill the share.

        Every process fills its own share with its own whole groups, so that no completion moves between processes;
        ties are decided on the gathered rewards, so every process knows every share's shortfall, runs the same
        rounds (sampling the largest shortfall each time) and ends with as many rows as it started with."""
        group_size, process = self.group_size, self.accelerator.process_index
        wanted = rollout.num_rows // group_size  # groups per process
        untied, tied = [], []  # this process's groups, per round
        untied_counts, tied_count = 0, 0  # untied groups per process, tied groups of every process
        rounds = 0
        while True:
            rewards = self.scalar_rewards(gather(rollout.rewards_per_func),
                                          self.reward_shaping(gather(rollout.completion_lengths)))
            is_tied = losses.reward_std_is_zero(rewards, group_size, scale="group")[::group_size]
            is_tied = is_tied.view(self.accelerator.num_processes, -1)
            untied.append(rollout.select(group_rows(~is_tied[process], group_size)))
            tied.append(rollout.select(group_rows(is_tied[process], group_size)))
            untied_counts = untied_counts + (~is_tied).sum(dim=1)
            tied_count += int(is_tied.sum())
            missing = int((wanted - untied_counts).clamp(min=0).max())
            if missing == 0 or rounds == self.dynamic_sampling_rounds:
                break
            rounds += 1
            rollout = self.score(self.sample(self.further_prompt_rows(missing, rounds)))
        # Untied groups first, so that tied ones only fill what the rounds left missing.
        groups = Rollout.concat(untied + tied, self.tokenizer.pad_token_id)
        kept = groups.select(group_rows(torch.arange(groups.num_rows // group_size) < wanted, group_size))
        kept_tied = (wanted - untied_counts).clamp(min=0)
        self.record_value("dynamic_sampling/rounds", rounds)
        self.record_value("dynamic_sampling/filtered_groups", tied_count - int(kept_tied.sum()))
        self.record_value("dynamic_sampling/kept_tied_groups", int(kept_tied.sum()))
        return kept

    def further_prompt_rows(self, groups: int, round_index: int) -> list[dict]:
        """This process's rows for `groups` more groups in dynamic sampling round `round_index`: every process draws
        the same `groups × processes` distinct prompts at random from the training set and takes its own slice. The
        draw is a function of the seed, the step and the round, so a resumed run draws what the uninterrupted run did."""
        generator = torch.Generator().manual_seed(hash((self.args.seed, self._step, round_index)))
        prompts = torch.randperm(len(self.train_dataset), generator=generator)
        process = self.accelerator.process_index
        mine = prompts[:groups * self.accelerator.num_processes][process * groups:(process + 1) * groups]
        return [self.train_dataset[int(index)] for index in mine for _ in range(self.group_size)]

    # -- stage 3: estimate -----------------------------------------------------------------------------------------
    def estimate(self, rollout: Rollout) -> Rollout:
        """The estimator's advantages (and returns) of this process's completions, from the rewards of every
        process's and what the estimator declares, which this stage computes first (`policy_statistics`)."""
        estimator = self.estimator()
        with torch.no_grad():
            rollout = self.policy_statistics(rollout, estimator.needs)
        rewards_per_func = gather(rollout.rewards_per_func)
        self.record_reward_metrics(rewards_per_func)
        shaping = self.reward_shaping(gather(rollout.completion_lengths))
        for name, term in shaping.items():
            self.record_value(f"rewards/{name}/mean", term.mean())
        inputs = estimators.EstimatorInputs(
            rewards_per_func=rewards_per_func, reward_weights=self.reward_scorer.weights,
            rewards=self.scalar_rewards(rewards_per_func, shaping), group_size=self.group_size,
            mask=self.gather_tokens(rollout.loss_mask), is_truncated=gather(rollout.is_truncated),
            **{name: self.gather_tokens(getattr(rollout, name)) for name in ("old_logps", "ref_logps", "values")
               if getattr(rollout, name) is not None},
            greedy_rewards=self.greedy_rewards(rollout.rows) if "greedy_rewards" in estimator.needs else None,
        )
        estimate = estimator(inputs)
        for name, value in estimate.metrics.items():
            self.record_value(name, value)
        if estimate.zero_std is not None:
            self.record_zero_std_groups(estimate.zero_std)
        if self.model.training and estimate.sequence_kl is not None:  # a KL in the reward: it has a controller
            self.kl_controller.update(estimate.sequence_kl.mean().item(), estimate.sequence_kl.numel())
        if self.args.log_completions:
            self.record_completions(rollout, rewards_per_func, estimate.advantages)
        changes = {"advantages": self.local_part(estimate.advantages, rollout)}
        if estimate.returns is not None:
            changes["returns"] = self.local_part(estimate.returns, rollout)
        if estimate.trained_rows is not None:
            trained = self.local_part(estimate.trained_rows, rollout)
            changes["completion_mask"] = rollout.completion_mask * trained[:, None]
        return rollout.replace(**changes)

    def policy_statistics(self, rollout: Rollout, needs: frozenset[str]) -> Rollout:
        """The rollout with the sampling policy's token log-probs (when `needs` or the loss asks for them), the
        critic's values (when `needs` them; one forward pass with the log-probs for a value head) and the reference's
        log-probs (β ≠ 0)."""
        changes = {}
        if "values" in needs:
            old, changes["values"] = self.logprobs_and_values(self.model, rollout, batch_size=self.row_batch_size)
            changes["old_logps"] = old.token_logps
        elif "old_logps" in needs or self.needs_old_logps():
            changes["old_logps"] = self.token_logps(self.model, rollout)
        if self.args.beta != 0:
            with models.reference_model(self.model, self.ref_model) as reference:
                changes["ref_logps"] = self.token_logps(reference, rollout)
        return rollout.replace(**changes)

    def local_part(self, values: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """This process's rows of `values` gathered from every process (`[N_all]`, or per token `[N_all, C_max]`, cut
        to this process's completion width)."""
        mine = values[self.local_rows(rollout.num_rows)]
        return mine[:, :rollout.completion_ids.size(1)] if mine.dim() == 2 else mine

    def greedy_rewards(self, rows: list[dict]) -> torch.Tensor:
        """The reward of the greedy completion of each group's prompt, for the groups of every process, `[N_all / G]`.

        A process's rows are a contiguous slice of the generation batch and a group's rows are consecutive, so the
        process that holds a group's first row decodes it; it writes the reward at that row and NaN at its other rows,
        and the gathered rows hold each group's baseline at the group's first row."""
        group_size = self.group_size
        first_row = self.local_rows(len(rows)).start
        leaders = [i for i in range(len(rows)) if (first_row + i) % group_size == 0]
        per_row = torch.full((len(rows),), float("nan"), device=self.accelerator.device)
        if leaders:  # a process may hold no group's first row
            per_row[leaders] = self.score_greedy([rows[i] for i in leaders]).to(per_row.device)
        return gather(per_row).view(-1, group_size)[:, 0]

    def score_greedy(self, rows: list[dict]) -> torch.Tensor:
        """The combined reward `[len(rows)]` of the greedy completion of each row's prompt."""
        prompts = [row["prompt"] for row in rows]
        with distributed.gathered_for_generation(self.accelerator, self.model,
                                                 self.args.ds3_gather_for_generation) as generator:
            greedy = generation.generate_completions(generator, self.tokenizer, prompts, self.args.greedy_sampling(len(prompts)))
        rewards_per_func = self.reward_scores(rows, completions_as_passed(prompts, greedy.texts), greedy.completion_ids,
                                              greedy.lengths)
        self.reward_scorer.pop_logs()  # what reward functions log should describe the trained-on samples only
        return self.reward_scorer.combine(rewards_per_func)

    def local_rows(self, rows: int) -> slice:
        """This process's rows in a batch gathered from every process, each holding `rows` of them."""
        process = self.accelerator.process_index
        return slice(process * rows, (process + 1) * rows)

    def gather_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values `[n, C]` of every process, `[N_all, C_max]`, in the gathered order, right-padded with 0 to
        the longest completion of any process."""
        return gather(self.accelerator.pad_across_processes(values, dim=1))

    @property
    def row_batch_size(self) -> int:
        """Rows per forward pass of the no-gradient passes over a rollout."""
        return self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size

    def token_logps(self, model, rollout: Rollout) -> torch.Tensor:
        """Per-token log-probs `[N, C]` of the rollout's completions under `model`, without gradients, one
        micro-batch of rows at a time."""
        return self.rollout_logprobs(model, rollout, batch_size=self.row_batch_size).token_logps

    def rollout_logprobs(self, model, rollout: Rollout, *, temperature: float | None = None, with_stats: bool = False,
                         entropy_grad: bool = False, batch_size: int | None = None) -> CompletionLogProbs:
        """`sequence_logprobs.completion_token_logprobs` at the sampling temperature (unless given) with the Config's packing
        (`prefix_sharing`, `padding_free`)."""
        args = self.args
        return completion_token_logprobs(
            model, rollout, temperature=args.temperature if temperature is None else temperature,
            with_stats=with_stats, entropy_grad=entropy_grad, batch_size=batch_size,
            prefix_sharing=args.prefix_sharing, padding_free=args.padding_free,
        )

    # -- the critic (estimators that read values) ------------------------------------------------------------------
    def attach_critic(self, value_model) -> None:
        """Attaches the critic to the policy as its `CRITIC_ATTRIBUTE` submodule, so that the optimizer, DDP and
        gradient clipping see it: `value_model` None for a value head on the policy, or a one-label sequence
        classifier (object, id or path)."""
        if value_model is None and (self.args.prefix_sharing or self.args.padding_free):
            raise ValueError("prefix_sharing and padding_free need a separate value_model: the value head on the "
                             "policy reads its hidden states row by row.")
        critic = ValueHead.for_model(self.model) if value_model is None else self.separate_critic_model(value_model)
        setattr(models.unwrap_causal_lm(self.model), CRITIC_ATTRIBUTE, critic.to(self.accelerator.device))

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
        """The critic (a `ValueHead` or a sequence classifier), or None."""
        return getattr(models.unwrap_causal_lm(self.model), CRITIC_ATTRIBUTE, None)

    @property
    def separate_critic(self) -> bool:
        return self.critic is not None and not isinstance(self.critic, ValueHead)

    def logprobs_and_values(self, model, rollout: Rollout, with_stats: bool = False, batch_size: int | None = None):
        """Per-token log-probs (`CompletionLogProbs`) and the critic's values `[N, C]` of the rollout's completions."""
        temperature = self.args.temperature
        if not self.separate_critic:
            return policy_logprobs_and_values(model, self.critic, rollout, temperature=temperature,
                                              with_stats=with_stats, batch_size=batch_size)
        logps = self.rollout_logprobs(model, rollout, with_stats=with_stats, batch_size=batch_size)
        return logps, critic_token_values(self.critic, rollout, batch_size=batch_size)

    def _save(self, output_dir=None, state_dict=None):
        # The saved model is the policy alone: the critic is training machinery. A state dict gathered by DeepSpeed /
        # FSDP is kept, less the critic's entries.
        if self.critic is None:
            return super()._save(output_dir, state_dict=state_dict)
        if state_dict is not None:
            state_dict = {key: value for key, value in state_dict.items() if CRITIC_ATTRIBUTE not in key.split(".")}
        unwrapped = models.unwrap_causal_lm(self.model)
        critic = getattr(unwrapped, CRITIC_ATTRIBUTE)
        delattr(unwrapped, CRITIC_ATTRIBUTE)
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            setattr(unwrapped, CRITIC_ATTRIBUTE, critic)

    def _issue_warnings_after_load(self, load_result):
        # The model files of a checkpoint lack the critic by design: `load_training_state` restores it.
        load_result.missing_keys[:] = [key for key in load_result.missing_keys
                                       if CRITIC_ATTRIBUTE not in key.split(".")]
        super()._issue_warnings_after_load(load_result)

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def save_training_state(self, checkpoint: str) -> None:
        super().save_training_state(checkpoint)
        # A checkpoint can fall inside a generation batch: the resumed run serves the rest of it from this process's
        # buffer, as the uninterrupted run does (sampling it again would need the policy that sampled it).
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        rollouts = ([rollout.state_dict() for rollout in self._buffered_rollouts] if self._step % generate_every
                    else None)
        kl_coef = None if self.kl_controller is None else self.kl_controller.value
        torch.save({"step": self._step, "rollouts": rollouts, "kl_coef": kl_coef}, self.rollouts_path(checkpoint))
        if self.critic is not None and self.args.should_save:
            # Apart from the model files; `clone`: tied or shared tensors cannot be saved as safetensors views.
            save_file({name: tensor.detach().clone().contiguous() for name, tensor in self.critic.state_dict().items()},
                      os.path.join(checkpoint, CRITIC_WEIGHTS_NAME))

    def load_training_state(self, checkpoint: str) -> None:
        super().load_training_state(checkpoint)
        state = torch.load(self.rollouts_path(checkpoint), map_location=self.accelerator.device, weights_only=True)
        self._step = state["step"]
        if self.kl_controller is not None:
            self.kl_controller.value = state["kl_coef"]
        self._buffered_rollouts = (None if state["rollouts"] is None
                                   else [Rollout.from_state_dict(rollout) for rollout in state["rollouts"]])
        if self.critic is not None:
            self.critic.load_state_dict(load_file(os.path.join(checkpoint, CRITIC_WEIGHTS_NAME),
                                                  device=str(self.accelerator.device)))

    def rollouts_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"rollouts_{self.args.process_index}.pt")

    # -- metrics ---------------------------------------------------------------------------------------------------
    def record_metric(self, name: str, values: torch.Tensor, reduction: str = "mean") -> None:
        # Rollout rows are completions, not dataset rows: `gather_for_metrics` would cut the last batch of an epoch to
        # the dataset rows left. Gather every process's values whole.
        values = self.accelerator.gather(values.detach().float().reshape(-1))
        if values.numel():
            self._metrics[self.mode][name].append(getattr(values, reduction)().item())

    def record_generation_metrics(self, rollout: Rollout) -> None:
        """TRL's `completions/*` metrics over every process and the token count, both counting the tokens the policy
        sampled (not tool results, as TRL)."""
        sampled = (rollout.completion_lengths[:, None] > torch.arange(
            rollout.completion_ids.size(1), device=rollout.completion_ids.device)).long()
        if rollout.tool_mask is not None:
            sampled = sampled * rollout.tool_mask
        self.record_tokens(torch.cat([rollout.prompt_mask, sampled], dim=1))
        lengths = gather(sampled.sum(-1).float())
        truncated = gather(rollout.is_truncated)
        self.record_value("completions/mean_length", lengths.mean())
        self.record_value("completions/min_length", lengths.min())
        self.record_value("completions/max_length", lengths.max())
        self.record_value("completions/clipped_ratio", truncated.float().mean())
        terminated = lengths[~truncated] if (~truncated).any() else lengths.new_zeros(1)
        self.record_value("completions/mean_terminated_length", terminated.mean())
        self.record_value("completions/min_terminated_length", terminated.min())
        self.record_value("completions/max_terminated_length", terminated.max())

    def record_reward_metrics(self, rewards_per_func: torch.Tensor) -> None:
        """`rewards/<name>/mean|std`, `reward` and `reward_std` (of the weighted sum) over every process."""
        for key, value in self.reward_scorer.metrics(rewards_per_func).items():
            self.record_value(key, value)
        rewards = self.reward_scorer.combine(rewards_per_func)
        self.record_value("reward", torch.nanmean(rewards))
        self.record_value("reward_std", losses.nan_std(rewards))

    def record_logged_metrics(self, logged: dict[str, list[float]]) -> None:
        """What reward functions logged through `log_metric(name, value)`: each name's mean over every process."""
        for name in sorted(set(gather_object(list(logged)))):
            self.record_sum(name, torch.tensor(logged.get(name, []), dtype=torch.float32, device=self.accelerator.device))

    def record_completions(self, rollout: Rollout, rewards_per_func: torch.Tensor,
                           advantages: torch.Tensor | None) -> None:
        """Adds the generation batch of every process to the completions table: this process's prompts and
        completions, the gathered rewards `[N_all, F]` and advantages (`[N_all]`, or per token `[N_all, C]`, shown at
        each completion's first token: the whole completion's), and the `log_extra` columns (None on the rows of a
        process whose reward functions did not log one). Collective: every process calls it."""
        extra = {}
        # Sorted, so that every process gathers the columns in the same order.
        for name in sorted(set(gather_object(list(rollout.log_columns)))):
            extra[name] = gather_object(list(rollout.log_columns.get(name, [None] * rollout.num_rows)))
        prompts = gather_object([row["prompt"] for row in rollout.rows])
        completions = gather_object(list(rollout.completions))
        if self.completion_log is None:
            return
        if advantages is not None and advantages.dim() == 2:
            advantages = advantages[:, 0]
        rewards = {name: rewards_per_func[:, i].tolist() for i, name in enumerate(self.reward_scorer.names)}
        self.completion_log.record(prompts, completions, rewards,
                                   None if advantages is None else advantages.tolist(), extra)

    def record_zero_std_groups(self, is_zero_std: torch.Tensor) -> None:
        """`frac_reward_zero_std`, and a warning the first time every group of a training batch ties: their
        advantages are all 0 and the batch teaches nothing (the "GRPO loss is 0" trap)."""
        self.record_value("frac_reward_zero_std", is_zero_std.float().mean())
        if self.model.training and bool(is_zero_std.all()) and not self._warned_ties:
            self._warned_ties = True
            logger.warning(
                "Every group of completions in this generation batch got equal rewards, so every advantage is 0 and "
                "the step has no policy gradient (the loss is only the KL term, if any). If it keeps happening, the "
                "reward is too coarse or the task too hard or too easy for the model: add a graded or format reward, "
                "raise num_generations or temperature, or pick easier prompts. `frac_reward_zero_std` tracks it."
            )

