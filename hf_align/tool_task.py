"""The embedded tool-calling task: two-digit multiplication ("What is 37 * 46?") that the tiny model cannot compute,
but can answer by calling a `calculator` tool and copying its result.

- `task_tokenizer(path)`: the tiny model's tokenizer with a tool-capable ChatML template (`TOOL_CHAT_TEMPLATE`:
  the tools listed in a system turn, Hermes/Qwen-style `<tool_call>{json}</tool_call>` calls, `tool` turns) and
  the response template that parses those calls (TRL's Qwen one). The model and its cached tokenizer are unchanged.
- `calculator(expression)`: the tool. `load_prompts(split)`: "train" / "test" prompts (message lists) with their
  `answer`, generated deterministically, never overlapping. `answer_reward`: 1.0 when the final assistant turn's
  answer is right.
- `sft_dataset()`: warm-start conversations: half of the questions offered the tool answer through it, the others
  (and those asked without the tool) answer directly. `warm_start(output_dir)` fine-tunes the tiny model on them.
- `accuracy(model, tokenizer, split)`: the mean `answer_reward` of sampled episodes, with or without the tool.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import random

from transformers.utils import get_json_schema
from trl.chat_template_utils import qwen3_template

from . import defaults
from .generation import SamplingConfig
from .tools import sample_episodes
from .verifiers import exact_match_reward

__all__ = ["TOOL_CHAT_TEMPLATE", "accuracy", "answer_reward", "calculator", "load_prompts", "sft_dataset",
           "task_tokenizer", "warm_start"]

# ChatML with tools: a system turn lists each tool as `name(parameters)` (short: the tiny model reads it), an
# assistant turn renders its tool calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and results come
# back as `tool` turns. The `{% generation %}` markers cover the assistant's tokens (`assistant_only_loss`).
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n' }}{%- endif %}"
    "{{- 'Tools:' }}"
    "{%- for tool in tools %}"
    "{%- set function = tool['function'] if tool['function'] is defined else tool %}"
    "{{- ' ' + function['name'] + '(' + (function['parameters']['properties'] | list | join(', ')) + ')' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools and loop.first %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] or '' }}"
    "{%- for tool_call in message['tool_calls'] or [] %}"
    "{%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{{- '<tool_call>{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{{- call['arguments'] if call['arguments'] is string else call['arguments'] | tojson }}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
) + defaults.CHAT_TEMPLATE[defaults.CHAT_TEMPLATE.index("{%- else %}"):]  # other turns as in the default ChatML

SEED = 4321
N_TRAIN = 400
N_TEST = 50
N_SFT = 2000  # warm-start conversations: the training questions and further ones, never a test question
TOOL_USE_FRACTION = 0.5  # of the warm-start questions offered the tool, those answered through it
NO_TOOL_FRACTION = 0.25  # of the warm-start questions, those asked without the tool


def task_tokenizer(path: str | None = None):
    """The tokenizer of the tiny model at `path` (default: the embedded one) with `TOOL_CHAT_TEMPLATE` and the
    response template that parses its tool calls."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path or defaults.default_model_path())
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.response_template = qwen3_template
    return tokenizer


# ------------------------------------------------------------------------------------------------------------ tool

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_MAX_EXPONENT = 100  # bounds `**`, the one operator whose result can outgrow memory


def _evaluate(node: ast.AST) -> int | float:
    """The value of an arithmetic expression tree: numbers, + - * / // % ** and signs; anything else raises."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {_MAX_EXPONENT})")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError(f"unsupported expression: {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression and returns the equation with its value, e.g. "37 * 46 = 1702".

    Args:
        expression: The expression to evaluate, e.g. "37 * 46" (numbers, + - * / // % ** and parentheses).
    """
    expression = expression.strip()
    value = _evaluate(ast.parse(expression, mode="eval").body)
    return f"{expression} = {int(value) if float(value).is_integer() else f'{value:.6g}'}"


# ------------------------------------------------------------------------------------------------------------ data


def _questions() -> list[tuple[int, int]]:
    """Distinct operand pairs (10-99) in a seeded order: the test questions (`N_TEST`), then the training ones
    (`N_TRAIN`), then the warm start's further ones (up to `N_SFT` with the training ones)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    return random.Random(SEED).sample(pairs, N_TEST + max(N_TRAIN, N_SFT))


def _prompt(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} * {b}?"}]


def load_prompts(split: str = "train"):
    """The task's prompts (`prompt`: one user message, `answer`: the product as a string) of `split`, a `Dataset`."""
    from datasets import Dataset

    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}; valid splits: train, test.")
    pairs = _questions()
    pairs = pairs[N_TEST : N_TEST + N_TRAIN] if split == "train" else pairs[:N_TEST]
    return Dataset.from_list([{"prompt": _prompt(a, b), "answer": str(a * b)} for a, b in pairs])


def _final_answer(a: int, b: int) -> dict:
    """The equation with its value, as the calculator returns it: after a tool call the model repeats the tool's
    result token for token (copying what followed the same tokens before, which the tiny model learns)."""
    return {"role": "assistant", "content": f"{a} * {b} = {a * b}"}


def sft_dataset():
    """`N_SFT` warm-start conversations (`messages`, `tools` as JSON or None), none on a test question: a
    `NO_TOOL_FRACTION` asked without the tool answer directly; of the others, a `TOOL_USE_FRACTION` call the
    calculator and copy its result, the rest answer directly (right answers the model cannot compute: it guesses)."""
    from datasets import Dataset

    rng = random.Random(SEED + 1)
    schema = json.dumps([get_json_schema(calculator)])
    rows = []
    for a, b in _questions()[N_TEST : N_TEST + N_SFT]:
        if rng.random() < NO_TOOL_FRACTION:
            rows.append({"messages": _prompt(a, b) + [_final_answer(a, b)], "tools": None})
            continue
        turns = [_final_answer(a, b)]
        if rng.random() < TOOL_USE_FRACTION:
            call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}}
            turns = [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "name": "calculator", "content": calculator(f"{a} * {b}")}] + turns
        rows.append({"messages": _prompt(a, b) + turns, "tools": schema})
    return Dataset.from_list(rows)


def _final_assistant_turn(completion: list[dict]) -> list[dict]:
    """The last assistant message of a trajectory (none when the model never answered): a tool result the episode
    ends with is not the model's answer."""
    turns = [message for message in completion if message.get("role") == "assistant"]
    return turns[-1:] or [{"role": "assistant", "content": ""}]


_EXACT_ANSWER = exact_match_reward("answer")


def answer_reward(completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the final assistant turn's answer (`verifiers.extract_final_answer`) equals `answer`, else 0.0."""
    return _EXACT_ANSWER([_final_assistant_turn(c) for c in completions], answer=answer)


# ------------------------------------------------------------------------------------------------------ warm start


def warm_start(output_dir: str, **config) -> str:
    """The embedded tiny model fine-tuned on `sft_dataset()` (assistant tokens only), saved with the task's tokenizer
    to `output_dir` once and reused. `config`: `SFTConfig` fields over the defaults here. Returns `output_dir`."""
    from .trainers.sft import SFTConfig, SFTTrainer

    if os.path.isfile(os.path.join(output_dir, "model.safetensors")):
        return output_dir
    settings = dict(learning_rate=3e-3, num_train_epochs=20, lr_scheduler_type="constant",
                    per_device_train_batch_size=16, assistant_only_loss=True, logging_steps=50, save_strategy="no",
                    report_to="none", seed=0)
    args = SFTConfig(output_dir=output_dir, **{**settings, **config})
    trainer = SFTTrainer(defaults.DEFAULT_MODEL_NAME, args=args, train_dataset=sft_dataset(),
                         processing_class=task_tokenizer())
    trainer.train()
    trainer.save_model(output_dir)
    trainer.processing_class.save_pretrained(output_dir)
    return output_dir


def accuracy(model, tokenizer, split: str = "test", *, use_tools: bool = True, samples_per_prompt: int = 4,
             temperature: float = 1.0, max_completion_length: int = 128, seed: int = 0) -> float:
    """The mean `answer_reward` of `samples_per_prompt` episodes per prompt of `split` (`sample_episodes`, one tool
    round), reproducibly from `seed`; `use_tools=False` offers no tool (the prompt lists none)."""
    dataset = load_prompts(split)
    prompts = [prompt for prompt in dataset["prompt"] for _ in range(samples_per_prompt)]
    answers = [answer for answer in dataset["answer"] for _ in range(samples_per_prompt)]
    sampling = SamplingConfig(max_new_tokens=max_completion_length, temperature=temperature, batch_size=256,
                              seed=seed)
    episodes = sample_episodes(model, tokenizer, prompts, sampling, tools=[calculator] if use_tools else [],
                               max_iterations=1, max_completion_length=max_completion_length)
    scores = answer_reward(episodes.completions, answers)
    return sum(scores) / len(scores)
