"""hf_align.tools: parsing and running tool calls, the tool mask against the chat template's own rendering, TRL's
limits (max_iterations, max_completion_length with its rollback and cut), environments, rollout_func checks, the
python tool; and the embedded tool task's pieces (template, calculator, reward, warm-start data)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer
from trl.chat_template_utils import is_chat_template_prefix_preserving, supports_tool_calling
from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPOTrainer

from hf_align import tool_task
from hf_align.generation import SamplingConfig, encode_prompts, generate_completions, generate_continuations
from hf_align.tools import (
    EnvironmentPool,
    call_tool,
    episodes_from_rollout,
    python,
    run_episodes,
    sample_episodes,
    tool_suffix_ids,
    tool_tokenizer,
)

PROMPT = [{"role": "user", "content": "What is 37 * 46?"}]
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "37 * 46"}}</tool_call><|im_end|>'
ANSWER = "The answer is 1702.<|im_end|>"


@pytest.fixture
def tokenizer(tiny_model_path):
    return tool_tokenizer(tool_task.task_tokenizer(tiny_model_path))


@pytest.fixture
def stop_ids(tokenizer):
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def scripted(tokenizer, *turns: str):
    """A sampler whose k-th call continues every prefix with the tokens of `turns[k]` (cut to `max_new_tokens`, as
    `generate_continuations` cuts), recording the prefixes it was given."""
    remaining = iter(turns)

    def sample(prefixes, max_new_tokens):
        sample.prefixes.append([list(p) for p in prefixes])
        ids = tokenizer(next(remaining))["input_ids"]
        return [ids[:max_new_tokens] for _ in prefixes]

    sample.prefixes = []
    return sample


def run(tokenizer, stop_ids, sample, tools=(tool_task.calculator,), prompts=(PROMPT,), **limits):
    row_tools = [list(tools) for _ in prompts]
    prompt_ids = [encode_prompts(tokenizer, [p], {"tools": list(tools) or None})[0] for p in prompts]
    settings = {"max_iterations": 5, "max_completion_length": 256, **limits}
    return run_episodes(sample, tokenizer, prompt_ids, row_tools, stop_ids=stop_ids, **settings)


# ------------------------------------------------------------------------------------------------ chat template


def test_task_template_passes_trls_tool_checks(tokenizer, tiny_tokenizer):
    assert supports_tool_calling(tokenizer) and is_chat_template_prefix_preserving(tokenizer)
    with pytest.raises(ValueError, match="renders a full tool-calling conversation"):
        tool_tokenizer(tiny_tokenizer)  # the default ChatML template drops tool calls
    bare = tool_task.task_tokenizer(tokenizer.name_or_path)
    bare.response_template = None
    with pytest.raises(ValueError, match="response_template"):
        tool_tokenizer(bare)  # TRL's add_response_schema does not know this template


def test_parse_tool_call(tokenizer):
    prefix = encode_prompts(tokenizer, [PROMPT], {"tools": [tool_task.calculator]})[0]
    turn = tokenizer(CALL)["input_ids"]
    from hf_align.tools import _parse_turn

    parsed = _parse_turn(tokenizer, turn, prefix, [tool_task.calculator])
    assert parsed["tool_calls"] == [{"type": "function", "function": {"name": "calculator",
                                                                      "arguments": {"expression": "37 * 46"}}}]
    # The template renders the parsed turn back to the same tokens.
    rendered = tokenizer.apply_chat_template(PROMPT + [parsed], tools=[tool_task.calculator], tokenize=True,
                                             return_dict=False)
    assert rendered[len(prefix):len(prefix) + len(turn)] == turn
    assert _parse_turn(tokenizer, tokenizer(ANSWER)["input_ids"], prefix, [])["content"] == "The answer is 1702."
    # A malformed call is plain text (TRL's fallback), not a crash.
    assert "tool_calls" not in _parse_turn(tokenizer, tokenizer('<tool_call>{"na')["input_ids"], prefix, [])


@pytest.mark.parametrize("eos", [None, "<|im_end|>"])
def test_tool_suffix_ids_match_trl(tokenizer, stop_ids, eos):
    """TRL's `_get_tool_suffix_ids` cuts the rendered turn after the eos token: with `<|im_end|>` as eos both agree;
    with the tiny model's own eos (`<|endoftext|>`, never in a turn) the stop tokens still align hf_align's."""
    messages = [{"role": "tool", "name": "calculator", "content": "1702"},
                {"role": "tool", "name": "calculator", "content": "3"}]
    trl_tokenizer = tool_task.task_tokenizer(tokenizer.name_or_path)
    if eos:
        trl_tokenizer.eos_token = eos
    trainer = SimpleNamespace(processing_class=trl_tokenizer, _tokenizer=trl_tokenizer, chat_template=None,
                              chat_template_kwargs={}, _is_vlm=False)
    trl_suffix = TRLGRPOTrainer._get_tool_suffix_ids(trainer, messages)
    ours = tool_suffix_ids(tokenizer, messages, stop_ids)
    assert tokenizer.decode(ours) == "\n<|im_start|>tool\n1702<|im_end|>\n<|im_start|>tool\n3<|im_end|>\n" \
                                     "<|im_start|>assistant\n"
    assert (ours == trl_suffix) == (eos is not None)


# ---------------------------------------------------------------------------------------------------- tool calls


def test_call_tool_results_and_failures():
    def fails():
        raise RuntimeError("broken")

    def exits():
        raise SystemExit(3)

    def slow():
        time.sleep(5)

    async def doubled(x: int):
        await asyncio.sleep(0)
        return 2 * x

    tools = {f.__name__: f for f in (tool_task.calculator, fails, exits, slow, doubled)}

    def call(name, arguments=None, kind="function"):
        return call_tool(tools, {"type": kind, "function": {"name": name, "arguments": arguments or {}}}, 0.2)

    assert call("calculator", {"expression": "6 * 7"}) == ({"role": "tool", "name": "calculator",
                                                            "content": "6 * 7 = 42"}, False)
    assert call("doubled", {"x": 4})[0]["content"] == "8"
    assert call("fails") == ({"role": "tool", "name": "fails", "content": "{'error': 'broken'}"}, True)
    assert call("exits")[0]["content"] == "{'error': 'the tool raised SystemExit'}"
    assert call("missing")[0]["content"] == "{'error': 'Tool missing not found.'}"
    assert call("calculator", {"expression": "import os"})[1]
    assert call("calculator", {"wrong": "1"})[1]
    started = time.monotonic()
    message, failed = call("slow")
    assert failed and "did not return within 0.2 s" in message["content"] and time.monotonic() - started < 2
    assert call_tool(tools, {"type": "code", "name": "x"}) == (
        {"role": "tool", "name": "x", "content": "{'error': 'Unsupported tool call type: code'}"}, True)


def test_tool_mask_is_zero_exactly_on_tool_tokens(tokenizer, stop_ids):
    """The episode's tokens are the whole conversation as the chat template renders it, and the tool mask is the
    template's assistant mask (its `{% generation %}` markers) over the completion: 1 on the model's turns."""
    episodes = run(tokenizer, stop_ids, scripted(tokenizer, CALL, ANSWER))
    messages = episodes.completions[0]
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    assert messages[1] == {"role": "tool", "name": "calculator", "content": "37 * 46 = 1702"}
    assert messages[2]["content"] == "The answer is 1702."
    rendered = tokenizer.apply_chat_template(PROMPT + messages, tools=[tool_task.calculator], tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)
    ids, assistant = rendered["input_ids"][:-1], rendered["assistant_masks"][:-1]  # the template's final "\n"
    prompt_length = len(episodes.prompt_ids[0])
    assert episodes.prompt_ids[0] + episodes.completion_ids[0] == ids
    assert episodes.tool_mask[0] == assistant[prompt_length:]
    assert 0 in episodes.tool_mask[0] and episodes.is_truncated == [False]
    assert (episodes.tool_calls, episodes.tool_failures) == (1, 0)


def test_max_iterations(tokenizer, stop_ids):
    for iterations in (0, 1, 2):
        episodes = run(tokenizer, stop_ids, scripted(tokenizer, CALL, CALL, CALL), max_iterations=iterations)
        roles = [m["role"] for m in episodes.completions[0]]
        assert roles == ["assistant"] + ["tool", "assistant"] * iterations
        assert episodes.tool_calls == iterations
        assert episodes.completions[0][-1]["tool_calls"]  # the last call is left unanswered


def test_max_completion_length_rolls_back_and_cuts(tokenizer, stop_ids):
    call_length = len(tokenizer(CALL)["input_ids"])
    result = {"role": "tool", "name": "calculator", "content": tool_task.calculator("37 * 46")}
    suffix_length = len(tool_suffix_ids(tokenizer, [result], stop_ids))
    # The result does not fit: rolled back, the episode ends at its (executed, counted) call.
    episodes = run(tokenizer, stop_ids, scripted(tokenizer, CALL, ANSWER),
                   max_completion_length=call_length + suffix_length - 1)
    assert episodes.completion_ids[0] == tokenizer(CALL)["input_ids"] and len(episodes.completions[0]) == 1
    assert episodes.tool_calls == 1 and episodes.is_truncated == [False]
    # The result fits, the answer is cut to the budget left: truncated.
    budget = call_length + suffix_length + 3
    sample = scripted(tokenizer, CALL, ANSWER)
    episodes = run(tokenizer, stop_ids, sample, max_completion_length=budget)
    assert len(episodes.completion_ids[0]) == len(episodes.tool_mask[0]) == budget
    assert episodes.tool_mask[0][-3:] == [1, 1, 1] and episodes.is_truncated == [True]
    assert episodes.completions[0][-1]["content"] == tokenizer.decode(tokenizer(ANSWER)["input_ids"][:3])
    # The result fills the budget exactly: nothing is sampled after it, no empty turn added.
    episodes = run(tokenizer, stop_ids, scripted(tokenizer, CALL), max_completion_length=call_length + suffix_length)
    assert [m["role"] for m in episodes.completions[0]] == ["assistant", "tool"]
    assert episodes.tool_mask[0].count(0) == suffix_length and episodes.is_truncated == [True]


def test_sample_episodes_with_the_tiny_model(tiny_model, tokenizer):
    """Sampled episodes respect the limits, render prompts with the tools, and reproduce from a seed."""
    prompts = [PROMPT, [{"role": "user", "content": "What is 2 * 3?"}]]
    sampling = SamplingConfig(max_new_tokens=8, seed=0)
    first = sample_episodes(tiny_model, tokenizer, prompts, sampling, tools=[tool_task.calculator],
                            max_iterations=2, max_completion_length=12)
    again = sample_episodes(tiny_model, tokenizer, prompts, sampling, tools=[tool_task.calculator],
                            max_iterations=2, max_completion_length=12)
    assert first == again
    assert first.prompt_ids[0] == encode_prompts(tokenizer, [PROMPT], {"tools": [tool_task.calculator]})[0]
    for ids, mask in zip(first.completion_ids, first.tool_mask):
        assert 1 <= len(ids) <= 12 and len(mask) == len(ids)
    with pytest.raises(ValueError, match="num_generations=1"):
        sample_episodes(tiny_model, tokenizer, prompts, SamplingConfig(num_generations=2), tools=[],
                        max_iterations=1, max_completion_length=8)
    with pytest.raises(ValueError, match="conversational"):
        sample_episodes(tiny_model, tokenizer, ["What?"], sampling, tools=[], max_iterations=1,
                        max_completion_length=8)


def test_generate_continuations_is_generate_completions_on_ids(tiny_model, tiny_tokenizer):
    prompts = ["Question: Hi?\nAnswer:", "Question: How do I bake bread?\nAnswer:"]
    sampling = SamplingConfig(max_new_tokens=6, seed=3)
    completions = generate_completions(tiny_model, tiny_tokenizer, prompts, sampling)
    continuations = generate_continuations(tiny_model, tiny_tokenizer, completions.prompt_ids, sampling)
    for row, ids in enumerate(continuations):
        assert ids == completions.completion_ids[row][completions.completion_mask[row].bool()].tolist()


# -------------------------------------------------------------------------------------------------- environments


class Counter:
    """Counts up from the row's `start`; its reward is whether it reached the row's `target`."""

    def reset(self, start: int = 0, target: int = 1, **row):
        self.value, self.target = start, target
        return f" (the counter is at {start})"

    def increment(self, step: int) -> str:
        """Adds to the counter.

        Args:
            step: How much to add.
        """
        self.value += step
        return str(self.value)

    def get_reward(self) -> float:
        return float(self.value == self.target)

    def _private(self):
        raise AssertionError("not a tool")


class Echo:
    def reset(self, **row):
        return None

    def echo(self, text: str) -> str:
        """Repeats the text.

        Args:
            text: What to repeat.
        """
        return text


def test_environment_pool_reset_tools_and_reward(tokenizer, stop_ids):
    pool = EnvironmentPool(Counter)
    rows = [{"prompt": PROMPT, "start": 1, "target": 3}, {"prompt": PROMPT, "start": 5, "target": 5}]
    environments, prompts = pool.start(rows)
    assert environments[0] is pool.instances[None][0] and len(pool.instances[None]) == 2
    assert prompts[0][-1]["content"] == "What is 37 * 46? (the counter is at 1)" and rows[0]["prompt"] == PROMPT
    assert [tool.__name__ for tool in pool.tools()] == ["increment"]
    call = '<tool_call>{"name": "increment", "arguments": {"step": 2}}</tool_call><|im_end|>'
    prompt_ids = [encode_prompts(tokenizer, [p], {"tools": [e.increment]})[0] for p, e in zip(prompts, environments)]
    assert "increment(step)" in tokenizer.decode(prompt_ids[0])
    episodes = run_episodes(scripted(tokenizer, call, ANSWER), tokenizer, prompt_ids,
                            [[e.increment] for e in environments], stop_ids=stop_ids, max_iterations=1,
                            max_completion_length=256)
    assert [m[1]["content"] for m in episodes.completions] == ["3", "7"]
    (reward,) = pool.reward_functions()
    assert reward.__name__ == "Counter" and reward(environments=environments) == [1.0, 0.0]
    again, _ = pool.start(rows[:1])  # instances are reused, reset with the new row
    assert again[0] is environments[0] and again[0].value == 1


def test_environment_pool_with_several_environments():
    pool = EnvironmentPool({"count": Counter, "echo": Echo})
    environments, prompts = pool.start([{"environment": "echo", "prompt": PROMPT},
                                        {"environment": "count", "start": 2, "target": 2}])
    assert [type(e) for e in environments] == [Echo, Counter]
    assert prompts[0] == PROMPT and prompts[1] == [{"role": "user", "content": " (the counter is at 2)"}]
    assert sorted(tool.__name__ for tool in pool.tools()) == ["echo", "increment"]
    (reward,) = pool.reward_functions()
    assert reward(environments=environments) == [None, 1.0]
    with pytest.raises(ValueError, match="Row 0 has environment='dice'"):
        pool.start([{"environment": "dice"}])
    with pytest.raises(ValueError, match="must define a callable `reset`"):
        EnvironmentPool(object)


# -------------------------------------------------------------------------------------------------- rollout_func


def test_rollout_func_output_checked_and_converted(tokenizer, stop_ids):
    good = {"prompt_ids": [[1, 2], [3]], "completion_ids": [[5, 3], [6, 7, 8]], "logprobs": None,
            "env_mask": [[1, 1], [1, 0, 1]], "score": [0.5, 1.0], "task": "count"}
    episodes, extra = episodes_from_rollout(good, [PROMPT, PROMPT], tokenizer, stop_ids)
    assert episodes.tool_mask == [[1, 1], [1, 0, 1]] and episodes.is_truncated == [False, True]
    assert extra == {"score": [0.5, 1.0], "task": ["count", "count"]}
    assert episodes.completions[0][0]["role"] == "assistant"
    text_episodes, _ = episodes_from_rollout({**good, "env_mask": None}, ["a", "b"], tokenizer, stop_ids)
    assert text_episodes.tool_mask == [[1, 1], [1, 1, 1]] and isinstance(text_episodes.completions[0], str)

    def error(**changes):
        with pytest.raises(ValueError) as raised:
            episodes_from_rollout({**good, **changes}, [PROMPT, PROMPT], tokenizer, stop_ids)
        return str(raised.value)

    with pytest.raises(ValueError, match=r"must return keys \['logprobs'\]"):
        episodes_from_rollout({k: v for k, v in good.items() if k != "logprobs"}, [PROMPT, PROMPT], tokenizer,
                              stop_ids)
    assert "'completion_ids', row 1" in error(completion_ids=[[5], [6, "x"]])
    assert "'prompt_ids' must be a list with one row per prompt (2)" in error(prompt_ids=[[1]])
    assert "'logprobs', row 0: 1 values for 2" in error(logprobs=[[0.1], [0.1, 0.2, 0.3]])
    assert "'env_mask', row 1" in error(env_mask=[[1, 1], [1, 2, 1]])
    assert "extra field 'score'" in error(score=[1.0])


# ----------------------------------------------------------------------------------------------------- python tool


def test_python_tool_schema_and_sandbox():
    from transformers.utils import get_json_schema

    assert get_json_schema(python)["function"]["parameters"]["required"] == ["code"]
    assert python("print(6 * 7)") == "42\n"
    assert "ZeroDivisionError" in python("1 / 0")
    assert "not allowed" in python("import os; os.system('true')")
    from hf_align.tools import _run_python

    with pytest.raises(TimeoutError):
        _run_python("while True: pass", 1.0, 256)


# ------------------------------------------------------------------------------------------------------ the task


def test_calculator_and_answer_reward():
    assert tool_task.calculator(" 37 * 46") == "37 * 46 = 1702"
    assert tool_task.calculator("(2 + 3) ** 2 / 4") == "(2 + 3) ** 2 / 4 = 6.25"
    with pytest.raises(ValueError):
        tool_task.calculator("__import__('os')")
    with pytest.raises(ValueError):
        tool_task.calculator("9 ** 999999")
    answered = [{"role": "assistant", "content": "", "tool_calls": []},
                {"role": "tool", "name": "calculator", "content": "1702"},
                {"role": "assistant", "content": "The answer is 1702."}]
    unanswered = answered[:2]  # ends with the tool's result: the model never answered
    assert tool_task.answer_reward([answered, unanswered, answered], answer=["1702", "1702", "5"]) == [1.0, 0.0, 0.0]


def test_task_data(tokenizer):
    train, test = tool_task.load_prompts("train"), tool_task.load_prompts("test")
    assert (len(train), len(test)) == (tool_task.N_TRAIN, tool_task.N_TEST)
    assert test[0]["prompt"][0]["content"] == f"What is {test[0]['a']} * {test[0]['b']}?"
    sft = tool_task.sft_dataset()
    sft_pairs = {frozenset(map(int, re.findall(r"\d+", row["messages"][0]["content"]))) for row in sft}
    test_pairs = {frozenset((a, b)) for a, b in zip(test["a"], test["b"])}
    train_pairs = {frozenset((a, b)) for a, b in zip(train["a"], train["b"])}
    assert train_pairs <= sft_pairs and not test_pairs & (sft_pairs | train_pairs)  # b * a does not leak a * b
    for row in list(train) + list(test):
        assert row["answer"] == str(row["a"] * row["b"]) and row["a"] % 10 and row["b"] % 10
        assert len(tokenizer.tokenize(f"\n{row['answer']}")) == tool_task.PRODUCT_TOKENS + 1
    with_tool = sum(any(m["role"] == "tool" for m in row["messages"]) for row in sft)
    offered = sum(row["tools"] is not None for row in sft)
    assert 0.3 < with_tool / offered < 0.5 and 0.65 < offered / len(sft) < 0.85
    assert json.loads(sft[0]["tools"])[0]["function"]["name"] == "calculate"
    copy_stage = tool_task.sft_dataset(tool_use_fraction=1.0, no_tool_fraction=0.0)
    assert all(row["messages"][2]["role"] == "tool" for row in copy_stage)
    assert torch.get_num_threads() == 1


def test_calculator_environment_episode_renders_as_the_warm_start(tokenizer, stop_ids):
    """A sampled episode that calls `calculate` and copies its result is, token for token, the chat template's
    rendering of the warm start's conversation on that question."""
    row = tool_task.load_prompts("test")[0]
    environment = tool_task.CalculatorEnvironment()
    assert environment.reset(**row) is None and environment.calculate() == row["answer"]
    call = '<tool_call>{"name": "calculate", "arguments": {}}</tool_call><|im_end|>'
    prompt_ids = encode_prompts(tokenizer, [row["prompt"]], {"tools": [environment.calculate]})[0]
    episodes = run_episodes(scripted(tokenizer, call, row["answer"] + "<|im_end|>"), tokenizer, [prompt_ids],
                            [[environment.calculate]], stop_ids=stop_ids, max_iterations=1,
                            max_completion_length=tool_task.MAX_COMPLETION_LENGTH)
    assert episodes.tool_calls == 1 and tool_task.answer_reward(episodes.completions, [row["answer"]]) == [1.0]
    conversation = row["prompt"] + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                              "function": {"name": "calculate", "arguments": {}}}]},
        {"role": "tool", "name": "calculate", "content": row["answer"]},
        {"role": "assistant", "content": row["answer"]}]
    rendered = tokenizer.apply_chat_template(conversation, tools=[environment.calculate], tokenize=True,
                                             return_dict=False)
    assert rendered[:-1] == prompt_ids + episodes.completion_ids[0]  # the template ends the turn with a newline
    assert len(episodes.completion_ids[0]) <= tool_task.MAX_COMPLETION_LENGTH
