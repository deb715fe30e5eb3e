"""GRPOTrainer and RLOOTrainer: the numbers of TRL 1.16's trainers on the same completions, TRL's quickstarts with the
import swapped, the sampler order, the tie warning, bad data and failing reward functions.

Sampling is random, so the parity tests give both trainers the same completions: each trainer's generation step is
replaced by one that returns, for row `i` of a generation batch, a fixed function of that row's prompt ids and `i`
(lengths vary, some rows end with the eos token, others run to `max_completion_length`). Everything after sampling
(tokenization, old / reference log-probs, rewards, advantages, loss, metrics, the optimizer step) is each trainer's
own, and the logs of two optimizer steps over one generation batch must agree.
"""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_align import DataError
from hf_align.rewards import RewardFunctionError
from hf_align.rollout import GroupSampler
from hf_align.trainers.grpo import GRPOConfig, GRPOTrainer
from hf_align.trainers.rloo import RLOOConfig, RLOOTrainer

trl = pytest.importorskip("trl")

REL = 2e-3
MAX_COMPLETION = 8
QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, bf16=False)


def fake_completion(prompt_ids: list[int], row: int, eos: int) -> list[int]:
    """A completion that depends only on the prompt and the row: 2 to 8 tokens, eos-terminated on most rows."""
    length = 2 + (sum(prompt_ids) + 3 * row) % (MAX_COMPLETION - 1)
    tokens = [(sum(prompt_ids) * (row + 1) + 17 * k) % 200 + 10 for k in range(length)]
    return tokens if row % 4 == 3 else tokens[:-1] + [eos] if length < MAX_COMPLETION else tokens


def patch_trl_generation(trainer, eos: int):
    def generate(prompt_ids, *args, **kwargs):
        completions = [fake_completion(list(ids), i, eos) for i, ids in enumerate(prompt_ids)]
        # TRL's GRPO returns (completion ids, sampling log-probs), its RLOO the ids alone.
        return completions if isinstance(trainer, trl.RLOOTrainer) else (completions, None)

    trainer._generate_single_turn = generate


@pytest.fixture
def patch_hf_align_generation(fixed_completions):
    fixed_completions(lambda prompt_ids, row, tokenizer, model: fake_completion(prompt_ids, row, tokenizer.eos_token_id))


def length_reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(text) % 7) - 2.0 for text in texts]


def answer_reward(completions, answer, **kwargs):
    # Uses a dataset column, and returns None (not applicable) for some rows.
    return [None if int(a) % 5 == 0 else float(len(str(c)) % 3) for c, a in zip(completions, answer)]


def _prompts(embedded_data, conversational: bool, n: int = 16):
    rows = embedded_data("prompts", n)
    if conversational:
        rows = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                  for r in rows])
    return rows


def _logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _assert_logs_match(ours: list[dict], theirs: list[dict], keys):
    assert len(ours) == len(theirs) == 2
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in keys:
            if key not in b:
                continue
            assert key in a, f"step {step}: hf_align did not log {key}"
            assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-6), f"step {step}, {key}: {a[key]} vs TRL {b[key]}"


PARITY_KEYS = (
    "loss", "reward", "reward_std", "rewards/length_reward/mean", "rewards/length_reward/std",
    "rewards/answer_reward/mean", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
    "completions/clipped_ratio", "completions/mean_terminated_length", "clip_ratio/region_mean",
    "clip_ratio/low_mean", "clip_ratio/high_mean", "num_tokens",
)


def _settings(tmp_path, **overrides) -> dict:
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_steps=2,
        max_completion_length=MAX_COMPLETION, learning_rate=5e-3, num_iterations=2, beta=0.04, logging_steps=1,
        temperature=0.7, seed=3, **QUIET,
    )
    settings.update(overrides)
    return settings


@pytest.mark.parametrize(
    "loss_type, level, conversational",
    [("dapo", "token", False), ("grpo", "token", False), ("dr_grpo", "token", False), ("bnpo", "token", False),
     ("grpo", "sequence", False), ("dapo", "token", True)],
)
def test_grpo_matches_trl_on_the_same_completions(loss_type, level, conversational, tiny_model_path, tiny_tokenizer,
                                                  embedded_data, patch_hf_align_generation, tmp_path):
    dataset = _prompts(embedded_data, conversational)
    settings = _settings(tmp_path, loss_type=loss_type, importance_sampling_level=level, reward_weights=[1.0, 0.5])
    funcs = [length_reward, answer_reward]

    torch.manual_seed(0)
    theirs = trl.GRPOTrainer(tiny_model_path, funcs, args=trl.GRPOConfig(**settings), train_dataset=dataset)
    patch_trl_generation(theirs, tiny_tokenizer.eos_token_id)
    theirs.train()
    torch.manual_seed(0)
    ours = GRPOTrainer(tiny_model_path, funcs, args=GRPOConfig(**settings), train_dataset=dataset)
    ours.train()

    ours_logs, theirs_logs = _logs(ours), _logs(theirs)
    _assert_logs_match(ours_logs, theirs_logs, PARITY_KEYS)
    # The comparison means something: the loss after the first update (the first is 0 for "grpo", whose advantages
    # sum to 0 within each group), the KL and some clipping are non-zero.
    assert abs(ours_logs[1]["loss"]) > 1e-4
    assert ours_logs[1]["kl"] > 1e-6 and ours_logs[1]["clip_ratio/region_mean"] > 0


def test_rloo_matches_trl_on_the_same_completions(tiny_model_path, tiny_tokenizer, embedded_data,
                                                  patch_hf_align_generation, tmp_path):
    dataset = _prompts(embedded_data, False)
    settings = _settings(tmp_path, normalize_advantages=True, reward_clip_range=(-1.5, 3.0))
    funcs = [length_reward, answer_reward]

    torch.manual_seed(0)
    theirs = trl.RLOOTrainer(tiny_model_path, funcs, args=trl.RLOOConfig(**settings), train_dataset=dataset)
    patch_trl_generation(theirs, tiny_tokenizer.eos_token_id)
    theirs.train()
    torch.manual_seed(0)
    ours = RLOOTrainer(tiny_model_path, funcs, args=RLOOConfig(**settings), train_dataset=dataset)
    ours.train()

    ours_logs = _logs(ours)
    _assert_logs_match(ours_logs, _logs(theirs), PARITY_KEYS + ("clip_ratio/low_min", "clip_ratio/high_max"))
    # Whitened advantages make the first loss 0; after the first update the ratios and the KL in the reward move it.
    assert abs(ours_logs[1]["loss"]) > 1e-4 and ours_logs[1]["clip_ratio/region_mean"] > 0


@pytest.mark.parametrize(
    "trainer_class, config_class, packing",
    [(GRPOTrainer, GRPOConfig, dict(prefix_sharing=True)), (GRPOTrainer, GRPOConfig, dict(padding_free=True)),
     (RLOOTrainer, RLOOConfig, dict(prefix_sharing=True, padding_free=True))],
)
def test_packed_rows_give_the_same_run(trainer_class, config_class, packing, tiny_model_path, embedded_data,
                                       patch_hf_align_generation, tmp_path):
    """A group's samples share their prompt: with it held once (and/or no padding) the two optimizer steps log the
    same numbers and end on the same weights as the plain rows."""
    dataset = _prompts(embedded_data, conversational=False)
    runs = []
    for options in ({}, packing):
        torch.manual_seed(0)
        trainer = trainer_class(tiny_model_path, length_reward,
                                args=config_class(**_settings(tmp_path, **options)), train_dataset=dataset)
        trainer.train()
        runs.append(trainer)
    plain, packed = runs
    _assert_logs_match(_logs(packed), _logs(plain), set(_logs(plain)[0]) - {"learning_rate", "epoch", "grad_norm"})
    # The updates agree as a whole (Adam turns fp32 noise in a near-zero gradient into a full-size step on a few
    # single weights, so element-wise equality is not expected).
    start = torch.cat([p.flatten() for p in AutoModelForCausalLM.from_pretrained(tiny_model_path).parameters()])
    updates = [torch.cat([p.detach().flatten() for p in run.model.parameters()]) - start for run in runs]
    assert updates[0].norm() > 0
    assert (updates[1] - updates[0]).norm() <= 1e-3 * updates[0].norm()


def test_group_sampler_order_is_trls_repeat_sampler():
    from trl.trainer.utils import RepeatSampler

    for shuffle in (True, False):
        ours = GroupSampler(11, group_size=3, prompts_per_batch=4, repeat_count=2, shuffle=shuffle, seed=7)
        theirs = RepeatSampler(list(range(11)), mini_repeat_count=3, batch_size=4, repeat_count=2, shuffle=shuffle,
                               seed=7)
        assert list(ours) == list(theirs) and len(ours) == len(theirs) == 2 * 4 * 3 * 2
        assert list(ours) != list(ours) or not shuffle  # a new order each epoch


# ------------------------------------------------------------------------------------------ TRL's quickstarts


@pytest.mark.parametrize("trainer_name", ["GRPO", "RLOO"])
def test_trl_quickstart_runs_with_import_swapped(trainer_name, tiny_model_path, embedded_data, tmp_path):
    # TRL's documented quickstart, with `from trl import GRPOTrainer` changed to hf_align and a tiny local model and
    # dataset in place of the Hub ones (and a short run).
    import hf_align

    trainer_cls = getattr(hf_align, f"{trainer_name}Trainer")
    config_cls = getattr(hf_align, f"{trainer_name}Config")

    def reward_num_unique_chars(completions, **kwargs):
        return [len(set(c)) for c in completions]

    training_args = config_cls(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                               num_generations=2, max_completion_length=8, **QUIET)
    trainer = trainer_cls(model=tiny_model_path, reward_funcs=reward_num_unique_chars, args=training_args,
                          train_dataset=embedded_data("prompts", 8))
    trainer.train()
    assert trainer.state.global_step == 2
    assert "rewards/reward_num_unique_chars/mean" in trainer.state.log_history[0]


# ------------------------------------------------------------------------------------------ guards


def test_all_groups_tied_warns_once(tiny_model_path, embedded_data, tmp_path, caplog):
    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, logging_steps=1, **QUIET)
    trainer = GRPOTrainer(tiny_model_path, constant, args=args, train_dataset=embedded_data("prompts", 8))
    with caplog.at_level(logging.WARNING, logger="hf_align.online"):
        trainer.train()
    assert sum("equal rewards" in record.getMessage() for record in caplog.records) == 1
    assert trainer.state.log_history[0]["frac_reward_zero_std"] == 1.0


def test_missing_or_empty_prompt_raises_before_training(tiny_model_path, tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path / "out"), num_generations=2, per_device_train_batch_size=2, **QUIET)
    with pytest.raises(DataError, match="prompt"):
        GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=Dataset.from_dict({"question": ["a"]}))
    with pytest.raises(DataError, match=r"row 1.*'prompt'"):
        GRPOTrainer(tiny_model_path, length_reward, args=args,
                    train_dataset=Dataset.from_dict({"prompt": ["Question: hi\nAnswer:", ""]}))


def test_failing_reward_function_names_itself_and_the_sample(tiny_model_path, embedded_data, tmp_path):
    def fussy_reward(completions, answer, **kwargs):
        return [1.0 / (int(a) - 12) for a in answer]  # the row whose answer is 12 divides by zero

    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, shuffle_dataset=False, **QUIET)
    trainer = GRPOTrainer(tiny_model_path, fussy_reward, args=args, train_dataset=embedded_data("prompts", 2))
    with pytest.raises(RewardFunctionError, match=r"fussy_reward.*19 - 7"):
        trainer.train()


def test_batch_arithmetic_is_checked(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_generations"):
        GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, num_generations=2, **QUIET)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(output_dir=str(tmp_path), loss_type="ppo", **QUIET)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      gradient_accumulation_steps=3, **QUIET)
    assert (args.steps_per_generation, args.generation_batch_size, args.epsilon_high) == (3, 12, 0.2)
    assert AutoTokenizer is not None
