"""What every online trainer shares (GRPO and its family, Online DPO): prompts in, completions sampled from the
policy in groups, scored by reward functions / reward models, and each generation batch served as several
optimisation steps. Subclasses implement `compute_advantages` (or override `score_rollout`) and `compute_loss`.

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
import torch.nn.functional as F
from accelerate.utils import gather, gather_object, set_seed

from . import data, distributed, losses, models
from .completion_log import CompletionLog, active_trackers
from .config import AlignConfig, PackingArguments, VLLMArguments
from .generation import Completions, SamplingConfig
from .logprobs import CompletionLogProbs
from .reference_sync import ReferenceSync, ReferenceSyncArguments
from .rewards import RewardScorer
from .rollout import (
    GroupSampler, completion_token_logprobs, concat_rollouts, sample_rollout, select_rollout_rows, shuffle_rollout,
    split_rollout,
)
from .trainer import AlignTrainer

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


def pad_rollout(rollout: dict, pad_to_multiple_of: int, pad_token_id: int) -> dict:
    """The rollout with its prompt tensors left-padded and its completion tensors right-padded to a multiple of
    `pad_to_multiple_of` tokens (TRL's `pad_to_multiple_of`): masked-out padding, so no number changes."""

    def padding(width: int) -> int:
        return -width % pad_to_multiple_of

    prompt_pad, completion_pad = padding(rollout["prompt_ids"].size(1)), padding(rollout["completion_ids"].size(1))
    return {
        **rollout,
        "prompt_ids": F.pad(rollout["prompt_ids"], (prompt_pad, 0), value=pad_token_id),
        "prompt_mask": F.pad(rollout["prompt_mask"], (prompt_pad, 0), value=0),
        "completion_ids": F.pad(rollout["completion_ids"], (0, completion_pad), value=pad_token_id),
        "completion_mask": F.pad(rollout["completion_mask"], (0, completion_pad), value=0),
    }


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


@dataclass
class ScoredSamples:
    """One process's sampled completions, one per row of `rows` (whole groups, prompt-major), and their rewards:
    what `OnlineTrainer.sample_and_score` returns before the loss's log-probs and the advantages are computed."""

    rows: list[dict]
    rollout: dict  # the tensors of `rollout.sample_rollout`, `is_truncated` and `completion_lengths`
    texts: list[str]
    rewards_per_func: torch.Tensor  # [n, F], this process's
    extra_columns: dict[str, list]  # the reward functions' `log_extra` columns, one value per row

    def select_groups(self, keep: torch.Tensor, group_size: int) -> ScoredSamples:
        """The groups where `keep` (`[n / G]` bool) is True, in order."""
        index = torch.arange(len(self.rows)).view(-1, group_size)[keep.cpu()].reshape(-1)
        rows = index.tolist()
        return ScoredSamples(
            [self.rows[i] for i in rows], select_rollout_rows(self.rollout, index), [self.texts[i] for i in rows],
            self.rewards_per_func[index.to(self.rewards_per_func.device)],
            {name: [values[i] for i in rows] for name, values in self.extra_columns.items()},
        )

    @staticmethod
    def concat(parts: list[ScoredSamples], pad_token_id: int) -> ScoredSamples:
        """The rows of `parts` one after the other; a `log_extra` column missing from a part is None on its rows."""
        columns = sorted({name for part in parts for name in part.extra_columns})
        return ScoredSamples(
            [row for part in parts for row in part.rows],
            concat_rollouts([part.rollout for part in parts], pad_token_id),
            [text for part in parts for text in part.texts],
            torch.cat([part.rewards_per_func for part in parts]),
            {name: [value for part in parts for value in part.extra_columns.get(name, [None] * len(part.rows))]
             for name in columns},
        )


class OnlineTrainer(AlignTrainer):
    """The constructor of TRL's GRPOTrainer / RLOOTrainer, the generation-batch loop, reward scoring, the reference
    (none with `beta=0`; the adapter disabled under peft; else a frozen copy), the generation metrics and the
    completions table (`log_completions`, `completion_log`)."""

    config_class = OnlineConfig
    dataset_columns = ("prompt",)
    has_advantages = True  # whether `compute_advantages` returns advantages (the completions table shows them)

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
        self.ref_model = self.build_reference(None) if self.args.beta != 0 else None
        if isinstance(self.args, ReferenceSyncArguments):
            self.reference_sync = ReferenceSync.attach(self)
        # A group can be split between processes: each process samples from its own random stream (seed + its index),
        # or they would draw the same completions for their shares of the group.
        set_seed(self.args.seed, device_specific=True)
        self._step = 0  # micro-steps taken, as TRL counts them (for the generation cadence)
        self._buffered_rollouts: list[dict] | None = None
        self._warned_ties = False
        args = self.args
        # Every process gathers its rows for the table; the main process keeps, writes and pushes it.
        self.completion_log = CompletionLog(
            os.path.join(args.output_dir, "completions"), args.generation_batch_size, args.num_completions_to_print,
            args.log_unique_prompts, args.log_completions_hub_repo, args.hub_private_repo, args.hub_token,
        ) if args.log_completions and self.accelerator.is_main_process else None

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

    def _prepare_inputs(self, rows: list[dict]) -> dict:
        if not self.model.training:
            return self.score_rollout(rows)
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or self._buffered_rollouts is None:
            rollout = shuffle_rollout(self.score_rollout(rows))
            self._buffered_rollouts = split_rollout(rollout, self.args.steps_per_generation)
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

    def save_training_state(self, checkpoint: str) -> None:
        super().save_training_state(checkpoint)
        # A checkpoint can fall inside a generation batch: the resumed run serves the rest of it from this process's
        # buffer, as the uninterrupted run does (sampling it again would need the policy that sampled it).
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        rollouts = self._buffered_rollouts if self._step % generate_every else None
        torch.save({"step": self._step, "rollouts": rollouts}, self.rollouts_path(checkpoint))

    def load_training_state(self, checkpoint: str) -> None:
        super().load_training_state(checkpoint)
        state = torch.load(self.rollouts_path(checkpoint), map_location=self.accelerator.device, weights_only=True)
        self._step, self._buffered_rollouts = state["step"], state["rollouts"]

    def rollouts_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"rollouts_{self.args.process_index}.pt")

    @property
    def group_size(self) -> int:
        return self.args.num_generations if self.model.training else self.args.num_generations_eval

    def sampling_config(self, num_rows: int) -> SamplingConfig:
        return self.args.sampling(batch_size=max(num_rows, 1))

    def score_rollout(self, rows: list[dict]) -> dict:
        """Samples one completion per row (the rows hold each prompt `group_size` times) and scores them (with dynamic
        sampling, replacing groups whose rewards all tie), computes what the loss needs (old log-probs when the policy
        changes before the rollout is used up, reference log-probs with `beta != 0`) and sets this process's
        `advantages`."""
        samples = self.sample_and_score(rows)
        if self.model.training and self.dynamic_sampling_rounds is not None:
            samples = self.dynamically_sampled(samples)
        rollout = samples.rollout
        self.record_generation_metrics(rollout, rollout["completion_lengths"], rollout["is_truncated"])
        rollout["num_items_in_batch"] = self.accelerator.reduce(rollout["completion_mask"].sum(), reduction="sum")
        with torch.no_grad():
            if self.needs_old_logps():
                rollout["old_logps"] = self.token_logps(self.model, rollout)
            if self.args.beta != 0:
                with models.reference_model(self.model, self.ref_model) as reference:
                    rollout["ref_logps"] = self.token_logps(reference, rollout)

        rewards_per_func = gather(samples.rewards_per_func)
        self.record_reward_metrics(rewards_per_func)
        advantages = self.compute_advantages(rewards_per_func, rollout)
        if self.args.log_completions:
            self.record_completions([row["prompt"] for row in samples.rows], samples.texts, rewards_per_func,
                                    advantages if self.has_advantages else None, samples.extra_columns)
        rollout["advantages"] = advantages[self.local_rows(len(samples.rows))]
        return rollout

    def sample_and_score(self, rows: list[dict]) -> ScoredSamples:
        """This process's completions of `rows` (one per row) and their rewards, before anything the loss needs. What
        the reward functions logged as metrics is recorded here, for every completion sampled."""
        device = self.accelerator.device
        prompts = [row["prompt"] for row in rows]
        with distributed.gathered_for_generation(self.accelerator, self.model,
                                                 self.args.ds3_gather_for_generation) as generator:
            rollout, sampled, is_truncated = sample_rollout(
                generator, self.tokenizer, prompts, self.sampling_config(len(prompts)),
                mask_truncated=self.args.mask_truncated_completions, device=device,
            )
        if self.args.pad_to_multiple_of:
            rollout = pad_rollout(rollout, self.args.pad_to_multiple_of, self.tokenizer.pad_token_id)
        rollout["is_truncated"] = is_truncated
        rollout["completion_lengths"] = sampled.lengths.to(device)  # unmasked, as sampled: length-based rewards read them
        rewards_per_func = self.score_completions(rows, sampled).to(device)
        extra_columns, logged_metrics = self.reward_scorer.pop_logs()
        self.record_logged_metrics(logged_metrics)
        return ScoredSamples(rows, rollout, sampled.texts, rewards_per_func, extra_columns)

    @property
    def dynamic_sampling_rounds(self) -> int | None:
        """With DAPO's dynamic sampling, the most extra generation rounds per generation batch; None: off."""
        return None

    def dynamically_sampled(self, samples: ScoredSamples) -> ScoredSamples:
        """DAPO's dynamic sampling (arXiv 2503.14476, §3.2): this process's share of the generation batch with the
        groups whose rewards all tie (advantages 0: nothing to learn) replaced by groups for further prompts, sampled
        in up to `dynamic_sampling_rounds` extra rounds; if groups are still missing then, tied groups fill the share.

        Every process fills its own share with its own whole groups, so that no completion moves between processes;
        ties are decided on the gathered rewards, so every process knows every share's shortfall, runs the same
        rounds (sampling the largest shortfall each time) and ends with as many rows as it started with."""
        group_size, process = self.group_size, self.accelerator.process_index
        wanted = len(samples.rows) // group_size  # groups per process
        untied, tied = [], []  # this process's groups, per round
        untied_counts, tied_count = 0, 0  # untied groups per process, tied groups of every process
        rounds = 0
        while True:
            is_tied = self.tied_groups(gather(samples.rewards_per_func), gather(samples.rollout["completion_lengths"]))
            is_tied = is_tied.view(self.accelerator.num_processes, -1)
            untied.append(samples.select_groups(~is_tied[process], group_size))
            tied.append(samples.select_groups(is_tied[process], group_size))
            untied_counts = untied_counts + (~is_tied).sum(dim=1)
            tied_count += int(is_tied.sum())
            missing = int((wanted - untied_counts).clamp(min=0).max())
            if missing == 0 or rounds == self.dynamic_sampling_rounds:
                break
            rounds += 1
            samples = self.sample_and_score(self.further_prompt_rows(missing, rounds))
        # Untied groups first, so that tied ones only fill what the rounds left missing.
        groups = ScoredSamples.concat(untied + tied, self.tokenizer.pad_token_id)
        kept = groups.select_groups(torch.arange(len(groups.rows) // group_size) < wanted, group_size)
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

    def tied_groups(self, rewards_per_func: torch.Tensor, completion_lengths: torch.Tensor) -> torch.Tensor:
        """Whether each group's rewards all tie, `[N_all / G]` bool, from the gathered rewards `[N_all, F]` and
        completion lengths `[N_all]`: on the weighted reward sum (its group std is 0)."""
        rewards = self.reward_scorer.combine(rewards_per_func)
        return losses.reward_std_is_zero(rewards, self.group_size, scale="group")[::self.group_size]

    def score_completions(self, rows: list[dict], sampled: Completions) -> torch.Tensor:
        """Rewards `[n, F]` (this process's) of `sampled`, one completion per row, with the rows' other columns: the
        completions as text, or as one assistant message when the prompts are conversational (TRL's format)."""
        prompts = [row["prompt"] for row in rows]
        completions = completions_as_passed(prompts, sampled.texts)
        completion_ids = [ids[:length].tolist() for ids, length in zip(sampled.completion_ids, sampled.lengths)]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
        return self.reward_scorer.score(prompts, completions, completion_ids, columns, self.state)

    def local_rows(self, rows: int) -> slice:
        """This process's rows in a batch gathered from every process, each holding `rows` of them."""
        process = self.accelerator.process_index
        return slice(process * rows, (process + 1) * rows)

    def gather_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values `[n, C]` of every process, `[N_all, C_max]`, in the gathered order, right-padded with 0 to
        the longest completion of any process."""
        return gather(self.accelerator.pad_across_processes(values, dim=1))

    def needs_old_logps(self) -> bool:
        """Whether the loss needs the sampling policy's log-probs: only when an optimizer step falls between sampling
        and the rollout's last use (otherwise the ratio is 1 and the loss uses the detached current log-probs)."""
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        return self.model.training and self.args.gradient_accumulation_steps % generate_every != 0

    def token_logps(self, model, rollout: dict) -> torch.Tensor:
        """Per-token log-probs `[N, C]` of the rollout's completions under `model`, without gradients, one
        micro-batch of rows at a time."""
        batch_size = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        return self.rollout_logprobs(model, rollout, batch_size=batch_size).token_logps

    def rollout_logprobs(self, model, rollout: dict, *, temperature: float | None = None, with_stats: bool = False,
                         entropy_grad: bool = False, batch_size: int | None = None) -> CompletionLogProbs:
        """`rollout.completion_token_logprobs` at the sampling temperature (unless given) with the Config's packing
        (`prefix_sharing`, `padding_free`)."""
        args = self.args
        return completion_token_logprobs(
            model, rollout, temperature=args.temperature if temperature is None else temperature,
            with_stats=with_stats, entropy_grad=entropy_grad, batch_size=batch_size,
            prefix_sharing=args.prefix_sharing, padding_free=args.padding_free,
        )

    def compute_advantages(self, rewards_per_func: torch.Tensor, rollout: dict) -> torch.Tensor:
        """Advantages of every process's completions from the gathered rewards `[N_all, F]` (NaN: a function did
        not apply); returns `[N_all]` (or `[N_all, C]`), in the gathered order."""
        raise NotImplementedError

    # -- metrics ---------------------------------------------------------------------------------------------------
    def record_metric(self, name: str, values: torch.Tensor, reduction: str = "mean") -> None:
        # Rollout rows are completions, not dataset rows: `gather_for_metrics` would cut the last batch of an epoch to
        # the dataset rows left. Gather every process's values whole.
        values = self.accelerator.gather(values.detach().float().reshape(-1))
        if values.numel():
            self._metrics[self.mode][name].append(getattr(values, reduction)().item())

    def record_generation_metrics(self, rollout: dict, lengths: torch.Tensor, is_truncated: torch.Tensor) -> None:
        """TRL's `completions/*` metrics over every process, and the token count."""
        self.record_tokens(torch.cat([rollout["prompt_mask"], (lengths[:, None] > torch.arange(
            rollout["completion_ids"].size(1), device=lengths.device)).long()], dim=1))
        lengths = gather(lengths.float())
        truncated = gather(is_truncated)
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

    def record_completions(self, prompts: list, texts: list[str], rewards_per_func: torch.Tensor,
                           advantages: torch.Tensor | None, extra_columns: dict[str, list]) -> None:
        """Adds the generation batch of every process to the completions table: this process's `prompts` and
        completion `texts`, the gathered rewards `[N_all, F]` and advantages (`[N_all]`, or per token `[N_all, C]`,
        shown at each completion's first token: the whole completion's), and the `log_extra` columns (None on the
        rows of a process whose reward functions did not log one). Collective: every process calls it."""
        extra = {}
        # Sorted, so that every process gathers the columns in the same order.
        for name in sorted(set(gather_object(list(extra_columns)))):
            extra[name] = gather_object(list(extra_columns.get(name, [None] * len(prompts))))
        prompts, completions = gather_object(list(prompts)), gather_object(completions_as_passed(prompts, texts))
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

