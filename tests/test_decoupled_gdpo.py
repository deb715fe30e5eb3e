"""GDPOTrainer (reward-decoupled GDPO, arXiv 2601.05242): advantages worked out by hand on fixed completions, the
numbers of TRL 1.16's GRPOTrainer with `multi_objective_aggregation="normalize_then_sum"` on the same completions
(test_grpo.py's set-up), config errors, and learning two rewards at once on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from test_grpo import PARITY_KEYS, _assert_logs_match, _logs, _prompts, _settings, answer_reward, length_reward
from test_grpo import patch_hf_align_generation  # noqa: F401 (a fixture, found by pytest through this import)
from test_grpo import patch_trl_generation, trl
from test_reinforce import (LENGTHS, QUIET, group_rows, heldout_space_reward, learning_args, space_reward,
                            training_trainer, use_fixed_generation)

from hf_align.generation import SamplingConfig, generate_completions
from hf_align.trainers.decoupled_gdpo import GDPOConfig, GDPOTrainer

EPS = 1e-4  # TRL's std epsilon


def token_count_reward(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def even_count_reward(completion_ids, **kwargs):
    return [float(len(ids) % 2 == 0) for ids in completion_ids]


def digit_reward(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def bessel_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_gdpo_normalises_each_reward_in_its_group_then_whitens_the_sum(tiny_model_path, embedded_data, monkeypatch,
                                                                       tmp_path):
    use_fixed_generation(monkeypatch, LENGTHS)
    weights = [1.0, 0.5]
    args = GDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                      reward_weights=weights, **QUIET)
    trainer = training_trainer(GDPOTrainer(tiny_model_path, [token_count_reward, even_count_reward], args=args,
                                           train_dataset=embedded_data("prompts", 2)))
    advantages = trainer.make_rollout(group_rows(embedded_data("prompts", 2), 3)).advantages
    # token counts 2, 4, 3 | 1, 2, 3 and their parity 1, 1, 0 | 0, 1, 0, each normalised within its group of 3
    summed = [0.0] * 6
    for weight, rewards in zip(weights, ([2, 4, 3, 1, 2, 3], [1, 1, 0, 0, 1, 0])):
        for group in (slice(0, 3), slice(3, 6)):
            values = rewards[group]
            mean, std = sum(values) / 3, bessel_std(values)
            for i, value in zip(range(6)[group], values):
                summed[i] += weight * (value - mean) / (std + EPS)
    mean, std = sum(summed) / 6, bessel_std(summed)
    expected = torch.tensor([(s - mean) / (std + EPS) for s in summed])
    torch.testing.assert_close(advantages, expected)
    # GRPO normalises the weighted sums within each group instead, which gives other advantages here
    sums = torch.tensor([[2.5, 4.5, 3.0], [1.0, 2.5, 3.0]])
    grpo = ((sums - sums.mean(1, keepdim=True)) / (sums.std(1, keepdim=True) + EPS)).reshape(-1)
    assert (grpo - expected).abs().max() > 0.1


@pytest.mark.parametrize("loss_type, conversational", [("dapo", False), ("grpo", True)])
def test_gdpo_matches_trl_normalize_then_sum_on_the_same_completions(loss_type, conversational, tiny_model_path,
                                                                     tiny_tokenizer, embedded_data,
                                                                     patch_hf_align_generation, tmp_path):
    dataset = _prompts(embedded_data, conversational)
    settings = _settings(tmp_path, loss_type=loss_type, reward_weights=[1.0, 0.5])
    funcs = [length_reward, answer_reward]  # the second returns None for some rows

    torch.manual_seed(0)
    theirs = trl.GRPOTrainer(tiny_model_path, funcs, train_dataset=dataset,
                             args=trl.GRPOConfig(**settings, multi_objective_aggregation="normalize_then_sum"))
    patch_trl_generation(theirs, tiny_tokenizer.eos_token_id)
    theirs.train()
    torch.manual_seed(0)
    ours = GDPOTrainer(tiny_model_path, funcs, args=GDPOConfig(**settings), train_dataset=dataset)
    ours.train()

    ours_logs = _logs(ours)
    _assert_logs_match(ours_logs, _logs(theirs), PARITY_KEYS)
    assert abs(ours_logs[1]["loss"]) > 1e-4 and ours_logs[1]["kl"] > 1e-6


def test_gdpo_config_errors(tmp_path):
    with pytest.raises(ValueError, match="scale_rewards='none' does not apply to GDPO"):
        GDPOConfig(output_dir=str(tmp_path), scale_rewards="none", **QUIET)
    with pytest.raises(ValueError, match="loss_type"):
        GDPOConfig(output_dir=str(tmp_path), loss_type="ppo", **QUIET)
    assert GDPOConfig(output_dir=str(tmp_path), scale_rewards=True, **QUIET).scale_rewards == "group"


def test_gdpo_learns_two_rewards_on_heldout_prompts(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    heldout = embedded_data("prompts", split="test")

    def heldout_digits(model) -> float:
        sampled = generate_completions(model, tiny_tokenizer, heldout["prompt"],
                                       SamplingConfig(max_new_tokens=8, num_generations=2, seed=0, batch_size=128))
        return sum(digit_reward(sampled.texts)) / len(sampled.texts)

    trainer = GDPOTrainer(tiny_model_path, [space_reward, digit_reward], args=learning_args(GDPOConfig, tmp_path),
                          train_dataset=embedded_data("prompts"))
    spaces, digits = heldout_space_reward(trainer.model, tiny_tokenizer, heldout), heldout_digits(trainer.model)
    trainer.train()
    assert heldout_space_reward(trainer.model, tiny_tokenizer, heldout) > spaces + 2.0
    assert heldout_digits(trainer.model) > digits + 2.0
