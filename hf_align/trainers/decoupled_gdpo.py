"""Reward-decoupled GDPO: Group reward-Decoupled Normalization Policy Optimization (Liu et al., arXiv 2601.05242), GRPO
for several reward functions. Not to be confused with distributional GDPO (`DistributionalGDPOTrainer`, arXiv
2412.20299), which aligns to a group's belief distribution from preference pairs.

GRPO sums the K weighted rewards and then normalises the sum within each group, so different combinations of rewards
with the same sum get the same advantage. GDPO normalises each reward function within its group first, sums, and
whitens the sum over the whole batch (eq. 4–6; `losses.decoupled_group_advantages`):

    Â_k = (r_k - mean_G(r_k)) / (std_G(r_k) + 1e-4),   s = Σ_k w_k Â_k,   A = (s - mean_N(s)) / (std_N(s) + 1e-4)

over the completion's group (G) and the whole generation batch of every process (N), stds Bessel-corrected.

The loss is GRPO's, with every `GRPOConfig` option (loss_type, β, ε, importance_sampling_level...). This is TRL 1.16's
`GRPOTrainer` with `multi_objective_aggregation="normalize_then_sum"`, number for number, and `GRPOTrainer` with that
setting is this trainer; `GDPOTrainer` only names it (model card, paper) and makes it the default. TRL ignores
`scale_rewards` there; hf_align refuses a value other than the default instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .grpo import GRPOConfig, GRPOTrainer

GDPO_CITATION = """@article{liu2026gdpo,
    title   = {{GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization}},
    author  = {Shih-Yang Liu and Xin Dong and Ximing Lu and Shizhe Diao and Peter Belcak and Mingjie Liu and Min-Hung Chen and Hongxu Yin and Yu-Chiang Frank Wang and Kwang-Ting Cheng and Yejin Choi and Jan Kautz and Pavlo Molchanov},
    year    = 2026,
    eprint  = {arXiv:2601.05242},
}"""


@dataclass
class GDPOConfig(GRPOConfig):
    """Configuration of `GDPOTrainer`: `GRPOConfig` with `multi_objective_aggregation="normalize_then_sum"`."""

    multi_objective_aggregation: str = field(
        default="normalize_then_sum",
        metadata={"help": "GDPO's: normalise each reward function within its group, sum, whiten over the batch."},
    )

    def __post_init__(self):
        if self.multi_objective_aggregation != "normalize_then_sum":
            raise ValueError(f"multi_objective_aggregation={self.multi_objective_aggregation!r} is not GDPO: use "
                             "GRPOConfig / GRPOTrainer for it.")
        super().__post_init__()


class GDPOTrainer(GRPOTrainer):
    """Trains `model` on prompts with several rewards from `reward_funcs` (callables with TRL's signature, reward
    models, or both; weighted by `args.reward_weights`), each normalised within its group before they are summed."""

    config_class = GDPOConfig
    algorithm = "GDPO"
    paper = {"title": "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL "
                      "Optimization", "id": "2601.05242", "citation": GDPO_CITATION}

    def card_hyperparameters(self) -> dict:
        hyperparameters = super().card_hyperparameters()
        del hyperparameters["scale_rewards"], hyperparameters["multi_objective_aggregation"]
        return {**hyperparameters, "reward_weights": self.reward_scorer.weights.tolist()}
