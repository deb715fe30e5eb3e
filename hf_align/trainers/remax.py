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
gathered, so that every process sees the baseline of every group (see `OnlineTrainer.greedy_rewards`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .. import estimators
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


class ReMaxTrainer(RLOOTrainer):
    """Trains `model` on prompts with rewards from `reward_funcs` (callables with TRL's signature, reward models, or
    a list), each sample's baseline being the reward of its prompt's greedy completion."""

    config_class = ReMaxConfig
    algorithm = "ReMax"
    paper = {"title": "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large "
                      "Language Models", "id": "2310.10505", "citation": REMAX_CITATION}

    def estimator(self):
        return estimators.Estimator("greedy_baseline", {"beta": self.kl_controller.value})

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {"num_generations": args.num_generations, "beta": args.beta, "epsilon": args.epsilon,
                "temperature": args.temperature, "max_completion_length": args.max_completion_length}
