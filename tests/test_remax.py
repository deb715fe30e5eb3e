"""ReMaxTrainer: the greedy baseline worked out by hand on fixed completions (sampling and greedy decoding replaced by
test_reinforce's `fixed_generate`), the loss's gradient against sequence-level REINFORCE, config errors, learning on
the tiny model, and the greedy baselines of groups split between 2 DDP processes."""

from __future__ import annotations

import json

import pytest
import torch
from test_reinforce import (LENGTHS, QUIET, group_rows, heldout_space_reward, launch_two_processes, learning_args,
                            length_reward, space_reward, training_trainer, use_fixed_generation)

from hf_align import losses
from hf_align.sequence_logprobs import completion_token_logprobs
from hf_align.trainers.remax import ReMaxConfig, ReMaxTrainer


def length_times_answer_reward(completion_ids, answer, **kwargs):
    """Reads a dataset column, so a greedy completion scored with the wrong row's answer would show."""
    return [float(len(ids) * int(a)) for ids, a in zip(completion_ids, answer)]


def remax_trainer(tiny_model_path, dataset, tmp_path, reward=length_times_answer_reward, **overrides):
    args = ReMaxConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                       max_completion_length=5, **{**QUIET, **overrides})
    return training_trainer(ReMaxTrainer(tiny_model_path, reward, args=args, train_dataset=dataset))


def test_remax_advantage_is_sample_reward_minus_greedy_reward(tiny_model_path, embedded_data, monkeypatch,
                                                              tmp_path):
    dataset = embedded_data("prompts", 2)
    assert dataset["answer"] == ["12", "8"]
    greedy_calls = use_fixed_generation(monkeypatch, LENGTHS, greedy_lengths=dict(zip(dataset["prompt"], (3, 1))))
    trainer = remax_trainer(tiny_model_path, dataset, tmp_path)
    rollout = trainer.make_rollout(group_rows(dataset, 3))
    # prompt 0 (answer 12): samples 2, 4, 3 tokens → 24, 48, 36; greedy 3 tokens → 36
    # prompt 1 (answer 8): samples 1, 2, 3 tokens → 8, 16, 24; greedy 1 token → 8
    torch.testing.assert_close(rollout.advantages, torch.tensor([-12.0, 12.0, 0.0, 0.0, 8.0, 16.0]))
    # one greedy decode per prompt, at temperature 0, as long as sampling allows
    [(prompts, sampling)] = greedy_calls
    assert prompts == dataset["prompt"]
    assert (sampling.temperature, sampling.max_new_tokens) == (0, 5)
    assert trainer._metrics["train"]["greedy_reward"] == [22.0]  # (36 + 8) / 2


def test_remax_kl_penalises_the_sampled_reward_only(tiny_model_path, embedded_data, monkeypatch, tmp_path):
    dataset = embedded_data("prompts", 2)
    use_fixed_generation(monkeypatch, LENGTHS, greedy_lengths=dict(zip(dataset["prompt"], (3, 1))))
    beta = 0.5
    trainer = remax_trainer(tiny_model_path, dataset, tmp_path, reward=length_reward, beta=beta)
    with torch.no_grad():  # move the policy away from its reference copy, so that the KL is not 0
        torch.manual_seed(0)
        trainer.model.lm_head.weight.add_(0.5 * torch.randn_like(trainer.model.lm_head.weight))
    rollout = trainer.make_rollout(group_rows(dataset, 3))
    sequence_kl = ((rollout.old_logps - rollout.ref_logps) * rollout.completion_mask).sum(-1)
    assert sequence_kl.abs().min() > 1e-3
    rewards = torch.tensor([float(length) for length in LENGTHS])
    greedy = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(rollout.advantages, rewards - beta * sequence_kl - greedy)


def test_remax_gradient_is_sequence_level_reinforce(tiny_model_path, embedded_data, monkeypatch, tmp_path):
    dataset = embedded_data("prompts", 2)
    use_fixed_generation(monkeypatch, LENGTHS, greedy_lengths=dict(zip(dataset["prompt"], (3, 1))))
    trainer = remax_trainer(tiny_model_path, dataset, tmp_path)
    rollout = trainer.make_rollout(group_rows(dataset, 3))
    weight = trainer.model.lm_head.weight

    loss = trainer.compute_loss(trainer.model, rollout)
    assert loss.item() == pytest.approx(-24.0 / 6)  # ratio 1: -mean(A)
    loss.backward()
    ours, weight.grad = weight.grad.clone(), None
    # Algorithm 1: -(1/N) Σ_i A_i Σ_t log π(y_i,t)
    token_logps = completion_token_logprobs(trainer.model, rollout).token_logps
    losses.reinforce_loss(token_logps, rollout.advantages, rollout.completion_mask).backward()
    assert weight.grad.abs().max() > 1e-4
    torch.testing.assert_close(ours, weight.grad)


def test_remax_config(tmp_path):
    assert ReMaxConfig(output_dir=str(tmp_path), **QUIET).num_generations == 1  # the paper's one sample per prompt
    with pytest.raises(ValueError, match="num_generations must be at least 1"):
        ReMaxConfig(output_dir=str(tmp_path), num_generations=0, **QUIET)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        ReMaxConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, num_generations=2, **QUIET)


def test_remax_learns_a_reward_on_heldout_prompts(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    heldout = embedded_data("prompts", split="test")
    # the paper's setting, one sample and one greedy completion per prompt; the greedy baseline beats most samples
    # of the random model, so most advantages are negative and learning takes a few more steps
    args = learning_args(ReMaxConfig, tmp_path, num_generations=1, max_steps=80)
    trainer = ReMaxTrainer(tiny_model_path, space_reward, args=args, train_dataset=embedded_data("prompts"))
    before = heldout_space_reward(trainer.model, tiny_tokenizer, heldout)
    trainer.train()
    after = heldout_space_reward(trainer.model, tiny_tokenizer, heldout)
    assert after > before + 2.0, (before, after)
    assert "greedy_reward" in trainer.state.log_history[0]


DDP_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from datasets import Dataset
import hf_align.generation, hf_align.rollout
from test_reinforce import LENGTHS, fixed_generate, group_rows
from test_remax import length_times_answer_reward
from hf_align.trainers.remax import ReMaxConfig, ReMaxTrainer

model_path, rows_path, out = sys.argv[1:4]
dataset = Dataset.from_list(json.load(open(rows_path)))
args = ReMaxConfig(output_dir=out, per_device_train_batch_size=3, num_generations=2, report_to="none",
                   save_strategy="no", disable_tqdm=True)
trainer = ReMaxTrainer(model_path, length_times_answer_reward, args=args, train_dataset=dataset)
rank = trainer.accelerator.process_index
greedy_calls = []
generate = fixed_generate(LENGTHS, dict(zip(dataset["prompt"], (3, 2, 2))), first_row=3 * rank,
                          greedy_calls=greedy_calls)
hf_align.rollout.generate_completions = hf_align.generation.generate_completions = generate
trainer.model.train()
rollout = trainer.make_rollout(group_rows(dataset, 2)[3 * rank : 3 * rank + 3])
json.dump({"world": trainer.accelerator.num_processes, "advantages": rollout.advantages.tolist(),
           "greedy_prompts": [prompts for prompts, _ in greedy_calls]}, open(f"{out}/rank{rank}.json", "w"))
"""


def test_slow_ddp_each_group_is_decoded_once_and_its_baseline_shared(tiny_model_path, embedded_data, tmp_path):
    """3 prompts × G = 2 over 2 processes of 3 rows: process 0 holds prompt 0's group and the first row of prompt 1's,
    process 1 the second row of prompt 1's and prompt 2's group."""
    dataset = embedded_data("prompts", 3)
    (tmp_path / "rows.json").write_text(json.dumps(dataset.to_list()))
    launch_two_processes(DDP_SCRIPT, tmp_path, tiny_model_path, tmp_path / "rows.json", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    prompts = dataset["prompt"]
    assert ranks[0]["greedy_prompts"] == [prompts[:2]] and ranks[1]["greedy_prompts"] == [prompts[2:]]
    # samples 2, 4 | 3, 1 | 2, 3 tokens; greedy 3 | 2 | 2 tokens; rewards: tokens × the prompt's answer
    answers = [int(a) for a in dataset["answer"]]
    rewards = [length * answers[i // 2] for i, length in enumerate(LENGTHS)]
    greedy = [length * answer for length, answer in zip((3, 2, 2), answers)]
    expected = [reward - greedy[i // 2] for i, reward in enumerate(rewards)]
    assert ranks[0]["advantages"] + ranks[1]["advantages"] == pytest.approx(expected)
    assert ranks[1]["advantages"][0] == pytest.approx(-answers[1])  # process 1's row, process 0's greedy decode
