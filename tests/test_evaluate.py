"""hf_align.evaluate: each metric against a hand computation (full logits, the completions generated apart, judges and
reward functions whose verdicts are known), agreement with DPOTrainer's own eval metrics, and EvaluationCallback on a
short DPO run: logged at the right steps, without taking the training metrics, and showing the pairs being learnt."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from hf_align import DPOConfig, DPOTrainer, EvaluationCallback
from hf_align.evaluate import (
    METRICS, evaluate, implicit_rewards, judge_win_rate, pair_logps, prepare_pairs, preference_metrics, score_win_rate,
)
from hf_align.generation import SamplingConfig, generate_completions
from hf_align.rewards import RewardScorer
from hf_align.verifiers import JudgeReward


def _perturbed(model, seed: int = 0, scale: float = 0.05):
    """A frozen copy of `model` with every weight moved by Gaussian noise: a reference that differs from it."""
    generator = torch.Generator().manual_seed(seed)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return reference


def _naive_logps(model, prompt_ids: list[int], ids: list[int]) -> float:
    """Summed log-probs of `ids[len(prompt_ids):]` after the rest, from the full logits (independent of
    hf_align.logprobs)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    logps = torch.log_softmax(logits[0, :-1], -1).gather(-1, input_ids[0, 1:, None]).squeeze(-1)
    return logps[len(prompt_ids) - 1 :].sum().item()


def _text_length_reward(completions, **kwargs):
    return [float(len(completion)) for completion in completions]


# ---------------------------------------------------------------------------------------------------------- pairs


def test_implicit_rewards_and_preference_metrics_match_a_hand_computation(tiny_model, tiny_tokenizer,
                                                                          preference_data):
    pairs = preference_data("preference", 8, split="test")
    reference = _perturbed(tiny_model)
    eos = tiny_tokenizer.eos_token

    def hand_logps(model, column):
        values = []
        for row in pairs:
            prompt_ids = tiny_tokenizer(row["prompt"])["input_ids"]
            ids = tiny_tokenizer(row["prompt"] + row[column] + eos)["input_ids"]
            assert ids[: len(prompt_ids)] == prompt_ids  # no BPE merge across the prompt boundary here
            values.append(_naive_logps(model, prompt_ids, ids))
        return torch.tensor(values)

    chosen = 0.5 * (hand_logps(tiny_model, "chosen") - hand_logps(reference, "chosen"))
    rejected = 0.5 * (hand_logps(tiny_model, "rejected") - hand_logps(reference, "rejected"))
    got_chosen, got_rejected = implicit_rewards(tiny_model, tiny_tokenizer, pairs, reference=reference, beta=0.5,
                                                batch_size=3)
    torch.testing.assert_close(got_chosen, chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_rejected, rejected, atol=1e-4, rtol=1e-5)

    metrics = evaluate(tiny_model, tiny_tokenizer, reference=reference, pairs=pairs, beta=0.5)
    accuracy = (chosen > rejected).float().mean().item()
    assert 0 < accuracy < 1  # the constructed case tells wins from losses
    assert metrics == pytest.approx({"preference_accuracy": accuracy,
                                     "reward_margin": (chosen - rejected).mean().item()}, abs=1e-4)

    # No reference: the rewards are the policy's summed log-probs, with no β.
    plain_chosen, plain_rejected = implicit_rewards(tiny_model, tiny_tokenizer, pairs, beta=0.5)
    torch.testing.assert_close(plain_chosen, hand_logps(tiny_model, "chosen"), atol=1e-4, rtol=1e-5)
    assert preference_metrics(plain_chosen, plain_rejected)["reward_margin"] == pytest.approx(
        (hand_logps(tiny_model, "chosen") - hand_logps(tiny_model, "rejected")).mean().item(), abs=1e-3)


def test_preference_metrics_equal_the_dpo_trainers_eval_metrics(tiny_model_path, tiny_tokenizer, preference_data,
                                                                 tmp_path):
    """Conversational pairs through DPO's own preparation: after a few updates, `evaluate` gives the numbers
    `DPOTrainer.evaluate` logs as `eval_rewards/accuracies` and `eval_rewards/margins` on the same pairs."""
    train, test = preference_data("conversational", 16), preference_data("conversational", 12, split="test")
    args = DPOConfig(output_dir=str(tmp_path / "out"), learning_rate=5e-4, max_steps=3, beta=0.3,
                     per_device_train_batch_size=8, per_device_eval_batch_size=len(test), report_to="none",
                     save_strategy="no", seed=0)
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args, train_dataset=train,
                         processing_class=tiny_tokenizer)
    trainer.train()
    expected = trainer.evaluate(test)
    metrics = evaluate(trainer.model, tiny_tokenizer, reference=trainer.ref_model, pairs=test, beta=0.3,
                       batch_size=5)
    assert expected["eval_rewards/margins"] != pytest.approx(0.0, abs=1e-3)  # the policy has moved
    assert metrics["preference_accuracy"] == pytest.approx(expected["eval_rewards/accuracies"], abs=1e-6)
    assert metrics["reward_margin"] == pytest.approx(expected["eval_rewards/margins"], abs=1e-4)


def test_a_peft_model_is_compared_against_its_base_model(tiny_model, tiny_tokenizer, preference_data):
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    pairs = prepare_pairs(preference_data("preference", 6), tiny_tokenizer)
    policy_chosen, policy_rejected = pair_logps(peft_model, tiny_tokenizer, pairs)
    with peft_model.disable_adapter():
        base_chosen, base_rejected = pair_logps(peft_model, tiny_tokenizer, pairs)
    assert not torch.allclose(policy_chosen, base_chosen)  # the adapter changes the model
    chosen, rejected = implicit_rewards(peft_model, tiny_tokenizer, pairs, beta=0.2)
    torch.testing.assert_close(chosen, 0.2 * (policy_chosen - base_chosen))
    torch.testing.assert_close(rejected, 0.2 * (policy_rejected - base_rejected))


# ---------------------------------------------------------------------------------------------------------- texts


def test_perplexity_is_token_weighted_over_the_texts(tiny_model, tiny_tokenizer):
    texts = ["Question: How do I clean my room?\nAnswer: Sure!", "No."]
    total, tokens = 0.0, 0
    for text in texts:
        ids = tiny_tokenizer(text + tiny_tokenizer.eos_token)["input_ids"]
        total += _naive_logps(tiny_model, ids[:1], ids)
        tokens += len(ids) - 1
    expected = math.exp(-total / tokens)
    assert evaluate(tiny_model, tiny_tokenizer, texts=texts, batch_size=1) == {
        "perplexity": pytest.approx(expected, rel=1e-4)}
    # Token-weighted, not the mean of each text's perplexity.
    each = [evaluate(tiny_model, tiny_tokenizer, texts=[text])["perplexity"] for text in texts]
    assert sum(each) / 2 != pytest.approx(expected, rel=1e-2)

    messages = [[{"role": "user", "content": "How do I clean my room?"}, {"role": "assistant", "content": "Sure!"}]]
    ids = tiny_tokenizer.apply_chat_template(messages[0], tokenize=True, return_dict=True)["input_ids"]
    expected = math.exp(-_naive_logps(tiny_model, ids[:1], ids) / (len(ids) - 1))
    assert evaluate(tiny_model, tiny_tokenizer, texts=messages)["perplexity"] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------------------ win rates


def test_score_win_rate_counts_ties_as_half_and_leaves_out_the_unscored():
    scores = torch.tensor([3.0, 1.0, 2.0, 4.0, float("nan")])
    reference_scores = torch.tensor([1.0, 1.0, 5.0, 0.0, 0.0])
    assert score_win_rate(scores, reference_scores) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


class _LongerIsBetter:
    """A pairwise judge preferring the longer completion, and the first one of two of the same length."""

    def rank(self, prompts, completions_a, completions_b):
        return [0 if len(a) >= len(b) else 1 for a, b in zip(completions_a, completions_b)]


class _AlwaysFirst:
    def rank(self, prompts, completions_a, completions_b):
        return [0] * len(prompts)


def test_judge_win_rate_judges_both_orders():
    prompts = ["p"] * 4
    model = ["a long answer", "a", "same", "a longer one"]
    reference = ["short", "much longer", "SAME", "b"]
    assert judge_win_rate(_LongerIsBetter(), prompts, model, reference) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert judge_win_rate(_AlwaysFirst(), prompts, model, reference) == 0.5  # position bias counts as a tie


# ---------------------------------------------------------------------------------------------------- generation


def test_generation_metrics_against_a_reference(tiny_model, tiny_tokenizer, tiny_model_path, tiny_seqcls_path,
                                                preference_data):
    rows = preference_data("preference", 5, split="test")
    prompts = rows["prompt"]
    reference = _perturbed(tiny_model, seed=1, scale=0.1)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    policy_texts = generate_completions(tiny_model, tiny_tokenizer, prompts, sampling).texts
    reference_texts = generate_completions(reference, tiny_tokenizer, prompts, sampling).texts
    assert policy_texts != reference_texts

    def chosen_overlap(prompts, completions, chosen, **kwargs):
        """A reward function reading another dataset column: the completion's characters found in `chosen`."""
        return [float(sum(ch in answer for ch in completion)) for completion, answer in zip(completions, chosen)]

    # A reward function (with the rows' columns) scores both sets of completions.
    metrics = evaluate(tiny_model, tiny_tokenizer, reference=reference, prompts=rows, reward_model=chosen_overlap,
                       max_new_tokens=6, batch_size=2)
    policy_scores = torch.tensor(chosen_overlap(prompts, policy_texts, rows["chosen"]))
    reference_scores = torch.tensor(chosen_overlap(prompts, reference_texts, rows["chosen"]))
    wins = ((policy_scores > reference_scores).float() + 0.5 * (policy_scores == reference_scores).float()).mean()
    lengths = generate_completions(tiny_model, tiny_tokenizer, prompts, sampling).lengths.float().mean()
    assert metrics == pytest.approx({"completion_length": lengths.item(), "reward_score": policy_scores.mean().item(),
                                     "win_rate": wins.item()})
    assert 0 < metrics["win_rate"] < 1

    # A judge decides the win rate (the reward model still gives reward_score); JudgeReward prefers the completion
    # it scores higher, the first of two equal ones.
    judge = JudgeReward(AutoModelForCausalLM.from_pretrained(tiny_model_path), tiny_tokenizer, "Be helpful.")
    policy_judged = judge.scores(prompts, policy_texts)
    reference_judged = judge.scores(prompts, reference_texts)
    expected = (((policy_judged >= reference_judged).float() + (policy_judged > reference_judged).float()) / 2).mean()
    metrics = evaluate(tiny_model, tiny_tokenizer, reference=reference, prompts=prompts, judge=judge,
                       reward_model=_text_length_reward, max_new_tokens=6)
    assert metrics["win_rate"] == pytest.approx(expected.item())
    assert metrics["reward_score"] == pytest.approx(sum(map(len, policy_texts)) / len(prompts))

    # A reward model (loaded from its path) against an identical reference: the same greedy completions, all ties.
    scorer = RewardScorer(tiny_seqcls_path)
    metrics = evaluate(tiny_model, tiny_tokenizer, reference=copy.deepcopy(tiny_model), prompts=prompts,
                       reward_model=scorer, max_new_tokens=6)
    expected_score = scorer.score(prompts, policy_texts, [[0]] * len(prompts)).mean().item()
    assert metrics["win_rate"] == 0.5
    assert metrics["reward_score"] == pytest.approx(expected_score, abs=1e-5)


def test_evaluate_computes_only_what_its_inputs_allow(tiny_model, tiny_tokenizer, preference_data):
    rows = preference_data("preference", 2, split="test")
    short = dict(max_new_tokens=2)
    assert evaluate(tiny_model, tiny_tokenizer) == {}
    assert set(evaluate(tiny_model, tiny_tokenizer, pairs=rows)) == {"preference_accuracy", "reward_margin"}
    assert set(evaluate(tiny_model, tiny_tokenizer, prompts=rows["prompt"], **short)) == {"completion_length"}
    no_reference = evaluate(tiny_model, tiny_tokenizer, prompts=rows["prompt"], reward_model=_text_length_reward,
                            **short)
    assert set(no_reference) == {"completion_length", "reward_score"}  # no win rate without a reference
    everything = evaluate(tiny_model, tiny_tokenizer, reference=_perturbed(tiny_model), pairs=rows,
                          prompts=rows["prompt"], texts=rows["chosen"], reward_model=_text_length_reward, **short)
    assert set(everything) == set(METRICS)


def test_sampling_is_reproducible_from_its_seed(tiny_model, tiny_tokenizer, preference_data):
    prompts = preference_data("preference", 4, split="test")["prompt"]

    def character_codes(completions, **kwargs):
        return [float(sum(map(ord, completion))) for completion in completions]

    def score(**options):
        return evaluate(tiny_model, tiny_tokenizer, prompts=prompts, reward_model=character_codes, max_new_tokens=8,
                        **options)["reward_score"]

    assert score() == score()  # greedy by default
    sampled = score(temperature=1.0, seed=3)
    assert sampled == score(temperature=1.0, seed=3)
    assert sampled != score(temperature=1.0, seed=4)
    assert sampled != score()


# ------------------------------------------------------------------------------------------------------ callback


def test_callback_logs_every_n_steps_and_sees_dpo_learn_the_pairs(tiny_model_path, tiny_tokenizer, preference_data,
                                                                  tmp_path):
    train = preference_data("preference", 16)
    args = DPOConfig(output_dir=str(tmp_path / "out"), learning_rate=5e-4, max_steps=6, per_device_train_batch_size=8,
                     lr_scheduler_type="constant", logging_steps=3, report_to="none", save_strategy="no", seed=0)
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args, train_dataset=train,
                         processing_class=tiny_tokenizer)
    prompts = train["prompt"][:4]
    callback = EvaluationCallback(trainer, 3, pairs=train, prompts=prompts, reward_model=_text_length_reward,
                                  beta=args.beta, max_new_tokens=4)
    trainer.add_callback(callback)
    trainer.train()

    evaluations = [entry for entry in trainer.state.log_history if "eval_preference_accuracy" in entry]
    assert [entry["step"] for entry in evaluations] == [0, 3, 6]
    assert set(evaluations[0]) == {f"eval_{name}" for name in METRICS if name != "perplexity"} | {"step", "epoch"}
    start, middle, end = evaluations
    # At step 0 the policy is its reference: zero margins, and the same greedy completions (every prompt a tie).
    assert start["eval_reward_margin"] == pytest.approx(0.0, abs=1e-6) and start["eval_preference_accuracy"] == 0.0
    assert start["eval_win_rate"] == 0.5
    # DPO learns the training pairs: the margin grows and the chosen answers win.
    assert 0 < middle["eval_reward_margin"] < end["eval_reward_margin"]
    assert end["eval_preference_accuracy"] >= 0.9
    # The trainer's own logs keep their training metrics.
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [3, 6]
    assert all("rewards/accuracies" in entry and not any(key.startswith("eval_") for key in entry)
               for entry in train_logs)
    # The last entry is `evaluate` on the trained model against the trainer's reference.
    final = evaluate(trainer.model, tiny_tokenizer, reference=trainer.ref_model, pairs=train, prompts=prompts,
                     reward_model=_text_length_reward, beta=args.beta, max_new_tokens=4)
    assert {f"eval_{name}": value for name, value in final.items()} == pytest.approx(
        {key: value for key, value in end.items() if key.startswith("eval_")}, abs=1e-5)
