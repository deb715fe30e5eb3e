"""OnlineDPOTrainer: the numbers of TRL 1.16's experimental OnlineDPOTrainer on the same completions (sigmoid and IPO),
pairs ranked by reward functions and by a pairwise judge (a stub whose preference is known, and JudgeReward on the
tiny model), learning on the tiny model, and bad input.

Sampling is random, so the parity tests give both trainers the same completions: each trainer's generation is
replaced by one that returns, for the g-th sample (g = 0, 1) of a prompt, a fixed function of the prompt's ids and g.
Completions either end with a stop token or run to `max_new_tokens`, as sampled ones do. Everything after sampling
(ranking, the missing-eos penalty, reference and policy log-probs, loss, metrics, the optimizer step) is each
trainer's own, and the logs of two steps must agree. Each step covers the whole dataset (as many prompts as a batch
holds), so both trainers see the same prompts whatever order their samplers draw them in.
"""

from __future__ import annotations

import time

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import hf_align.rollout
from hf_align import DataError, data
from hf_align.generation import SamplingConfig, encode_prompts, generate_completions
from hf_align.rewards import RewardFunctionError, completion_text
from hf_align.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from hf_align.verifiers import JudgeReward

trl_online_dpo = pytest.importorskip("trl.experimental.online_dpo")

REL = 2e-3
MAX_NEW_TOKENS = 8
PROMPTS_PER_STEP = 8
QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, bf16=False, gradient_checkpointing=False)


def fake_completion(prompt_ids: list[int], sample: int, stop_ids: list[int], uniform: bool) -> list[int]:
    """The `sample`-th (0 or 1) completion of a prompt: ordinary tokens (ids 10-209, no special token), ending with a
    stop token after 2 to 8 tokens on most rows, else running to MAX_NEW_TOKENS without one. `uniform`: every
    completion is MAX_NEW_TOKENS long (stop token last or none), so no completion is padded."""
    seed = sum(prompt_ids) * (sample + 3) + 7 * sample
    tokens = [(seed + 31 * k) % 200 + 10 for k in range(MAX_NEW_TOKENS)]
    if seed % 3 == 0:  # truncated: no stop token within MAX_NEW_TOKENS
        return tokens
    length = MAX_NEW_TOKENS if uniform else 2 + seed % (MAX_NEW_TOKENS - 1)
    return tokens[: length - 1] + [stop_ids[seed % len(stop_ids)]]


def patch_trl_generation(trainer, stop_ids: list[int], pad_id: int, uniform: bool):
    """Replaces the model's `generate` under TRL's `_generate`: TRL tokenizes the prompts, lays out the two samples
    block-wise (rows i and i + B are prompt i), and cuts after the first stop token itself."""

    def generate(input_ids, attention_mask, **kwargs):
        half = input_ids.size(0) // 2
        rows = [fake_completion(ids[mask.bool()].tolist(), row // half, stop_ids, uniform)
                for row, (ids, mask) in enumerate(zip(input_ids, attention_mask))]
        completions = data.pad([torch.tensor(row) for row in rows], pad_id)
        return torch.cat([input_ids, completions], dim=1)

    trainer.model.generate = generate


@pytest.fixture
def patch_hf_align_generation(fixed_completions):
    """hf_align's sampling replaced: rows 2i and 2i + 1 are the two samples of a prompt."""
    state = {"uniform": False}

    def completion(prompt_ids, row, tokenizer, model):
        stop_ids = hf_align.generation.stop_token_ids(model, tokenizer)
        return fake_completion(prompt_ids, row % 2, stop_ids, state["uniform"])

    fixed_completions(completion)
    return state


def text_reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(sum(map(ord, text)) % 11) - 3.0 for text in texts]


def answer_reward(completions, answer, **kwargs):
    # Reads a dataset column, and does not apply (None) to some rows.
    return [None if int(a) % 5 == 0 else float(len(str(c)) % 3) for c, a in zip(completions, answer)]


def _prompts(embedded_data, conversational: bool, n: int = PROMPTS_PER_STEP, split: str = "train"):
    rows = embedded_data("prompts", n, split=split)
    if conversational:
        rows = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                  for r in rows])
    return rows


def _logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# Logged by both; the first four sum over padding in TRL, so they are compared only when no completion is padded.
PADDING_SENSITIVE = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward")
PARITY_KEYS = (
    "loss", "objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected", "rewards/margins",
    "rewards/accuracies", "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta",
)


@pytest.mark.parametrize(
    "loss_type, conversational, uniform",
    [("sigmoid", False, False), ("ipo", False, False), ("sigmoid", True, True), ("ipo", False, True)],
)
def test_matches_trl_on_the_same_completions(loss_type, conversational, uniform, tiny_model_path, tiny_tokenizer,
                                             embedded_data, patch_hf_align_generation, tmp_path):
    patch_hf_align_generation["uniform"] = uniform
    dataset = _prompts(embedded_data, conversational)
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, learning_rate=5e-3, beta=0.1, loss_type=loss_type,
        max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, missing_eos_penalty=1.5, reward_weights=[1.0, 0.5],
        logging_steps=1, seed=3, **QUIET,
    )
    funcs = [text_reward, answer_reward]
    stop_ids = hf_align.generation.stop_token_ids(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                                  tiny_tokenizer)

    theirs = trl_online_dpo.OnlineDPOTrainer(
        tiny_model_path, reward_funcs=funcs, train_dataset=dataset, processing_class=tiny_tokenizer,
        args=trl_online_dpo.OnlineDPOConfig(per_device_train_batch_size=PROMPTS_PER_STEP, **settings),
    )
    patch_trl_generation(theirs, stop_ids, tiny_tokenizer.pad_token_id, uniform)
    theirs.train()
    ours = OnlineDPOTrainer(
        tiny_model_path, reward_funcs=funcs, train_dataset=dataset, processing_class=tiny_tokenizer,
        args=OnlineDPOConfig(per_device_train_batch_size=2 * PROMPTS_PER_STEP, **settings),
    )
    ours.train()

    ours_logs, theirs_logs = _logs(ours), _logs(theirs)
    keys = PARITY_KEYS + (PADDING_SENSITIVE if uniform else ())
    assert len(ours_logs) == len(theirs_logs) == 2
    for step, (a, b) in enumerate(zip(ours_logs, theirs_logs)):
        for key in keys:
            assert key in a and key in b, f"step {step}: {key} missing (hf_align: {key in a}, TRL: {key in b})"
            assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-6), f"step {step}, {key}: {a[key]} vs TRL {b[key]}"
    # The comparison means something: after the first update the policy has left the reference, the pairs are
    # told apart by score, and some completions lack a stop token (the penalty applies).
    assert abs(ours_logs[1]["rewards/margins"]) > 1e-4 and ours_logs[1]["objective/kl"] != 0
    assert ours_logs[0]["objective/scores_margin"] > 0 and 0 < ours_logs[0]["val/contain_eos_token"] < 1


# ------------------------------------------------------------------------------------------ ranking the pairs


def _args(tmp_path, **overrides) -> OnlineDPOConfig:
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2 * PROMPTS_PER_STEP,
                    max_new_tokens=MAX_NEW_TOKENS, learning_rate=1e-3, logging_steps=1, seed=0, **QUIET)
    return OnlineDPOConfig(**{**settings, **overrides})


def _pair_rows(dataset) -> list[dict]:
    """Dataset rows as the sampler lays them out: each prompt twice in a row."""
    return [row for row in dataset for _ in range(2)]


def _texts(tokenizer, pairs, which: int) -> list[str]:
    """The decoded chosen (`which=0`) or rejected (1) completion of each pair."""
    ids, mask = pairs.completion_ids[:, which], pairs.completion_mask[:, which].bool()
    return [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(ids, mask)]


class LongerTextJudge:
    """A pairwise judge whose preference is known: the longer text (the second on a tie). Records its calls."""

    __name__ = "longer_text_judge"

    def __init__(self):
        self.calls = []

    def rank(self, prompts, completions_a, completions_b):
        self.calls.append((prompts, completions_a, completions_b))
        return [0 if len(completion_text(a)) > len(completion_text(b)) else 1
                for a, b in zip(completions_a, completions_b)]


def test_reward_scores_rank_each_pair_ties_to_the_first_after_the_eos_penalty(
        tiny_model_path, tiny_tokenizer, embedded_data, patch_hf_align_generation, tmp_path):
    def score_by_sample(completions, answer, **kwargs):
        # The first sample of a prompt scores `answer % 3`, the second 1: both orders and ties occur.
        return [float(int(a) % 3) if i % 2 == 0 else 1.0 for i, a in enumerate(answer)]

    dataset = _prompts(embedded_data, False)
    trainer = OnlineDPOTrainer(tiny_model_path, reward_funcs=score_by_sample, train_dataset=dataset,
                               processing_class=tiny_tokenizer, args=_args(tmp_path, missing_eos_penalty=1.0))
    pairs = trainer.make_rollout(_pair_rows(dataset))

    stop_ids = hf_align.generation.stop_token_ids(trainer.model, tiny_tokenizer)
    samples = [[fake_completion(ids, g, stop_ids, False) for g in (0, 1)]
               for ids in encode_prompts(tiny_tokenizer, dataset["prompt"])]
    scores = torch.tensor([[float(int(a) % 3), 1.0] for a in dataset["answer"]])
    scores -= torch.tensor([[0.0 if s[-1] in stop_ids else 1.0 for s in pair] for pair in samples])
    first_wins = scores[:, 0] >= scores[:, 1]
    assert 0 < int(first_wins.sum()) < len(dataset) and bool((scores[:, 0] == scores[:, 1]).any())
    assert pairs.completion_ids.shape[:2] == pairs.ref_logps.shape[:2] == (len(dataset), 2)
    for p, (pair, first_won) in enumerate(zip(samples, first_wins.tolist())):
        for which, expected in enumerate(pair if first_won else pair[::-1]):
            assert int(pairs.completion_mask[p, which].sum()) == len(expected)
            assert pairs.completion_ids[p, which, : len(expected)].tolist() == expected
    torch.testing.assert_close(pairs.extras["scores"], torch.where(first_wins[:, None], scores, scores.flip(1)))
    assert pairs.extras["has_stop_token"].tolist() == [[s[-1] in stop_ids for s in (pair if won else pair[::-1])]
                                                for pair, won in zip(samples, first_wins.tolist())]


def test_a_pairwise_judge_picks_chosen_and_rejected(tiny_model_path, tiny_tokenizer, embedded_data,
                                                    patch_hf_align_generation, tmp_path):
    dataset = _prompts(embedded_data, True)
    judge = LongerTextJudge()
    trainer = OnlineDPOTrainer(tiny_model_path, judge=judge, train_dataset=dataset, processing_class=tiny_tokenizer,
                               args=_args(tmp_path))
    pairs = trainer.make_rollout(_pair_rows(dataset))

    prompts, firsts, seconds = judge.calls[-1]
    assert prompts == list(dataset["prompt"])  # one call per batch: each pair's prompt once, in order
    firsts, seconds = list(map(completion_text, firsts)), list(map(completion_text, seconds))
    preferred = [a if len(a) > len(b) else b for a, b in zip(firsts, seconds)]
    other = [b if len(a) > len(b) else a for a, b in zip(firsts, seconds)]
    assert 0 < sum(p == a for p, a in zip(preferred, firsts)) < len(dataset)  # both orders occur
    assert _texts(tiny_tokenizer, pairs, 0) == preferred
    assert _texts(tiny_tokenizer, pairs, 1) == other

    trainer.train()
    log = _logs(trainer)[0]
    assert {"rewards/margins", "logps/chosen", "objective/kl", "beta"} <= set(log)
    # A judge's preferences are not rewards: no score metrics.
    assert not {"objective/scores", "objective/rlhf_reward", "reward", "rewards/longer_text_judge/mean"} & set(log)


def test_judge_reward_ranks_pairs_on_the_tiny_model(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    judge = JudgeReward(AutoModelForCausalLM.from_pretrained(tiny_model_path), tiny_tokenizer,
                        ["Answer with the number only.", "Be brief."])
    dataset = _prompts(embedded_data, False)
    trainer = OnlineDPOTrainer(tiny_model_path, judge=judge, train_dataset=dataset, processing_class=tiny_tokenizer,
                               args=_args(tmp_path, max_steps=2))
    trainer.train()
    assert all("rewards/margins" in log for log in _logs(trainer))

    trainer.model.train()
    pairs = trainer.make_rollout(_pair_rows(dataset))
    prompts = list(dataset["prompt"])
    chosen = judge.scores(prompts, _texts(tiny_tokenizer, pairs, 0))
    rejected = judge.scores(prompts, _texts(tiny_tokenizer, pairs, 1))
    assert bool((chosen >= rejected - 1e-5).all()) and bool((chosen != rejected).any())


# ------------------------------------------------------------------------------------------ learning


def brevity_reward(completions, **kwargs):
    return [-float(len(c)) for c in completions]


def verbosity_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _held_out_mean_length(model, tokenizer, prompts) -> float:
    sampled = generate_completions(model, tokenizer, prompts,
                                   SamplingConfig(max_new_tokens=12, temperature=0.9, num_generations=2, seed=0))
    return sum(map(len, sampled.texts)) / len(sampled.texts)


def test_learns_what_the_reward_prefers_on_held_out_prompts(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    """Trained to prefer shorter completions, the tiny random model writes far shorter ones on held-out prompts;
    trained to prefer longer ones (the control: same pairs, opposite ranking), it does not get shorter."""
    start = time.perf_counter()
    held_out = list(embedded_data("prompts", split="test")["prompt"])
    initial = _held_out_mean_length(AutoModelForCausalLM.from_pretrained(tiny_model_path), tiny_tokenizer, held_out)
    lengths = {}
    for reward in (brevity_reward, verbosity_reward):
        trainer = OnlineDPOTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_path), reward_funcs=reward,
            train_dataset=embedded_data("prompts"), processing_class=tiny_tokenizer,
            args=_args(tmp_path, learning_rate=2e-2, max_steps=30, max_new_tokens=12, logging_steps=10),
        )
        trainer.train()
        lengths[reward.__name__] = _held_out_mean_length(trainer.model, tiny_tokenizer, held_out)
    assert lengths["brevity_reward"] < initial / 3, (initial, lengths)
    assert lengths["verbosity_reward"] > initial * 0.9, (initial, lengths)
    assert time.perf_counter() - start < 20


# ------------------------------------------------------------------------------------------ reference, β, evaluation


def test_an_explicit_ref_model_is_the_reference(tiny_model_path, tiny_tokenizer, embedded_data,
                                                patch_hf_align_generation, tmp_path):
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        ref_model.lm_head.weight.mul_(1.5)  # tied to the embeddings: the reference now differs from the policy
    trainer = OnlineDPOTrainer(tiny_model_path, ref_model, text_reward, train_dataset=_prompts(embedded_data, False),
                               processing_class=tiny_tokenizer, args=_args(tmp_path))
    assert trainer.ref_model is ref_model and not any(p.requires_grad for p in ref_model.parameters())
    trainer.train()
    # Before any update the policy is the model it was loaded as: against a copy of it, the KL would be 0.
    assert abs(_logs(trainer)[0]["objective/kl"]) > 1e-2
    with pytest.raises(ValueError, match="different objects"):
        OnlineDPOTrainer(ref_model, ref_model, text_reward, train_dataset=_prompts(embedded_data, False),
                         processing_class=tiny_tokenizer, args=_args(tmp_path))


def test_peft_uses_the_model_without_its_adapter_as_reference(tiny_model_path, tiny_tokenizer, embedded_data,
                                                              patch_hf_align_generation, tmp_path):
    from peft import LoraConfig

    trainer = OnlineDPOTrainer(tiny_model_path, reward_funcs=text_reward, train_dataset=_prompts(embedded_data, False),
                               processing_class=tiny_tokenizer, args=_args(tmp_path, max_steps=2, learning_rate=5e-2),
                               peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert trainer.ref_model is None
    trainer.train()
    first, second = _logs(trainer)
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # a fresh adapter changes nothing yet
    assert abs(second["objective/kl"]) > 1e-4 and abs(second["rewards/margins"]) > 1e-5


def test_a_list_of_betas_gives_one_per_epoch(tiny_model_path, tiny_tokenizer, embedded_data,
                                             patch_hf_align_generation, tmp_path):
    trainer = OnlineDPOTrainer(tiny_model_path, reward_funcs=text_reward, train_dataset=_prompts(embedded_data, False),
                               processing_class=tiny_tokenizer, args=_args(tmp_path, max_steps=3, beta=[0.2, 0.05]))
    trainer.train()
    assert [log["beta"] for log in _logs(trainer)] == [0.2, 0.05, 0.05]
    assert OnlineDPOConfig(output_dir=str(tmp_path), beta=[0.3], **QUIET).beta == 0.3  # one value: a float, as TRL


def test_evaluate_logs_the_pair_metrics_on_eval_prompts(tiny_model_path, tiny_tokenizer, embedded_data,
                                                        patch_hf_align_generation, tmp_path):
    trainer = OnlineDPOTrainer(tiny_model_path, reward_funcs=text_reward, train_dataset=_prompts(embedded_data, False),
                               eval_dataset=_prompts(embedded_data, False, n=6, split="test"),
                               processing_class=tiny_tokenizer, args=_args(tmp_path, per_device_eval_batch_size=4))
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_rewards/margins", "eval_objective/scores", "eval_val/contain_eos_token"):
        assert key in metrics
    assert metrics["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # no update yet: h = 0, loss = log 2


# ------------------------------------------------------------------------------------------ bad input


def test_ranking_needs_reward_functions_or_a_judge(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    dataset, args = _prompts(embedded_data, False), _args(tmp_path)
    build = lambda **kwargs: OnlineDPOTrainer(tiny_model_path, train_dataset=dataset,  # noqa: E731
                                              processing_class=tiny_tokenizer, args=args, **kwargs)
    with pytest.raises(ValueError, match="exactly one"):
        build()
    with pytest.raises(ValueError, match="exactly one"):
        build(reward_funcs=text_reward, judge=LongerTextJudge())
    with pytest.raises(TypeError, match="rank"):
        build(judge=text_reward)
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        OnlineDPOTrainer(tiny_model_path, judge=LongerTextJudge(), train_dataset=dataset,
                         processing_class=tiny_tokenizer, args=_args(tmp_path, missing_eos_penalty=1.0))
    with pytest.raises(ValueError, match="data_collator"):
        build(reward_funcs=text_reward, data_collator=lambda rows: rows)
    with pytest.raises(DataError, match="prompt"):
        OnlineDPOTrainer(tiny_model_path, reward_funcs=text_reward, processing_class=tiny_tokenizer, args=args,
                         train_dataset=Dataset.from_dict({"question": ["What is 1 + 1?"]}))


def test_a_judge_answering_out_of_range_is_named(tiny_model_path, tiny_tokenizer, embedded_data,
                                                 patch_hf_align_generation, tmp_path):
    class ConfusedJudge(LongerTextJudge):
        __name__ = "confused_judge"

        def rank(self, prompts, completions_a, completions_b):
            return [2] * len(prompts)

    dataset = _prompts(embedded_data, False)
    trainer = OnlineDPOTrainer(tiny_model_path, judge=ConfusedJudge(), train_dataset=dataset,
                               processing_class=tiny_tokenizer, args=_args(tmp_path))
    with pytest.raises(RewardFunctionError, match="confused_judge") as raised:
        trainer.train()
    assert "one rank, 0 or 1, per pair" in str(raised.value.__cause__)


@pytest.mark.parametrize("settings, message", [
    (dict(loss_type="hinge"), "loss_type"),
    (dict(per_device_train_batch_size=3), "even"),
    (dict(num_generations=4), "exactly 2"),
    (dict(beta=0.0), "beta"),
    (dict(beta=[0.1, -0.1]), "beta"),
    (dict(max_length=8, max_new_tokens=8), "max_length"),
    (dict(max_completion_length=32), "max_new_tokens"),
    (dict(missing_eos_penalty=-1.0), "missing_eos_penalty"),
    (dict(mask_truncated_completions=True), "missing_eos_penalty"),
])
def test_bad_config_is_refused(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        OnlineDPOConfig(output_dir=str(tmp_path), **{**QUIET, **settings})


def test_defaults_are_trls(tmp_path):
    ours = OnlineDPOConfig(output_dir=str(tmp_path), **QUIET)
    theirs = trl_online_dpo.OnlineDPOConfig(output_dir=str(tmp_path), **QUIET)
    for name in ("learning_rate", "max_new_tokens", "max_length", "temperature", "missing_eos_penalty", "beta",
                 "loss_type", "top_p", "top_k", "disable_dropout", "reward_weights", "logging_steps"):
        assert getattr(ours, name) == getattr(theirs, name), name
    # Batch sizes count completions here, prompts in TRL: the same 8 prompts per device and step.
    assert ours.per_device_train_batch_size == 2 * theirs.per_device_train_batch_size
    assert ours.max_completion_length == ours.max_new_tokens
