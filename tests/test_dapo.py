"""DAPO's options of GRPOTrainer (arXiv 2503.14476): the soft overlong punishment (eq. 13) by hand and through the
trainer on completions of chosen lengths, and dynamic sampling (§3.2): trained batches hold only groups whose rewards
do not all tie, the extra generation rounds are logged and capped, and under 2 processes (DDP over gloo) each fills
its own share and both end with the same rows."""

from __future__ import annotations

import json

import pytest
import torch

from hf_align import losses
from hf_align.rollout import Rollout
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


class _SpiedEstimator:
    """The trainer's estimator, recording what it is given and gives."""

    def __init__(self, estimator, seen: list):
        self.estimator, self.seen, self.needs = estimator, seen, estimator.needs

    def __call__(self, inputs):
        estimate = self.estimator(inputs)
        self.seen.append((inputs.rewards_per_func.clone(), estimate.advantages.clone()))
        return estimate


def _spy_advantages(trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(gathered rewards [N, F], advantages [N]) of every generation batch the trainer scores."""
    seen = []
    choose = trainer.estimator
    trainer.estimator = lambda: _SpiedEstimator(choose(), seen)
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
                                          ("overlong_penalty_factor", -1.0), ("max_dynamic_sampling_rounds", -1)])
def test_bad_dapo_fields_raise_at_config_time(field, value, tmp_path):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**_settings(tmp_path, **{field: value}))


def test_dynamic_sampling_needs_whole_groups_per_process(tmp_path, monkeypatch):
    # Two processes of 2 rows each: the generation batch holds one group of 4, split between them.
    monkeypatch.setattr(GRPOConfig, "world_size", property(lambda self: 2))
    settings = _settings(tmp_path, per_device_train_batch_size=2)
    GRPOConfig(**settings)
    with pytest.raises(ValueError, match="dynamic_sampling"):
        GRPOConfig(**settings, dynamic_sampling=True)


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


# -- dynamic sampling ----------------------------------------------------------------------------------------------------
def tied_unless_marked(completions, tied, **kwargs):
    # Constant on the prompts marked `tied`; elsewhere the completion's length (2 to 5 tokens within a group).
    return [0.0 if is_tied else 100.0 + len(completion) for completion, is_tied in zip(completions, tied)]


def _dynamic_run(tmp_path, tiny_model_path, fixed_completions, tied: list[bool], **options):
    """One optimizer step on prompts p0, p1, ... in order (p0 and p1 first), 2 groups of 4 per generation batch;
    returns the trainer, every call's rows of `sample` and the advantages' (rewards, advantages)."""
    from datasets import Dataset

    fixed_completions(lambda prompt_ids, row, tokenizer, model: _tokens(2 + row % 4))
    # Prompts of different lengths: rounds' rollouts have different widths, which the batch's concatenation pads.
    dataset = Dataset.from_list([{"prompt": f"p{i} says" + " more" * i, "tied": t} for i, t in enumerate(tied)])
    args = GRPOConfig(**_settings(tmp_path, per_device_train_batch_size=8, shuffle_dataset=False,
                                  dynamic_sampling=True, **options))
    trainer = GRPOTrainer(tiny_model_path, tied_unless_marked, args=args, train_dataset=dataset)
    sampled_rows = []
    sample = trainer.sample

    def spy(rows):
        sampled_rows.append(rows)
        return sample(rows)

    trainer.sample = spy
    seen = _spy_advantages(trainer)
    trainer.train()
    return trainer, sampled_rows, seen


def test_dynamic_sampling_replaces_tied_groups(tiny_model_path, fixed_completions, tmp_path):
    # Only p1 and p6 do not tie. The first batch (p0, p1) misses one group; each extra round samples one group for a
    # random prompt, until one does not tie.
    tied = [i not in (1, 6) for i in range(8)]
    trainer, sampled_rows, seen = _dynamic_run(tmp_path, tiny_model_path, fixed_completions, tied,
                                               max_dynamic_sampling_rounds=20)
    assert [len(rows) for rows in sampled_rows] == [8] + [4] * (len(sampled_rows) - 1)
    extra = [rows[0]["tied"] for rows in sampled_rows[1:]]
    assert extra[-1] is False and all(extra[:-1])  # stopped at the first untied group
    (rewards, advantages), = seen
    # Trained: p1's group and the last round's, each 4 different rewards, so no zero advantage.
    assert len(rewards) == 8 and bool((rewards > 0).all()) and bool((advantages != 0).all())
    log = trainer.state.log_history[0]
    rounds = len(sampled_rows) - 1
    assert rounds >= 2 and log["dynamic_sampling/rounds"] == rounds
    assert log["dynamic_sampling/filtered_groups"] == rounds  # p0, then the tied draws
    assert log["dynamic_sampling/kept_tied_groups"] == 0
    assert log["frac_reward_zero_std"] == 0


def test_dynamic_sampling_honours_the_cap(tiny_model_path, fixed_completions, tmp_path):
    # Every prompt ties: 2 extra rounds of 2 groups each, then the batch is filled with the first round's tied groups.
    trainer, sampled_rows, seen = _dynamic_run(tmp_path, tiny_model_path, fixed_completions, [True] * 8,
                                               max_dynamic_sampling_rounds=2)
    assert [len(rows) for rows in sampled_rows] == [8, 8, 8]
    (rewards, advantages), = seen
    assert bool((rewards == 0).all()) and bool((advantages == 0).all())
    log = trainer.state.log_history[0]
    assert log["dynamic_sampling/rounds"] == 2
    assert log["dynamic_sampling/kept_tied_groups"] == 2
    assert log["dynamic_sampling/filtered_groups"] == 4  # 6 tied groups sampled, 2 kept


def test_concat_rollouts_pads_prompts_left_and_completions_right():
    first = Rollout(**{"prompt_ids": torch.tensor([[5, 6]]), "prompt_mask": torch.tensor([[1, 1]]),
             "completion_ids": torch.tensor([[7]]), "completion_mask": torch.tensor([[1]]),
             "completion_lengths": torch.tensor([1])})
    second = Rollout(**{"prompt_ids": torch.tensor([[8]]), "prompt_mask": torch.tensor([[1]]),
              "completion_ids": torch.tensor([[9, 10, 11]]), "completion_mask": torch.tensor([[1, 1, 1]]),
              "completion_lengths": torch.tensor([3])})
    both = Rollout.concat([first, second], pad_token_id=0)
    assert both.prompt_ids.tolist() == [[5, 6], [0, 8]] and both.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert both.completion_ids.tolist() == [[7, 0, 0], [9, 10, 11]]
    assert both.completion_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert both.completion_lengths.tolist() == [1, 3]


def test_no_dynamic_sampling_needs_no_extra_round(tiny_model_path, fixed_completions, tmp_path):
    trainer, sampled_rows, _ = _dynamic_run(tmp_path, tiny_model_path, fixed_completions, [False] * 8)
    assert len(sampled_rows) == 1
    log = trainer.state.log_history[0]
    assert log["dynamic_sampling/rounds"] == 0 and log["dynamic_sampling/filtered_groups"] == 0


DDP_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
import hf_align.rollout
from accelerate.utils import gather
from datasets import Dataset
from hf_align.data import pad
from hf_align.generation import Completions, encode_prompts
from hf_align.trainers.grpo import GRPOConfig, GRPOTrainer

model_path, out = sys.argv[1], sys.argv[2]


def generate(model, tokenizer, prompts, sampling):  # row i: 2 or 3 tokens, so every group has 2 lengths
    prompt_ids = encode_prompts(tokenizer, prompts)
    rows = [torch.tensor([40 + k for k in range(2 + i % 2)]) for i in range(len(prompt_ids))]
    return Completions(prompt_ids=prompt_ids, completion_ids=pad(rows, tokenizer.pad_token_id),
                       completion_mask=pad([torch.ones_like(r) for r in rows], 0),
                       texts=tokenizer.batch_decode(rows, skip_special_tokens=True))


hf_align.rollout.generate_completions = generate


def reward(completions, tied, **kwargs):
    return [0.0 if t else 100.0 + len(c) for c, t in zip(completions, tied)]


dataset = Dataset.from_list([{"prompt": f"p{i} says" + " more" * i, "tied": i not in (2, 5, 9)} for i in range(12)])
args = GRPOConfig(output_dir=out + "/run", per_device_train_batch_size=4, num_generations=2, max_steps=2,
                  max_completion_length=4, logging_steps=1, seed=1, shuffle_dataset=False, dynamic_sampling=True,
                  max_dynamic_sampling_rounds=4, report_to="none", save_strategy="no", disable_tqdm=True, bf16=False,
                  learning_rate=1e-3)
trainer = GRPOTrainer(model_path, reward, args=args, train_dataset=dataset)
batches = []
estimate = trainer.estimate


def spy(rollout):
    batches.append({"rewards": gather(rollout.rewards_per_func)[:, 0].tolist(), "rows": rollout.num_rows})
    return estimate(rollout)


trainer.estimate = spy
trainer.train()
logs = [entry for entry in trainer.state.log_history if "loss" in entry]
with open(f"{out}/rank{trainer.accelerator.process_index}.json", "w") as f:
    json.dump({"batches": batches, "logs": logs}, f)
"""


def test_slow_ddp_every_process_fills_its_share(tiny_model_path, tmp_path):
    """2 processes of 2 groups each, only 3 of 12 prompts untied: each process keeps its own untied groups, all run the
    same rounds (up to the cap) and train on 4 rows; tied groups fill only what the cap left missing."""
    from test_reinforce import launch_two_processes

    launch_two_processes(DDP_SCRIPT, tmp_path, tiny_model_path, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # the same gathered batches and logs on both processes
    for batch, log in zip(ranks[0]["batches"], ranks[0]["logs"]):
        assert batch["rows"] == 4 and len(batch["rewards"]) == 8
        assert 0 <= log["dynamic_sampling/rounds"] <= 4
        tied_rows = sum(reward == 0 for reward in batch["rewards"])
        assert tied_rows == 2 * log["dynamic_sampling/kept_tied_groups"]
        if log["dynamic_sampling/kept_tied_groups"]:
            assert log["dynamic_sampling/rounds"] == 4  # tied groups are kept only at the cap
