"""Every algorithm's recipe: the trainer, the embedded dataset it trains on when none is named, the Config values
for the embedded tiny model, and how it runs (one trainer, one trainer with a verifier as the reward, or a pipeline of
stages, hf_align.pipelines). `hf-align <algorithm>` and examples/<algorithm>.py both call `run_recipe`.

    from hf_align.recipes import run_recipe
    trainer = run_recipe("dpo", ["--max_steps", "10"])    # = hf-align dpo --max_steps 10
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable

@dataclass(frozen=True)
class Recipe:
    """How `hf-align <algorithm>` trains. `runner(recipe, argv)` returns the trained trainer. Trainers are named,
    not imported, so that `hf-align --help` loads none."""

    summary: str  # one line for `hf-align --help`
    trainer: str  # "module:Class" under hf_align
    runner: Callable
    default_dataset: str  # the embedded dataset trained on when no dataset is named
    embedded_defaults: dict = field(default_factory=dict)  # Config values for the embedded tiny model only

    @property
    def trainer_class(self) -> type:
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(f"hf_align.{module}"), name)


def run_offline(recipe: Recipe, argv: list[str]):
    """One trainer on a fixed dataset."""
    from . import scripts

    return scripts.run(recipe.trainer_class, recipe.default_dataset, recipe.embedded_defaults, argv)


def run_verifiable(recipe: Recipe, argv: list[str], extra_reward_funcs=()):
    """An online trainer with a verifier picked from the dataset's columns as the reward (RLVR)."""
    from . import scripts

    return scripts.run_rlvr(recipe.trainer_class, recipe.embedded_defaults, argv,
                            extra_reward_funcs=list(extra_reward_funcs))


def run_verifiable_with_format_reward(recipe: Recipe, argv: list[str]):
    """`run_verifiable` with a second reward for decoupled GDPO, which normalises each reward on its own: whether the
    answer is a bare number."""
    from .verifiers import regex_reward

    return run_verifiable(recipe, argv, [regex_reward(r"\s*-?\d+\s*", name="number_format_reward")])


def run_self_play(recipe: Recipe, argv: list[str]):
    from .pipelines import self_play

    return self_play(recipe, argv)


def run_rlhf(recipe: Recipe, argv: list[str]):
    from .pipelines import rlhf

    return rlhf(recipe, argv)


def tiny_model_offline_defaults(learning_rate: float) -> dict:
    """The Config values an offline recipe trains the embedded tiny model with: it starts from random weights, so it
    needs a large `learning_rate`; two epochs, evaluated every 50 steps, nothing saved but the final model."""
    return dict(learning_rate=learning_rate, per_device_train_batch_size=8, num_train_epochs=2, logging_steps=10,
                eval_strategy="steps", eval_steps=50, save_strategy="no", report_to="none")


def tiny_model_rlvr_defaults(**values) -> dict:
    """The Config values an RLVR recipe trains the embedded tiny model with (after its SFT warm start): short answers,
    a large learning rate, and `values` on top."""
    return dict(learning_rate=1e-3, per_device_train_batch_size=16, max_completion_length=6, logging_steps=20,
                save_strategy="no", report_to="none", **values)


RECIPES: dict[str, Recipe] = {
    "sft": Recipe(
        summary="SFT on prompt-completion pairs (or `text` / `messages` datasets)",
        trainer="trainers.sft:SFTTrainer", runner=run_offline, default_dataset="sft",
        embedded_defaults=tiny_model_offline_defaults(learning_rate=2e-3),
    ),
    "reward": Recipe(
        summary="Reward model on preference pairs (a one-output sequence classifier, Bradley–Terry loss)",
        trainer="trainers.reward:RewardTrainer", runner=run_offline, default_dataset="preference",
        embedded_defaults=tiny_model_offline_defaults(learning_rate=5e-4),
    ),
    "dpo": Recipe(
        summary="DPO on preference pairs",
        trainer="trainers.dpo:DPOTrainer", runner=run_offline, default_dataset="preference",
        embedded_defaults=tiny_model_offline_defaults(learning_rate=5e-4),
    ),
    "ipo": Recipe(
        summary="IPO on preference pairs (DPO's data; squared loss on length-normalised log-ratios)",
        trainer="trainers.ipo:IPOTrainer", runner=run_offline, default_dataset="preference",
        embedded_defaults=tiny_model_offline_defaults(learning_rate=5e-4),
    ),
    "kto": Recipe(
        summary="KTO on examples labelled desirable or undesirable (no pairs needed)",
        trainer="trainers.kto:KTOTrainer", runner=run_offline, default_dataset="unpaired_preference",
        embedded_defaults=tiny_model_offline_defaults(learning_rate=5e-4),
    ),
    "orpo": Recipe(
        summary="ORPO on preference pairs: SFT on chosen plus an odds-ratio penalty, no reference model",
        trainer="trainers.orpo:ORPOTrainer", runner=run_offline, default_dataset="preference",
        embedded_defaults=tiny_model_offline_defaults(learning_rate=5e-4),
    ),
    "simpo": Recipe(
        summary="SimPO on preference pairs: length-normalised rewards and a margin, no reference model",
        trainer="trainers.simpo:SimPOTrainer", runner=run_offline, default_dataset="preference",
        embedded_defaults=tiny_model_offline_defaults(learning_rate=5e-4),
    ),
    "step_dpo": Recipe(
        summary="Step-DPO (arXiv 2406.18629) on step-level pairs of reasoning steps",
        trainer="trainers.step_dpo:StepDPOTrainer", runner=run_offline, default_dataset="step_preference",
        # For the embedded tiny model only: it starts from random weights, so it needs a large learning rate.
        embedded_defaults=dict(
            learning_rate=1e-3, per_device_train_batch_size=8, num_train_epochs=4, warmup_steps=0.0, logging_steps=10,
            eval_strategy="steps", eval_steps=25, save_strategy="no", report_to="none",
        ),
    ),
    "distributional_gdpo": Recipe(
        summary="Distributional GDPO (arXiv 2412.20299) on belief-conditioned preference pairs",
        trainer="trainers.distributional_gdpo:DistributionalGDPOTrainer", runner=run_offline,
        default_dataset="belief_preference",
        # For the embedded tiny model only: it starts from random weights, so it needs a large learning rate; β = 0.5
        # makes the belief-conditioned preference learn within the few epochs this toy task gets.
        embedded_defaults=dict(
            learning_rate=1e-3, beta=0.5, per_device_train_batch_size=8, num_train_epochs=6, logging_steps=10,
            eval_strategy="steps", eval_steps=50, save_strategy="no", report_to="none",
        ),
    ),
    "spin": Recipe(
        summary="SPIN (arXiv 2401.01335): self-play fine-tuning from SFT data alone",
        trainer="trainers.spin:SPINTrainer", runner=run_self_play, default_dataset="sft",
        # For the embedded tiny model only (after its SFT warm-up): greedy responses, one epoch a round at a small
        # learning rate, so that each round moves the model a little (larger steps overshoot on this tiny model).
        embedded_defaults=dict(
            num_rounds=3, max_new_tokens=32, temperature=0.0, learning_rate=1e-5, warmup_steps=0.0,
            num_train_epochs=1, per_device_train_batch_size=8, logging_steps=10, eval_strategy="epoch",
            save_strategy="no", report_to="none",
        ),
    ),
    "grpo": Recipe(
        summary="GRPO (arXiv 2402.03300) with verifiable rewards (RLVR)",
        trainer="trainers.grpo:GRPOTrainer", runner=run_verifiable, default_dataset="comparisons",
        # For the embedded tiny model only (after its SFT warm start): short answers, a large learning rate.
        embedded_defaults=tiny_model_rlvr_defaults(max_steps=300, num_generations=8),
    ),
    "rloo": Recipe(
        summary="RLOO (arXiv 2402.14740): REINFORCE with a leave-one-out baseline (RLVR)",
        trainer="trainers.rloo:RLOOTrainer", runner=run_verifiable, default_dataset="comparisons",
        # For the embedded tiny model only (after its SFT warm start): four samples a prompt, short answers, a large
        # learning rate, no KL (the warm start is a weak reference).
        embedded_defaults=tiny_model_rlvr_defaults(max_steps=300, num_generations=4, beta=0.0),
    ),
    "remax": Recipe(
        summary="ReMax (arXiv 2310.10505): the greedy answer's reward as the baseline (RLVR)",
        trainer="trainers.remax:ReMaxTrainer", runner=run_verifiable, default_dataset="comparisons",
        # For the embedded tiny model only (after its SFT warm start): two samples a prompt (the paper's one learns
        # more slowly here), short answers, a large learning rate. The warm start's greedy answers beat most of its
        # samples, so most advantages are negative; the KL to the warm start keeps pushing down wrong samples from
        # spreading probability over nonsense.
        embedded_defaults=tiny_model_rlvr_defaults(max_steps=300, num_generations=2, beta=0.1),
    ),
    "reinforce": Recipe(
        summary="REINFORCE (Williams 1992) with verifiable rewards (RLVR)",
        trainer="trainers.reinforce:ReinforceTrainer", runner=run_verifiable, default_dataset="comparisons",
        # For the embedded tiny model only (after its SFT warm start): four samples a prompt, short answers, a large
        # learning rate, no KL (the warm start is a weak reference).
        embedded_defaults=tiny_model_rlvr_defaults(max_steps=150, num_generations=4, beta=0.0),
    ),
    "reinforce_pp": Recipe(
        summary="REINFORCE++ (arXiv 2501.03262) with verifiable rewards (RLVR)",
        trainer="trainers.reinforce:ReinforcePPTrainer", runner=run_verifiable, default_dataset="comparisons",
        # For the embedded tiny model only (after its SFT warm start): four samples a prompt with the group baseline,
        # short answers, a large learning rate.
        embedded_defaults=tiny_model_rlvr_defaults(max_steps=150, num_generations=4,
                                                   advantage_estimator="reinforce++_baseline"),
    ),
    "decoupled_gdpo": Recipe(
        summary="Reward-decoupled GDPO (arXiv 2601.05242): a verifier and a format check (RLVR)",
        trainer="trainers.decoupled_gdpo:GDPOTrainer", runner=run_verifiable_with_format_reward,
        default_dataset="comparisons",
        # For the embedded tiny model only (after its SFT warm start): four samples a prompt, short answers, a large
        # learning rate.
        embedded_defaults=tiny_model_rlvr_defaults(max_steps=150, num_generations=4),
    ),
    "online_dpo": Recipe(
        summary="Online DPO (arXiv 2402.04792) on pairs sampled from the policy, judged by a verifier",
        trainer="trainers.online_dpo:OnlineDPOTrainer", runner=run_verifiable, default_dataset="comparisons",
        # For the embedded tiny model only (after its SFT warm start): short answers, a large learning rate.
        embedded_defaults=dict(
            learning_rate=1e-3, max_steps=150, per_device_train_batch_size=16, max_new_tokens=6, logging_steps=10,
            save_strategy="no", report_to="none",
        ),
    ),
    "trpo": Recipe(
        summary="TRPO (arXiv 1502.05477) for LLMs: natural-gradient steps inside a KL trust region (RLVR)",
        trainer="trainers.trpo:TRPOTrainer", runner=run_verifiable, default_dataset="comparisons",
        # For the embedded tiny model only (after its SFT warm start): group-relative advantages over 8 samples a
        # prompt, one trust-region step per batch of 32 completions.
        embedded_defaults=dict(
            advantage_estimator="grpo", num_generations=8, per_device_train_batch_size=32, max_completion_length=6,
            max_kl=0.02, max_steps=30, logging_steps=5, save_strategy="no", report_to="none",
        ),
    ),
    "ppo": Recipe(
        summary="The classic three-stage RLHF pipeline: SFT, a reward model, then PPO against it",
        trainer="trainers.ppo:PPOTrainer", runner=run_rlhf, default_dataset="preference",
        # The PPO stage's values; the SFT and reward stages have theirs in hf_align.pipelines.
        embedded_defaults=dict(
            learning_rate=3e-4, max_steps=100, per_device_train_batch_size=16, max_completion_length=16,
            num_iterations=2, beta=0.05, logging_steps=10, eval_strategy="steps", eval_steps=100, eval_on_start=True,
            num_generations_eval=4, per_device_eval_batch_size=16, save_strategy="no", report_to="none",
        ),
    ),
}


def run_recipe(algorithm: str, argv: list[str] | None = None):
    """Trains `algorithm` (a key of `RECIPES`) with the command line `argv` (default: `sys.argv[1:]`); returns the
    trained trainer (for a pipeline, its last stage's). The run is then over: a distributed run's process group is
    destroyed (accelerate's `end_training`), since at interpreter exit gloo's threads can abort a finished run."""
    if algorithm not in RECIPES:
        raise KeyError(f"No recipe for {algorithm!r}; recipes: {', '.join(RECIPES)}")
    recipe = RECIPES[algorithm]
    trainer = recipe.runner(recipe, sys.argv[1:] if argv is None else list(argv))
    trainer.accelerator.end_training()
    return trainer
