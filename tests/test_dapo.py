"""DAPO's options of GRPOTrainer (arXiv 2503.14476): the soft overlong punishment (eq. 13) by hand and through the
trainer on completions of chosen lengths, and dynamic sampling (§3.2): trained batches hold only groups whose rewards
do not all tie, the extra generation rounds are logged and capped."""

from __future__ import annotations

import pytest
import torch

from hf_align import losses
from hf_align.trainers.grpo import GRPOConfig, GRPOTrainer

QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, bf16=False)
MAX_COMPLETION = 8


def _settings(tmp_path, **overrides) -> dict:
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_steps=1,
        max_completion_length=MAX_COMPLETION, learning_rate=1e-3, logging_steps=1, seed=3, **QUIET,
    )
    settings.update(overrides)
    return settings


def _tokens(length: int) -> list[int]:
    # Ordinary byte tokens, never a stop token: the completion is exactly `length` tokens.
    return [40 + k % 20 for k in range(length)]


def _spy_advantages(trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(gathered rewards [N, F], advantages [N]) of every generation batch the trainer scores."""
    seen = []
    compute = trainer.compute_advantages

    def spy(rewards_per_func, rollout):
        advantages = compute(rewards_per_func, rollout)
        seen.append((rewards_per_func.clone(), advantages.clone()))
        return advantages

    trainer.compute_advantages = spy
    return seen


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


# -- soft overlong punishment ------------------------------------------------------------------------------------------
def test_soft_overlong_penalty_by_hand():
    # L_max = 10, L_cache = 4: no penalty up to 6 tokens, linear from 0 to -1 over 7..10, -1 beyond; times 0.5.
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 40])
    expected = torch.tensor([0, 0, 0, -1 / 4, -2 / 4, -3 / 4, -1, -1, -1]) * 0.5
    assert torch.allclose(losses.soft_overlong_penalty(lengths, 10, 4, 0.5), expected)
    # A buffer as long as L_max penalises every token.
    assert torch.allclose(losses.soft_overlong_penalty(torch.tensor([0, 1, 2]), 2, 2), torch.tensor([0, -0.5, -1]))


@pytest.mark.parametrize("field, value", [("overlong_buffer_len", 0), ("overlong_buffer_len", MAX_COMPLETION + 1),
                                          ("overlong_penalty_factor", -1.0)])
def test_bad_dapo_fields_raise_at_config_time(field, value, tmp_path):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**_settings(tmp_path, **{field: value}))


def test_overlong_penalty_through_the_trainer(tiny_model_path, embedded_data, fixed_completions, tmp_path):
    # One group of 4 completions of 3, 4, 5 and 8 tokens; L_max 8, buffer 4, factor 2: penalties 0, 0, -0.5, -2.
    lengths = [3, 4, 5, 8]
    fixed_completions(lambda prompt_ids, row, tokenizer, model: _tokens(lengths[row]))
    args = GRPOConfig(**_settings(tmp_path, overlong_buffer_len=4, overlong_penalty_factor=2.0))
    trainer = GRPOTrainer(tiny_model_path, zero_reward, args=args, train_dataset=embedded_data("prompts", 4))
    seen = _spy_advantages(trainer)
    trainer.train()

    rewards = torch.tensor([0.0, 0.0, -0.5, -2.0])
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    assert torch.allclose(seen[0][1].cpu(), expected, atol=1e-5)
    log = trainer.state.log_history[0]
    assert log["rewards/overlong_penalty/mean"] == pytest.approx(-2.5 / 4)
    assert log["completions/max_length"] == 8
