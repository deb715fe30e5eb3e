"""ReMax: REINFORCE with the reward of the greedy completion as baseline (Li et al., "ReMax: A Simple, Effective, and
Efficient Reinforcement Learning Method for Aligning Large Language Models", ICML 2024, arXiv 2310.10505). No critic.

For each prompt `x`, G completions `y_g` are sampled and one more, `ȳ`, is decoded greedily (temperature 0) and scored
by the same reward functions; `ȳ` only serves as the baseline and is not trained on. Every sample's advantage is

    A_g = r(x, y_g) - r(x, ȳ)                               (Algorithm 1; `losses.greedy_baseline_advantages`)

and the loss is sequence-level REINFORCE, `-(1/N) Σ_i A_i Σ_t log π(y_i,t | x_i, y_i,<t)` (Algorithm 1). It is written
as RLOO's clipped surrogate on the sequence ratio `ρ_i = exp(Σ_t log π - log π_old)`, averaged over sequences: while
the policy has not moved (ρ = 1) its gradient is exactly the paper's, and when a generation batch is reused
(`num_iterations > 1`) the clip keeps the update near the sampling policy. So `ReMaxTrainer` is `RLOOTrainer` with the
greedy baseline in place of the leave-one-out one.

With `beta > 0` the sampled completion's reward is KL-penalised as in RLOO, `r - β Σ_t (log π_old - log π_ref)`; the
greedy baseline is the plain reward of `ȳ` (its log-probs are never computed; any baseline that does not depend on
the sample keeps the gradient unbiased).

The paper samples one completion per prompt, the default here (`num_generations=1`); with G > 1 each sample still
gets the greedy baseline alone, independent of its siblings.

Several processes: each holds a contiguous slice of the generation batch, so a prompt's group may be split between two
processes. Each group is decoded greedily once, by the process that holds its first row, and the greedy rewards are
gathered, so that every process sees the baseline of every group (see `ReMaxTrainer.greedy_rewards`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from accelerate.utils import gather

from .. import distributed, generation, losses
from ..generation import SamplingConfig
from ..online import OnlineConfig
from .rloo import RLOOTrainer

REMAX_CITATION = """@inproceedings{li2024remax,
    title     = {{ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language Models}},
    author    = {Ziniu Li and Tian Xu and Yushun Zhang and Zhihang Lin and Yang Yu and Ruoyu Sun and Zhi-Quan Luo},
    year      = 2024,
    booktitle = {Proceedings of the 41st International Conference on Machine Learning},
}"""


@dataclass
class ReMaxConfig(OnlineConfig):
    """Configuration of `ReMaxTrainer`: `OnlineConfig` with one sampled completion per prompt, as in the paper."""

    min_generations: ClassVar[int] = 1  # the baseline is the greedy completion, not the other samples

    num_generations: int = field(
        default=1, metadata={"help": "Completions sampled per prompt, each compared with the greedy one."}
    )

    def greedy_sampling(self, batch_size: int) -> SamplingConfig:
        """How the baseline is decoded: greedily, with the prompts rendered and the engine chosen as for the samples
        (`chat_template_kwargs`, continuous batching); the sampling filters and `generation_kwargs` do not apply."""
        return SamplingConfig(
            max_new_tokens=self.max_completion_length, temperature=0, batch_size=batch_size,
            chat_template_kwargs=self.chat_template_kwargs,
            continuous_batching=self.use_transformers_continuous_batching,
            continuous_batching_config=self.transformers_continuous_batching_config,
        )


class ReMaxTrainer(RLOOTrainer):
    """Trains `model` on prompts with rewards from `reward_funcs` (callables with TRL's signature, reward models, or
    a list), each sample's baseline being the reward of its prompt's greedy completion."""

    config_class = ReMaxConfig
    algorithm = "ReMax"
    paper = {"title": "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large "
                      "Language Models", "id": "2310.10505", "citation": REMAX_CITATION}

    def score_rollout(self, rows: list[dict]) -> dict:
        # `compute_advantages` needs the baseline; `OnlineTrainer.score_rollout` passes it the rewards only.
        self._greedy_rewards = self.greedy_rewards(rows)
        return super().score_rollout(rows)

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
            greedy = generation.generate_completions(generator, self.tokenizer, prompts,
                                                     self.args.greedy_sampling(len(prompts)))
        rewards_per_func = self.score_completions(rows, greedy)
        self.reward_scorer.pop_logs()  # what reward functions log should describe the trained-on samples only
        return self.reward_scorer.combine(rewards_per_func)

    def compute_advantages(self, rewards_per_func, rollout):
        rewards = self.reward_scorer.combine(rewards_per_func)
        if self.args.beta != 0:
            mask = rollout["completion_mask"]
            token_kl = rollout["old_logps"] - rollout["ref_logps"]
            self.record_token_mean("kl", token_kl, mask)
            rewards = rewards - self.args.beta * gather((token_kl * mask).sum(-1))
        self.record_value("greedy_reward", torch.nanmean(self._greedy_rewards))
        return losses.greedy_baseline_advantages(rewards, self._greedy_rewards, self.group_size)

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {"num_generations": args.num_generations, "beta": args.beta, "epsilon": args.epsilon,
                "temperature": args.temperature, "max_completion_length": args.max_completion_length}
