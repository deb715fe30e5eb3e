"""ReinforceTrainer and ReinforcePPTrainer: advantages worked out by hand on fixed completions, the losses, config
errors, learning on the tiny model, and the same advantages under 2-process DDP.

Sampling is replaced by `fixed_generate` (also used by test_remax.py and test_decoupled_gdpo.py): row i of a generation
batch gets `lengths[i]` tokens, the last one eos, and `length_reward` scores a completion by its token count, so every
score is known in advance. Rows are prompt-major: with G = 3 and lengths [2, 4, 3, 1, 2, 3], prompt 0's completions
score 2, 4, 3 and prompt 1's 1, 2, 3.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_align.generation
import hf_align.rollout
import hf_align.sequence_logprobs
from hf_align import losses
from hf_align.data import pad
from hf_align.generation import Completions, SamplingConfig, encode_prompts, generate_completions
from hf_align.trainers.reinforce import ReinforceConfig, ReinforcePPConfig, ReinforcePPTrainer, ReinforceTrainer

QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True)
LENGTHS = [2, 4, 3, 1, 2, 3]
SAMPLED_TOKEN, GREEDY_TOKEN = 50, 60


# ------------------------------------------------------------------------------------------ shared helpers


def fixed_generate(lengths, greedy_lengths=None, first_row=0, greedy_calls=None):
    """A stand-in for `generate_completions`. A sampling call gives its row i `lengths[first_row + i]` tokens
    (`first_row`: where this process's rows start in the generation batch); a greedy call (temperature 0) gives each
    prompt `greedy_lengths[prompt]` tokens and is recorded in `greedy_calls`. Every completion ends with eos."""

    def generate(model, tokenizer, prompts, sampling):
        # The engine asks for one completion per row (its rows repeat each prompt); more is not reproduced here.
        assert sampling.num_generations == 1, sampling.num_generations
        if sampling.temperature == 0:
            greedy_calls.append((list(prompts), sampling))
            rows = [[GREEDY_TOKEN] * (greedy_lengths[p] - 1) for p in prompts]
        else:
            rows = [[SAMPLED_TOKEN] * (lengths[first_row + i] - 1) for i in range(len(prompts))]
        ids = [torch.tensor(row + [tokenizer.eos_token_id]) for row in rows]
        return Completions(
            prompt_ids=encode_prompts(tokenizer, prompts, sampling.chat_template_kwargs),
            completion_ids=pad(ids, tokenizer.pad_token_id),
            completion_mask=pad([torch.ones_like(row) for row in ids], 0),
            texts=tokenizer.batch_decode(ids, skip_special_tokens=True),
        )

    return generate


def use_fixed_generation(monkeypatch, lengths, greedy_lengths=None) -> list:
    """Replaces sampling (and ReMax's greedy decoding) with `fixed_generate`; returns the list of greedy calls."""
    greedy_calls = []
    generate = fixed_generate(lengths, greedy_lengths, greedy_calls=greedy_calls)
    monkeypatch.setattr(hf_align.rollout, "generate_completions", generate)
    monkeypatch.setattr(hf_align.generation, "generate_completions", generate)
    return greedy_calls


def length_reward(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def group_rows(dataset, group_size: int) -> list[dict]:
    """A generation batch as the sampler lays it out: each row of `dataset` `group_size` times in a row."""
    return [row for row in dataset.to_list() for _ in range(group_size)]


def training_trainer(trainer):
    trainer.model.train()  # `make_rollout` outside `train()`: the model loads in eval mode
    return trainer


def expected_whitened(values: list[list[float]]) -> list[list[float]]:
    """Every token value of every row whitened together: (v - mean) / sqrt(population variance + 1e-8)."""
    flat = [v for row in values for v in row]
    mean = sum(flat) / len(flat)
    variance = sum((v - mean) ** 2 for v in flat) / len(flat)
    return [[(v - mean) / math.sqrt(variance + 1e-8) for v in row] for row in values]


def as_padded(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([row + [0.0] * (width - len(row)) for row in rows])


def space_reward(completions, **kwargs):
    """An easily learnt reward for a model with random weights: the number of spaces (about 3 in 8 random tokens)."""
    return [float(c.count(" ")) for c in completions]


def heldout_space_reward(model, tokenizer, dataset) -> float:
    """Mean `space_reward` of 2 seeded samples of 8 tokens for each held-out prompt."""
    sampled = generate_completions(model, tokenizer, dataset["prompt"],
                                   SamplingConfig(max_new_tokens=8, num_generations=2, seed=0, batch_size=128))
    return sum(space_reward(sampled.texts)) / len(sampled.texts)


def learning_args(config_class, tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4,
                    max_completion_length=8, learning_rate=1e-2, max_steps=50, logging_steps=10, seed=0, **QUIET)
    return config_class(**{**settings, **overrides})


# ------------------------------------------------------------------------------------------ REINFORCE


def test_reinforce_loss_by_hand():
    token_logps = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0], [2.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss = losses.reinforce_loss(token_logps, advantages, mask)
    # -[(1·-1 + 1·-2) + (2·-0.5)] / 2 sequences; the masked token (-9, A = 5) adds nothing
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(token_logps.grad, torch.tensor([[-0.5, -0.5], [-1.0, 0.0]]))
    # one advantage per sequence is broadcast over its tokens
    assert losses.reinforce_loss(token_logps, torch.tensor([1.0, 2.0]), mask).item() == pytest.approx(2.0)


def test_reinforce_advantage_is_score_minus_mean_of_the_other_completions(tiny_model_path, embedded_data,
                                                                           monkeypatch, tmp_path):
    use_fixed_generation(monkeypatch, LENGTHS)
    args = ReinforceConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3, **QUIET)
    trainer = training_trainer(ReinforceTrainer(tiny_model_path, length_reward, args=args,
                                                train_dataset=embedded_data("prompts", 2)))
    rollout = trainer.make_rollout(group_rows(embedded_data("prompts", 2), 3))
    # scores 2, 4, 3 | 1, 2, 3; leave-one-out baselines 3.5, 2.5, 3 | 2.5, 2, 1.5; γ = 1: the same on every token
    per_row = [-1.5, 1.5, 0.0, -1.5, 0.0, 1.5]
    expected = as_padded([[a] * length for a, length in zip(per_row, LENGTHS)], 4)
    torch.testing.assert_close(rollout.advantages, expected)


def test_reinforce_discounted_returns_minus_baseline(tiny_model_path, embedded_data, monkeypatch, tmp_path):
    use_fixed_generation(monkeypatch, LENGTHS)
    gamma = 0.5
    args = ReinforceConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3, gamma=gamma,
                           **QUIET)
    trainer = training_trainer(ReinforceTrainer(tiny_model_path, length_reward, args=args,
                                                train_dataset=embedded_data("prompts", 2)))
    rollout = trainer.make_rollout(group_rows(embedded_data("prompts", 2), 3))
    # The score L arrives at the last of L tokens: G_t = γ^(L-1-t) L. The baseline is the mean G_0 of the others.
    returns = [[gamma ** (length - 1 - t) * length for t in range(length)] for length in LENGTHS]
    totals = [row[0] for row in returns]  # 1, 0.5, 0.75 | 1, 1, 0.75
    baselines = [(sum(totals[i - i % 3 : i - i % 3 + 3]) - totals[i]) / 2 for i in range(6)]
    assert baselines == [0.625, 0.875, 0.75, 0.875, 0.875, 1.0]
    expected = as_padded([[g - b for g in row] for row, b in zip(returns, baselines)], 4)
    torch.testing.assert_close(rollout.advantages, expected)


def test_reinforce_config_errors(tmp_path):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, **QUIET)
    with pytest.raises(ValueError, match=r"on-policy.*\(1\) must be a multiple of .* \(1 × 2\)"):
        ReinforceConfig(num_iterations=2, **settings)
    with pytest.raises(ValueError, match=r"on-policy.*\(1\) must be a multiple of .* \(2 × 1\)"):
        ReinforceConfig(steps_per_generation=2, **settings)
    # on-policy: one generation batch per optimizer step (the default), or several
    ReinforceConfig(gradient_accumulation_steps=2, **settings)
    ReinforceConfig(gradient_accumulation_steps=2, steps_per_generation=1, **settings)
    for gamma in (0.0, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            ReinforceConfig(output_dir=str(tmp_path), gamma=gamma, **QUIET)
    with pytest.raises(ValueError, match="num_generations must be at least 2"):  # the leave-one-out baseline
        ReinforceConfig(output_dir=str(tmp_path), num_generations=1, **QUIET)


def test_reinforce_learns_a_reward_on_heldout_prompts(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    heldout = embedded_data("prompts", split="test")
    trainer = ReinforceTrainer(tiny_model_path, space_reward, args=learning_args(ReinforceConfig, tmp_path),
                               train_dataset=embedded_data("prompts"))
    before = heldout_space_reward(trainer.model, tiny_tokenizer, heldout)
    trainer.train()
    after = heldout_space_reward(trainer.model, tiny_tokenizer, heldout)
    assert after > before + 2.0, (before, after)


# ------------------------------------------------------------------------------------------ REINFORCE++


@pytest.mark.parametrize(
    "estimator, clip, scores",
    [("reinforce++", None, [2, 4, 3, 1, 2, 3]),
     ("reinforce++", [0.0, 3.0], [2, 3, 3, 1, 2, 3]),
     # minus the group means 3 and 2, then clipped
     ("reinforce++_baseline", [-0.5, 3.0], [-0.5, 1, 0, -0.5, 0, 1])],
)
def test_reinforce_pp_whitens_returns_over_the_whole_batch(estimator, clip, scores, tiny_model_path, embedded_data,
                                                            monkeypatch, tmp_path):
    use_fixed_generation(monkeypatch, LENGTHS)
    args = ReinforcePPConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3, beta=0.0,
                             advantage_estimator=estimator, reward_clip_range=clip, **QUIET)
    trainer = training_trainer(ReinforcePPTrainer(tiny_model_path, length_reward, args=args,
                                                  train_dataset=embedded_data("prompts", 2)))
    rollout = trainer.make_rollout(group_rows(embedded_data("prompts", 2), 3))
    # β = 0, γ = 1: every token's return is its completion's (clipped) score; all 15 tokens are whitened together
    expected = expected_whitened([[float(s)] * length for s, length in zip(scores, LENGTHS)])
    torch.testing.assert_close(rollout.advantages, as_padded(expected, 4))


def test_reinforce_pp_kl_penalty_per_token_by_hand(tiny_model_path, embedded_data, monkeypatch, tmp_path):
    use_fixed_generation(monkeypatch, LENGTHS)
    beta, gamma, clip = 0.5, 0.9, [0.0, 3.5]
    args = ReinforcePPConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3, beta=beta,
                             gamma=gamma, reward_clip_range=clip, **QUIET)
    trainer = training_trainer(ReinforcePPTrainer(tiny_model_path, length_reward, args=args,
                                                  train_dataset=embedded_data("prompts", 2)))
    with torch.no_grad():  # move the policy away from its reference copy, so that the KL is not 0
        torch.manual_seed(0)
        trainer.model.lm_head.weight.add_(0.5 * torch.randn_like(trainer.model.lm_head.weight))
    rollout = trainer.make_rollout(group_rows(embedded_data("prompts", 2), 3))
    kl = rollout.old_logps - rollout.ref_logps
    assert kl[0, :2].abs().min() > 1e-3
    returns = []
    for i, length in enumerate(LENGTHS):
        rewards = [-beta * kl[i, t].item() for t in range(length)]
        rewards[-1] += min(max(float(length), clip[0]), clip[1])  # the clipped score at EOS
        returns.append([sum(gamma ** (s - t) * rewards[s] for s in range(t, length)) for t in range(length)])
    torch.testing.assert_close(rollout.advantages, as_padded(expected_whitened(returns), 4))


def test_unscorable_completions_get_no_advantage_and_no_weight(tiny_model_path, embedded_data, monkeypatch,
                                                              tmp_path):
    def length_reward_unless_3(completion_ids, **kwargs):
        return [None if len(ids) == 3 else float(len(ids)) for ids in completion_ids]

    use_fixed_generation(monkeypatch, LENGTHS)
    rows = group_rows(embedded_data("prompts", 2), 3)
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3, **QUIET)
    pp = training_trainer(ReinforcePPTrainer(tiny_model_path, length_reward_unless_3,
                                             args=ReinforcePPConfig(beta=0.0, **settings),
                                             train_dataset=embedded_data("prompts", 2)))
    # rows 2 and 5 (3 tokens) are unscorable: the others' 9 tokens are whitened without them
    whitened = expected_whitened([[2.0] * 2, [4.0] * 4, [1.0], [2.0] * 2])
    expected = as_padded([whitened[0], whitened[1], [], whitened[2], whitened[3], []], 4)
    torch.testing.assert_close(pp.make_rollout(rows).advantages, expected)

    plain = training_trainer(ReinforceTrainer(tiny_model_path, length_reward_unless_3,
                                              args=ReinforceConfig(**settings),
                                              train_dataset=embedded_data("prompts", 2)))
    # leave-one-out among the scorable: 2 - 4, 4 - 2 | 1 - 2, 2 - 1
    expected = as_padded([[-2.0] * 2, [2.0] * 4, [], [-1.0], [1.0] * 2, []], 4)
    torch.testing.assert_close(plain.make_rollout(rows).advantages, expected)


def test_reinforce_pp_loss_is_the_clipped_surrogate_averaged_over_tokens(tiny_model_path, embedded_data,
                                                                        monkeypatch, tmp_path):
    use_fixed_generation(monkeypatch, LENGTHS)
    args = ReinforcePPConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3, beta=0.0,
                             **QUIET)
    trainer = training_trainer(ReinforcePPTrainer(tiny_model_path, length_reward, args=args,
                                                  train_dataset=embedded_data("prompts", 2)))
    rollout = trainer.make_rollout(group_rows(embedded_data("prompts", 2), 3))
    logps = hf_align.sequence_logprobs.completion_token_logprobs(trainer.model, rollout).token_logps.detach()
    advantages = torch.zeros_like(rollout.advantages)
    advantages[1] = 2.0  # only row 1 (4 tokens of 15) has an advantage
    for shift, ratio in ((0.1, math.exp(0.1)), (0.5, 1.2)):  # inside the clip range, then clipped at 1 + ε
        inputs = rollout.replace(advantages=advantages, old_logps=logps - shift)
        loss = trainer.compute_loss(trainer.model, inputs)
        assert loss.item() == pytest.approx(-ratio * 2.0 * 4 / 15, rel=1e-4)


def test_reinforce_pp_config_errors(tmp_path):
    with pytest.raises(ValueError, match="advantage_estimator"):
        ReinforcePPConfig(output_dir=str(tmp_path), advantage_estimator="grpo", **QUIET)
    for clip in ([1.0], [2.0, 1.0]):
        with pytest.raises(ValueError, match="reward_clip_range"):
            ReinforcePPConfig(output_dir=str(tmp_path), reward_clip_range=clip, **QUIET)
    with pytest.raises(ValueError, match="gamma"):
        ReinforcePPConfig(output_dir=str(tmp_path), gamma=0.0, **QUIET)
    # one completion per prompt is the paper's plain estimator; the group baseline needs a group
    ReinforcePPConfig(output_dir=str(tmp_path), num_generations=1, **QUIET)
    with pytest.raises(ValueError, match="reinforce\\+\\+_baseline.*at least 2"):
        ReinforcePPConfig(output_dir=str(tmp_path), num_generations=1, advantage_estimator="reinforce++_baseline",
                          **QUIET)
    # unlike plain REINFORCE, the clipped ratio allows reusing a generation batch
    assert ReinforcePPConfig(output_dir=str(tmp_path), num_iterations=2, **QUIET).beta == 0.01


@pytest.mark.parametrize("estimator", ["reinforce++", "reinforce++_baseline"])
def test_reinforce_pp_learns_a_reward_on_heldout_prompts(estimator, tiny_model_path, tiny_tokenizer, embedded_data,
                                                         tmp_path):
    heldout = embedded_data("prompts", split="test")
    args = learning_args(ReinforcePPConfig, tmp_path, advantage_estimator=estimator)
    trainer = ReinforcePPTrainer(tiny_model_path, space_reward, args=args, train_dataset=embedded_data("prompts"))
    before = heldout_space_reward(trainer.model, tiny_tokenizer, heldout)
    trainer.train()
    after = heldout_space_reward(trainer.model, tiny_tokenizer, heldout)
    assert after > before + 2.0, (before, after)
    assert trainer.state.log_history[-2]["kl"] > 0


# ------------------------------------------------------------------------------------------ 2-process DDP

DDP_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from datasets import Dataset
import hf_align.generation, hf_align.rollout
from test_reinforce import LENGTHS, fixed_generate, group_rows, length_reward
from hf_align.trainers.reinforce import ReinforceConfig, ReinforcePPConfig, ReinforcePPTrainer, ReinforceTrainer

model_path, rows_path, out = sys.argv[1:4]
dataset = Dataset.from_list(json.load(open(rows_path)))
for trainer_class, config_class in ((ReinforceTrainer, ReinforceConfig), (ReinforcePPTrainer, ReinforcePPConfig)):
    args = config_class(output_dir=out, per_device_train_batch_size=3, num_generations=2, beta=0.0,
                        report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = trainer_class(model_path, length_reward, args=args, train_dataset=dataset)
    rank = trainer.accelerator.process_index
    generate = fixed_generate(LENGTHS, first_row=3 * rank)
    hf_align.rollout.generate_completions = hf_align.generation.generate_completions = generate
    trainer.model.train()
    rollout = trainer.make_rollout(group_rows(dataset, 2)[3 * rank : 3 * rank + 3])
    json.dump({"world": trainer.accelerator.num_processes, "advantages": rollout.advantages.tolist()},
              open(f"{out}/{trainer_class.__name__}-rank{rank}.json", "w"))
"""


# Without it, gloo's threads can abort a finished process at interpreter exit (pytorch/pytorch#190489).
END_PROCESS_GROUP = """
import torch.distributed
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def launch_two_processes(script: str, tmp_path, *script_args) -> None:
    """Runs `script` under `accelerate launch` with 2 CPU processes (DDP over gloo), tests/ importable, and ends
    its process group before the processes exit."""
    (tmp_path / "ddp.py").write_text(script + END_PROCESS_GROUP)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tests, root = Path(__file__).parent, Path(__file__).parents[1]
    python_path = os.pathsep.join(str(p) for p in (root, tests, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": python_path}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(tmp_path / "ddp.py"), *map(str, script_args)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-6000:]


def test_slow_ddp_advantages_match_one_process(tiny_model_path, embedded_data, monkeypatch, tmp_path):
    """3 prompts × G = 2 over 2 processes of 3 rows: prompt 1's group is split between them, and their completions
    are padded to different widths (4 and 3 tokens). Each process's advantages are its rows of the one-process ones."""
    dataset = embedded_data("prompts", 3)
    (tmp_path / "rows.json").write_text(json.dumps(dataset.to_list()))
    launch_two_processes(DDP_SCRIPT, tmp_path, tiny_model_path, tmp_path / "rows.json", tmp_path)

    use_fixed_generation(monkeypatch, LENGTHS)
    for trainer_class, config_class in ((ReinforceTrainer, ReinforceConfig), (ReinforcePPTrainer, ReinforcePPConfig)):
        args = config_class(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=2, beta=0.0,
                            **QUIET)
        trainer = training_trainer(trainer_class(tiny_model_path, length_reward, args=args, train_dataset=dataset))
        expected = trainer.make_rollout(group_rows(dataset, 2)).advantages
        ranks = [json.loads((tmp_path / f"{trainer_class.__name__}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["world"] for r in ranks] == [2, 2]
        first, second = (torch.tensor(r["advantages"]) for r in ranks)
        assert first.shape == (3, 4) and second.shape == (3, 3)  # each process's own completion width
        torch.testing.assert_close(first, expected[:3, :4])
        torch.testing.assert_close(second, expected[3:, :3])
        assert expected.abs().sum() > 0
