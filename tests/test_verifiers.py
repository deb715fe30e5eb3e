"""Verifier rewards (math, exact match, regex, sandboxed code) and the RLAIF judge."""

from __future__ import annotations

import time
import uuid

import pytest
import torch
from trl.rewards import accuracy_reward as trl_accuracy_reward
from trl.rewards import think_format_reward as trl_think_format_reward

from hf_align.rewards import RewardScorer
from hf_align.verifiers import (
    JudgeReward,
    accuracy_reward,
    code_reward,
    exact_match_reward,
    extract_code,
    extract_final_answer,
    math_answer_reward,
    regex_reward,
    think_answer_format_reward,
    think_format_reward,
)


def messages(*texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


# ------------------------------------------------------------------------------------------------------------- math


def test_accuracy_reward_matches_trl():
    completions = messages(r"So \boxed{\frac{1}{3}}", r"\boxed{\frac{1}{2}}", "The final answer is $12$", "12",
                           r"\boxed{3}")
    solution = [r"\frac{1}{3}", r"\frac{1}{3}", "12", "12", "no answer here"]
    ours = accuracy_reward(completions=completions, solution=solution)
    assert ours == trl_accuracy_reward(completions, solution)
    assert ours == [1.0, 0.0, 1.0, 0.0, None]  # a plain "12" is not LaTeX; an unreadable gold answer is skipped
    assert accuracy_reward.__name__ == "accuracy_reward"


def test_math_answer_reward_reads_the_configured_column():
    reward = math_answer_reward("answer")
    assert reward(completions=[r"\boxed{17}", r"\boxed{18}"], answer=["17", "17"]) == [1.0, 0.0]
    with pytest.raises(KeyError, match="reads the dataset column 'answer'.*\\['solution'\\]"):
        reward(completions=[r"\boxed{17}"], solution=["17"], trainer_state=None)


# ------------------------------------------------------------------------------------------------------ exact match


def test_extract_final_answer():
    assert extract_final_answer("so 3 + 4 = 7\n#### 7") == " 7"
    assert extract_final_answer("Reasoning.\nAnswer: Paris\nBye") == " Paris"
    assert extract_final_answer("I think it is 12, no, 13 apples") == "13"
    assert extract_final_answer("Paris") == "Paris"


def test_exact_match_reward():
    reward = exact_match_reward()
    completions = ["Thinking... #### 1,000", "The answer:  PARIS.", "it is 41", "12", "anything"]
    answers = ["Natalia sold 48/2 = 24 clips.\n#### 1000", "paris", "42", "12.0", None]
    assert reward(completions=completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, None]
    whole = exact_match_reward("target", extract_answer=False, name="whole_text_match")
    assert whole(completions=messages("  Paris ", "The answer is Paris"), target=["paris", "paris"]) == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------------------ regex


def test_think_format_matches_trl():
    texts = ["<think>\nreason\n</think>\nanswer", "<think>a<think>b</think>", "x<think>a</think>", "<think>a",
             "<think>a</think>\n<think>b</think>"]
    assert think_format_reward(completions=messages(*texts)) == trl_think_format_reward(messages(*texts))
    assert think_format_reward(completions=texts) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_think_answer_format_and_regex_reward():
    texts = ["<think>r</think>\n<answer>42</answer>\n", "<think>r</think><answer>4</answer> extra",
             "<answer>42</answer>", "<think>r</think><answer>1</answer><answer>2</answer>"]
    assert think_answer_format_reward(completions=texts) == [1.0, 0.0, 0.0, 0.0]
    shout = regex_reward(r"(?i)[a-z ]+!", name="exclamation")
    assert shout(completions=["Hello World!", "hello.", "Multi\nline!"]) == [1.0, 0.0, 0.0]
    assert shout.__name__ == "exclamation"
    with pytest.raises(ValueError, match="invalid pattern"):
        regex_reward("(unclosed")


# ------------------------------------------------------------------------------------------------------------- code

TIMEOUT_S = 1.5
MARGIN_S = 2.0  # interpreter start and clean-up on a shared 2-core machine
DOUBLE = "```python\ndef double(x):\n    return 2 * x\n```"
TESTS = ["assert double(2) == 4", "assert double(-1) == -2", "assert double(0) == 0"]


@pytest.fixture(scope="module")
def code():
    return code_reward(timeout_s=TIMEOUT_S, memory_mb=256)


def test_extract_code():
    assert extract_code("Here:\n```py\nx = 1\n```\nthen\n```python\nx = 2\n```") == "x = 2\n"
    assert extract_code("x = 3") == "x = 3"


def test_code_reward_scores_correct_wrong_and_partial(code):
    completions = messages(DOUBLE, "def double(x):\n    return x + 2", "def double(x):\n    return x * x * 2 // 2",
                           "syntax error(", DOUBLE)
    tests = [TESTS, TESTS, TESTS, TESTS, None]
    rewards = code(completions=completions, tests=tests)
    # x + 2 passes only double(2) == 4; x*x*2//2 = x*x passes double(2) and double(0).
    assert rewards == [1.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 0.0, None]


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "huge allocation": "x = bytearray(10**11)",
    "growing list": "x = []\nwhile True:\n    x.append([0] * 10**6)",
    "socket": 'import socket\nsocket.create_connection(("1.1.1.1", 80))',
    "urllib": 'import urllib.request\nurllib.request.urlopen("http://example.com", timeout=5)',
    "subprocess": 'import subprocess\nsubprocess.run(["true"])',
    "signal": "import os\nos.kill(os.getpid(), 0)",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_code_scores_zero_within_the_limit(code, kind):
    logged = {}
    start = time.monotonic()
    rewards = code(completions=[HOSTILE[kind]], tests=[["assert True"]], log_extra=logged.__setitem__)
    assert rewards == [0.0]
    assert time.monotonic() - start < TIMEOUT_S + MARGIN_S
    # Only the loop needs the wall-time limit: the memory limit or the audit hook stops every other one at once.
    assert (logged["code_reward_outcome"] == ["timeout"]) == (kind == "infinite loop")


def test_writes_outside_the_sandbox_are_refused(code, tmp_path):
    outside = tmp_path / f"escape-{uuid.uuid4().hex}"
    inside = "open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read() == 'ok'"
    rewards = code(completions=[f"open({str(outside)!r}, 'w').write('x')", inside], tests=["assert True"] * 2)
    assert rewards == [0.0, 1.0]
    assert not outside.exists()


def test_samples_after_bad_ones_still_score(code):
    completions = [HOSTILE["infinite loop"], DOUBLE, HOSTILE["fork bomb"], DOUBLE, HOSTILE["huge allocation"], DOUBLE]
    logged = {}
    start = time.monotonic()
    rewards = code(completions=completions, tests=[TESTS] * 6, log_extra=logged.__setitem__)
    assert rewards == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert time.monotonic() - start < TIMEOUT_S + MARGIN_S
    assert logged["code_reward_outcome"][:2] == ["timeout", "passed 3/3"]


def test_the_sandbox_runner_is_a_module_that_runs_only_as_a_script(tmp_path):
    """`hf_align/sandbox_runner.py` ships in the package; importing it (no case file here) does nothing."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import hf_align.sandbox_runner"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "" and list(tmp_path.iterdir()) == []


def test_bad_test_column_is_named(code):
    with pytest.raises(TypeError, match="column 'tests' of sample 0 must be a string or a list of strings"):
        code(completions=[DOUBLE], tests=[[1, 2]])


# ------------------------------------------------------------------------------------------------------------ judge

PRINCIPLES = ["Be honest.", "Be polite."]


@pytest.fixture
def judge(tiny_model, tiny_tokenizer):
    return JudgeReward(tiny_model, tiny_tokenizer, PRINCIPLES, batch_size=2)


def _manual_judge_score(judge, prompt, completion):
    """Full logits of one unpadded query: P(Yes) / (P(Yes) + P(No)) at the last position."""
    ids = torch.tensor([judge.query_ids(prompt, completion)])
    with torch.no_grad():
        probs = judge.model(input_ids=ids).logits[0, -1].softmax(-1)
    yes, no = probs[judge.answer_ids].tolist()
    return yes / (yes + no)


def test_judge_scores_are_probabilities_matching_a_manual_forward(judge):
    prompts = ["Question: What is 2 + 2?\nAnswer:"] * 3
    completions = [" 4", " Go away, it is obviously 4 you fool.", " 5"]
    scores = judge(prompts=prompts, completions=completions, completion_ids=[[0]] * 3)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) == 3  # the score depends on the completion
    assert scores == judge(prompts=prompts, completions=completions)  # deterministic
    expected = [_manual_judge_score(judge, p, c) for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(expected, abs=1e-5)  # batched and padded = one by one


def test_judge_scores_a_model_that_scales_its_logits_by_its_own_logits(tiny_tokenizer):
    """Granite divides its logits by `logits_scaling` after the LM head: the judge's probabilities are the model's."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=0.25,
                           pad_token_id=tiny_tokenizer.pad_token_id)
    judge = JudgeReward(GraniteForCausalLM(config).eval(), tiny_tokenizer, PRINCIPLES, batch_size=2)
    prompts, completions = ["Question: What is 2 + 2?\nAnswer:"] * 3, [" 4", " four, surely", " 5"]
    expected = [_manual_judge_score(judge, p, c) for p, c in zip(prompts, completions)]
    assert judge(prompts=prompts, completions=completions) == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 1e-3  # scaled logits: the scores move


def test_judge_reads_principles_and_conversations(judge, tiny_model, tiny_tokenizer):
    prompt = [{"role": "user", "content": "Say hi."}]
    query = tiny_tokenizer.decode(judge.query_ids(prompt, [{"role": "assistant", "content": "Hi!"}]))
    assert "1. Be honest.\n2. Be polite." in query and "User: Say hi." in query and "Response:\nHi!" in query
    assert query.endswith("<|im_start|>assistant\n")  # the judge's chat template, answer turn opened
    other = JudgeReward(tiny_model, tiny_tokenizer, "Answer in French.")
    completion = messages("Hi!")
    assert judge([prompt], completion) != other([prompt], completion)


def test_judge_rank_agrees_with_scores(judge):
    prompts = ["Question: What is 2 + 2?\nAnswer:", "Hi", "Tell me a joke."]
    a = [" 4", " Hello!", " No."]
    b = [" 5", " Hey there, friend.", " Why did the chicken cross the road?"]
    scores_a, scores_b = judge(prompts, a), judge(prompts, b)
    assert judge.rank(prompts, a, b) == [0 if x >= y else 1 for x, y in zip(scores_a, scores_b)]
    assert judge.rank(prompts, b, a) == [0 if y >= x else 1 for x, y in zip(scores_a, scores_b)]


def test_judge_from_a_path_is_a_reward_function(tiny_model_path, judge):
    by_path = JudgeReward(tiny_model_path, None, PRINCIPLES)
    prompts, completions = ["Hi"], [" Hello!"]
    assert by_path(prompts, completions) == pytest.approx(judge(prompts, completions), abs=1e-6)
    per_func = RewardScorer(by_path).score(prompts, completions, [[0]], {})
    assert per_func.tolist() == [pytest.approx(judge(prompts, completions), abs=1e-6)]
    with pytest.raises(ValueError, match="at least one principle"):
        JudgeReward(tiny_model_path, None, [])
