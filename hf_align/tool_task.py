"""The embedded tool-calling task: two-digit multiplication ("What is 37 * 46?") that the tiny model cannot compute,
but can answer by calling the `calculate` tool of its `CalculatorEnvironment` and copying the result.

The task is shaped so that the tiny model learns to use the tool in about a minute: the call takes no arguments
(one fixed token sequence, nothing copied from the question), the tool returns the bare product, the answer is the
bare product, and every product is `PRODUCT_TOKENS` tokens (so copying it is one fixed-offset rule).

- `task_tokenizer(path)`: the tiny model's tokenizer with a tool-capable ChatML template (`TOOL_CHAT_TEMPLATE`:
  the tools listed in a system turn, Hermes/Qwen-style `<tool_call>{json}</tool_call>` calls, `tool` turns) and
  the response template that parses those calls (TRL's Qwen one). The model and its cached tokenizer are unchanged.
- `CalculatorEnvironment`: the `environment_factory` of `GRPOTrainer`. `calculator(expression)`: a standalone
  calculator tool for users (`tools=[calculator]`). `load_prompts(split)`: "train" / "test" rows (`prompt`,
  `answer`, `a`, `b`), deterministic, no operand pair in both. `answer_reward`: 1.0 when the final assistant turn's
  answer is right.
- `sft_dataset(...)`, `warm_start(output_dir)`: the warm start (`WARM_START_STAGES`).
- `accuracy(model, tokenizer, split)`: held-out accuracy and call frequency of sampled episodes, with or without
  the tool.
"""

from __future__ import annotations

import ast
import functools
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

__all__ = ["TOOL_CHAT_TEMPLATE", "CalculatorEnvironment", "accuracy", "answer_reward", "calculator", "load_prompts", "sft_dataset",
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
N_TEST = 50
N_TRAIN = 400
N_SFT = 1200  # warm-start conversations: the training questions and further ones, never a test question's pair
TOOL_USE_FRACTION = 0.4  # of the warm-start questions offered the tool, those answered through it
NO_TOOL_FRACTION = 0.25  # of the warm-start questions, those asked without the tool
MAX_COMPLETION_LENGTH = 72  # the call (52 tokens), the tool's result and the answer
PRODUCT_TOKENS = 3
# Two warm-start stages (`sft_dataset` fractions, `SFTConfig` fields). Copying the tool's result is learned only when
# most answers are copies: with the guesses mixed in from the start it is not learned in minutes. So every question
# first calls the tool; then a short mixed stage at a low learning rate teaches guessing (and answering without the
# tool) and brings the call rate down while the copy survives, leaving GRPO the calls to reward.
WARM_START_STAGES = (
    (dict(tool_use_fraction=1.0, no_tool_fraction=0.0), dict(num_train_epochs=5, learning_rate=3e-3)),
    (dict(), dict(num_train_epochs=1, learning_rate=5e-4)),
)  # every product is this many tokens after a newline: copying it is one fixed-offset rule


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


# ----------------------------------------------------------------------------------------------------- environment


class CalculatorEnvironment:
    """The task's environment (TRL's `environment_factory` contract): `reset` keeps the row's two numbers, and its one
    tool, `calculate()`, returns their product. The call takes no arguments, so the model learns it as one fixed token
    sequence instead of copying the numbers from the question into JSON."""

    def reset(self, a: int, b: int, **row) -> None:
        self.a, self.b = a, b

    def calculate(self) -> str:
        """Returns the answer to the question."""
        return str(self.a * self.b)


# ------------------------------------------------------------------------------------------------------------ data


@functools.cache
def _pairs() -> tuple[tuple[int, int], ...]:
    """The task's operand pairs (a <= b) in a seeded order: two-digit numbers but the multiples of 10 (whose products
    need no tool: append a 0) whose product is `PRODUCT_TOKENS` tokens after a newline, as it is both in the tool's
    result and in the answer."""
    tokenizer = task_tokenizer()
    pairs = [(a, b) for a in range(11, 100) for b in range(a, 100) if a % 10 and b % 10
             and len(tokenizer.tokenize(f"\n{a * b}")) == PRODUCT_TOKENS + 1]
    return tuple(random.Random(SEED).sample(pairs, len(pairs)))


def _questions(split: str) -> list[tuple[int, int]]:
    """The (a, b) questions of `split`: "test" (`N_TEST`), "train" (`N_TRAIN`) or "sft" (`N_SFT`: the training ones
    and further ones). Each pair is asked in one seeded order; the test pairs are asked in no other split in either
    order, so a training question never gives a test answer away."""
    pairs = _pairs()
    chosen = {"test": pairs[:N_TEST], "train": pairs[N_TEST : N_TEST + N_TRAIN],
              "sft": pairs[N_TEST : N_TEST + N_SFT]}[split]
    rng = random.Random(f"{SEED}-{split}")
    return [(a, b) if rng.random() < 0.5 else (b, a) for a, b in chosen]


def _prompt(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} * {b}?"}]


def load_prompts(split: str = "train"):
    """The task's rows of `split` ("train" / "test"), a `Dataset`: `prompt` (one user message), `answer` (the product
    as a string) and the numbers `a`, `b` (what `CalculatorEnvironment.reset` keeps)."""
    from datasets import Dataset

    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}; valid splits: train, test.")
    return Dataset.from_list([{"prompt": _prompt(a, b), "answer": str(a * b), "a": a, "b": b}
                              for a, b in _questions(split)])


def sft_dataset(tool_use_fraction: float = TOOL_USE_FRACTION, no_tool_fraction: float = NO_TOOL_FRACTION):
    """`N_SFT` warm-start conversations (`messages`, `tools` as JSON or None), none on a test pair: a
    `no_tool_fraction` asked without the tool answer directly; of the others, a `tool_use_fraction` call `calculate`
    and answer with its result, the rest answer directly (right answers the model cannot compute: it learns to guess,
    which leaves GRPO the calls to reward)."""
    from datasets import Dataset

    rng = random.Random(SEED + 1)
    schema = json.dumps([get_json_schema(CalculatorEnvironment().calculate)])
    rows = []
    for a, b in _questions("sft"):
        answer = {"role": "assistant", "content": str(a * b)}
        if rng.random() < no_tool_fraction:
            rows.append({"messages": _prompt(a, b) + [answer], "tools": None})
            continue
        turns = [answer]
        if rng.random() < tool_use_fraction:
            call = {"type": "function", "function": {"name": "calculate", "arguments": {}}}
            turns = [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "name": "calculate", "content": str(a * b)}] + turns
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
    """The embedded tiny model fine-tuned on the task (assistant tokens only) in `WARM_START_STAGES`, saved with the
    task's tokenizer to `output_dir` once and reused. `config`: `SFTConfig` fields over those of every stage. Returns
    `output_dir`."""
    from .trainers.sft import SFTConfig, SFTTrainer

    if os.path.isfile(os.path.join(output_dir, "model.safetensors")):
        return output_dir
    model = defaults.DEFAULT_MODEL_NAME
    for stage, (fractions, settings) in enumerate(WARM_START_STAGES):
        settings = dict(lr_scheduler_type="constant", per_device_train_batch_size=16, assistant_only_loss=True,
                        logging_steps=50, save_strategy="no", report_to="none", seed=stage, **settings)
        trainer = SFTTrainer(model, args=SFTConfig(output_dir=output_dir, **{**settings, **config}),
                             train_dataset=sft_dataset(**fractions), processing_class=task_tokenizer())
        trainer.train()
        model = trainer.model
    trainer.save_model(output_dir)
    trainer.processing_class.save_pretrained(output_dir)
    return output_dir


def accuracy(model, tokenizer, split: str = "test", *, use_tools: bool = True, samples_per_prompt: int = 4,
             temperature: float = 1.0, max_completion_length: int = MAX_COMPLETION_LENGTH, seed: int = 0) -> dict:
    """Held-out accuracy: `accuracy` is the mean `answer_reward` of `samples_per_prompt` episodes per prompt of `split`
    (`sample_episodes`, one tool round, a `CalculatorEnvironment` per episode), reproducibly from `seed`, and
    `call_frequency` the tool calls per episode; `use_tools=False` offers no tool (the prompt lists none)."""
    rows = [row for row in load_prompts(split) for _ in range(samples_per_prompt)]
    environments = None
    if use_tools:
        environments = [CalculatorEnvironment() for _ in rows]
        for environment, row in zip(environments, rows):
            environment.reset(**row)
    sampling = SamplingConfig(max_new_tokens=max_completion_length, temperature=temperature, batch_size=256,
                              seed=seed)
    episodes = sample_episodes(model, tokenizer, [row["prompt"] for row in rows], sampling,
                               environments=environments, max_iterations=1,
                               max_completion_length=max_completion_length)
    scores = answer_reward(episodes.completions, [row["answer"] for row in rows])
    return {"accuracy": sum(scores) / len(scores), "call_frequency": episodes.tool_calls / len(rows)}
