"""Multi-turn rollouts: tool calling, environments and custom rollout functions, as TRL 1.16's `GRPOTrainer` runs
them (`tools=`, `environment_factory=`, `rollout_func=`).

- `tool_tokenizer(tokenizer)`: checks once, before training, that the chat template can render and parse tool calls
  (setting TRL's response template for the templates it knows) and returns the tokenizer to render them with.
- `sample_episodes(model, tokenizer, prompts, sampling, tools=..., environments=..., ...)`: one episode per prompt.
  The model's turn is parsed for tool calls (`trl.chat_template_utils.parse_response`); each call runs (a failure,
  an exception or a timeout becomes an `{"error": ...}` result, never a crash), the results are appended as `tool`
  messages rendered through the chat template, and the model continues, up to `max_iterations` rounds and
  `max_completion_length` completion tokens (TRL's `_tool_call_loop`: results that would not fit are rolled back
  and the episode ends at its tool call; a continuation is cut to the budget left). `Episodes.tool_mask` is 0 on
  the tool tokens, which add nothing to the loss.
- `EnvironmentPool(environment_factory)`: TRL's environments: one instance per row, reused across batches, reset
  with the row's columns; their public methods are the row's tools, their `get_reward` a reward function.
- `episodes_from_rollout(output, prompts, tokenizer, stop_ids)`: checks what a `rollout_func` returned and turns it
  into `Episodes` plus the extra columns for the reward functions.
- `python(code)`: the code sandbox of `hf_align.verifiers` as a tool that returns what the code prints.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import threading
from dataclasses import dataclass, replace
from typing import Callable

from trl.chat_template_utils import (
    add_response_schema,
    get_training_chat_template,
    is_chat_template_prefix_preserving,
    parse_response,
    supports_tool_calling,
)

from . import data, models, verifiers
from .generation import SamplingConfig, encode_prompts, generate_continuations, stop_token_ids

__all__ = [
    "EnvironmentPool",
    "Episodes",
    "call_tool",
    "environment_tools",
    "episodes_from_rollout",
    "python",
    "run_episodes",
    "sample_episodes",
    "tool_suffix_ids",
    "tool_tokenizer",
]

DEFAULT_TOOL_TIMEOUT_S = 30.0


@dataclass
class Episodes:
    """One episode per row. `completion_ids` holds every model turn and every tool / environment result in sequence
    order after `prompt_ids`; `tool_mask` (same length) is 1 on tokens the model sampled, 0 on the others.
    `completions` is what reward functions receive: the trajectory as messages (assistant turns with their parsed
    `tool_calls`, `tool` messages), or the decoded text for string prompts. `is_truncated`: the completion does not
    end with a stop token (TRL's rule). `tool_calls` / `tool_failures` count the batch's calls and failed calls (TRL's
    `tools/call_frequency` = calls / rows, `tools/failure_frequency` = failures / calls). `logprobs`: the sampler's
    per-token log-probs, when a `rollout_func` returned them."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    tool_mask: list[list[int]]
    completions: list
    is_truncated: list[bool]
    tool_calls: int = 0
    tool_failures: int = 0
    logprobs: list[list[float]] | None = None


# ---------------------------------------------------------------------------------------------------- chat template


def has_response_parser(tokenizer) -> bool:
    """Whether `tokenizer.parse_response` can parse a model turn (a response template, or TRL's legacy schema)."""
    return getattr(tokenizer, "response_template", None) is not None or getattr(
        tokenizer, "response_schema", None) is not None


def tool_tokenizer(tokenizer):
    """The tokenizer to render and parse tool-calling conversations with, checked as TRL's `GRPOTrainer` does at
    construction: the chat template must render a tool call and a tool result; without a response template (how
    `parse_response` finds tool calls in a model turn) TRL's `add_response_schema` sets the one of a chat template it
    knows (Qwen, Llama 3.1, ...), else a `ValueError` says what to set. A template that does not render a
    conversation's beginning the same whatever follows is replaced by TRL's training template, in a copy (the
    tokenizer itself keeps its template, for saving)."""
    if not supports_tool_calling(tokenizer):
        raise ValueError("Tool calling needs a chat template that renders a full tool-calling conversation (user -> "
                         "assistant with `tool_calls` -> `tool` message, with the tool's name, arguments and "
                         "result); the tokenizer's chat template does not.")
    if not has_response_parser(tokenizer):
        try:
            add_response_schema(tokenizer)
        except ValueError:
            raise ValueError(
                "Tool calling needs `tokenizer.response_template` (transformers' response parsing: how to find the "
                "tool calls in a model turn), and TRL's `add_response_schema` does not know this chat template. Set "
                "one for the template's tool-call format, e.g. `trl.chat_template_utils.qwen3_template` for "
                "Hermes/Qwen-style `<tool_call>{json}</tool_call>` calls.") from None
    if is_chat_template_prefix_preserving(tokenizer):
        return tokenizer
    rendering = copy.copy(tokenizer)
    rendering.chat_template = get_training_chat_template(tokenizer)
    return rendering


def tool_suffix_ids(tokenizer, tool_messages: list[dict], stop_ids: list[int],
                    chat_template_kwargs: dict | None = None) -> list[int]:
    """The tokens the chat template puts after a model turn that ends in a stop token and before the model's next
    turn: the `tool_messages` and the next assistant header (TRL's `_get_tool_suffix_ids`, from a minimal dummy
    conversation). The rendered turn is cut after its last stop token (TRL cuts after the eos token; here any of
    `stop_ids`, so that a template whose turns end in another token, e.g. `<|im_end|>`, aligns too)."""
    dummy = [
        {"role": "user", "content": "dummy"},
        # The real tool name: some templates (GPT-OSS) derive the tool result's header from the call's name.
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]},
    ]
    kwargs = dict(tokenize=True, return_dict=False, **(chat_template_kwargs or {}))
    prefix = tokenizer.apply_chat_template(dummy, add_generation_prompt=False, **kwargs)
    full = tokenizer.apply_chat_template(dummy + tool_messages, add_generation_prompt=True, **kwargs)
    stops = [i for i, token in enumerate(prefix) if token in stop_ids]
    if stops:
        prefix = prefix[: stops[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise ValueError("The chat template renders a tool-calling turn differently once tool results follow it; "
                         "tool results cannot be appended to the model's turn token by token.")
    return full[len(prefix):]


def render_prompts(tokenizer, prompts: list, row_tools: list[list[Callable]],
                   chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Each message-list prompt through the chat template with its row's tool schemas and the generation prompt."""
    return [encode_prompts(tokenizer, [prompt], {"tools": tools or None, **(chat_template_kwargs or {})})[0]
            for prompt, tools in zip(prompts, row_tools, strict=True)]


# ------------------------------------------------------------------------------------------------------------ tools


def _call_with_timeout(function: Callable, arguments: dict, timeout_s: float):
    """`function(**arguments)` (awaited when it is a coroutine function) in a daemon thread, raising its exception,
    or a `TimeoutError` after `timeout_s` seconds. A thread cannot be killed: a timed-out call is left to finish on its
    own, so a tool that may hang should bound itself (`python` kills its process)."""
    outcome = {}

    def run():
        try:
            result = function(**arguments)
            outcome["result"] = asyncio.run(result) if inspect.isawaitable(result) else result
        except BaseException as error:  # SystemExit and the like end a thread silently: report them
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True, name=f"tool-{getattr(function, '__name__', 'call')}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"the tool call did not return within {timeout_s:g} s")
    error = outcome.get("error")
    if isinstance(error, Exception):
        raise error
    if error is not None:  # SystemExit and the like: a failure of the call, not a signal to this process
        raise RuntimeError(f"the tool raised {type(error).__name__}")
    return outcome["result"]


def call_tool(tools: dict[str, Callable], call: dict, timeout_s: float = DEFAULT_TOOL_TIMEOUT_S) -> tuple[dict, bool]:
    """The `tool` message answering one parsed tool call (`{"type": "function", "function": {"name", "arguments"}}`)
    with the tool of that name in `tools`, and whether the call failed. The content is `str(result)`; an unknown tool,
    an unsupported call type, bad arguments, an exception or a timeout gives `str({"error": message})` (TRL's)."""
    if call.get("type") != "function":
        name = call.get("name", "unknown")
        error = f"Unsupported tool call type: {call.get('type')}"
        return {"role": "tool", "name": name, "content": str({"error": error})}, True
    name = call["function"]["name"]
    try:
        if name not in tools:
            raise ValueError(f"Tool {name} not found.")
        arguments = call["function"]["arguments"]
        if not isinstance(arguments, dict):
            raise TypeError(f"Tool {name} needs its arguments as a JSON object, got {arguments!r:.80}.")
        result = _call_with_timeout(tools[name], arguments, timeout_s)
    except Exception as error:  # a tool never stops training
        return {"role": "tool", "name": name, "content": str({"error": str(error)})}, True
    return {"role": "tool", "name": name, "content": str(result)}, False


def _parse_turn(tokenizer, ids: list[int], prefix: list[int], tools: list[Callable]) -> dict:
    """A model turn as an assistant message with its `tool_calls` (plain text when it cannot be parsed)."""
    return parse_response(tokenizer, ids, prefix=prefix, tools=tools or None)


def run_episodes(sample: Callable[[list[list[int]], int], list[list[int]]], tokenizer, prompt_ids: list[list[int]],
                 row_tools: list[list[Callable]], *, stop_ids: list[int], max_iterations: int,
                 max_completion_length: int, max_length: int | None = None,
                 tool_timeout_s: float = DEFAULT_TOOL_TIMEOUT_S, chat_template_kwargs: dict | None = None) -> Episodes:
    """The tool-calling loop (TRL's `_tool_call_loop`) on rendered prompts: `sample(prefixes, max_new_tokens)`
    returns one continuation of each token-id prefix, cut after its first stop token. Row `i` may call
    `row_tools[i]`. Tool results whose tokens would take the completion past `max_completion_length` (or the whole
    sequence to `max_length`, the model's context) are dropped and the episode ends at its tool call; the model's
    next turn is cut to the tokens left."""
    tools_by_name = [{tool.__name__: tool for tool in tools} for tools in row_tools]
    completion_ids = [list(ids) for ids in sample(prompt_ids, max_completion_length)]
    tool_mask = [[1] * len(ids) for ids in completion_ids]
    completions = [[_parse_turn(tokenizer, ids, prompt, tools)]
                   for ids, prompt, tools in zip(completion_ids, prompt_ids, row_tools, strict=True)]
    pending = [i for i, turns in enumerate(completions) if turns[-1].get("tool_calls")]
    calls = failures = 0
    for _ in range(max_iterations):
        if not pending:
            break
        active, prefixes, budgets = [], [], []
        for i in pending:
            messages = []
            for call in completions[i][-1]["tool_calls"]:
                message, failed = call_tool(tools_by_name[i], call, tool_timeout_s)
                messages.append(message)
                calls, failures = calls + 1, failures + failed
            prefix = (prompt_ids[i] + completion_ids[i]
                      + tool_suffix_ids(tokenizer, messages, stop_ids, chat_template_kwargs))
            used = len(prefix) - len(prompt_ids[i])
            if used > max_completion_length or (max_length is not None and len(prefix) >= max_length):
                continue  # the results do not fit: rolled back, the episode ends at its tool call
            completions[i] += messages
            active.append(i)
            prefixes.append(prefix)
            budgets.append(max_completion_length - used)
        continuations = sample(prefixes, max(budgets)) if budgets and max(budgets) > 0 else [[] for _ in active]
        pending = []
        for i, prefix, budget, continuation in zip(active, prefixes, budgets, continuations, strict=True):
            continuation = list(continuation)[:budget]
            tool_length = len(prefix) - len(prompt_ids[i]) - len(completion_ids[i])
            tool_mask[i] += [0] * tool_length + [1] * len(continuation)
            completion_ids[i] = prefix[len(prompt_ids[i]):] + continuation
            if continuation:  # a turn cut to nothing adds no message
                completions[i].append(_parse_turn(tokenizer, continuation, prefix, row_tools[i]))
                if completions[i][-1].get("tool_calls"):
                    pending.append(i)
    return Episodes(prompt_ids=[list(ids) for ids in prompt_ids], completion_ids=completion_ids, tool_mask=tool_mask,
                    completions=completions, is_truncated=truncated(completion_ids, stop_ids, tokenizer.pad_token_id),
                    tool_calls=calls, tool_failures=failures)


def truncated(completion_ids: list[list[int]], stop_ids: list[int], pad_token_id: int | None) -> list[bool]:
    """Whether each completion does not end with a stop (or pad) token: TRL's `is_truncated`."""
    ends = set(stop_ids) | {pad_token_id}
    return [not ids or ids[-1] not in ends for ids in completion_ids]


def sample_episodes(model, tokenizer, prompts: list, sampling: SamplingConfig, *, tools: list[Callable] = (),
                    environments: list | None = None, max_iterations: int, max_completion_length: int,
                    tool_timeout_s: float = DEFAULT_TOOL_TIMEOUT_S) -> Episodes:
    """One episode per prompt (message lists; repeat a prompt for several episodes) sampled from `model`: the
    model's turns, the `tools` it calls (plus, for row `i`, the public methods of `environments[i]`, see
    `EnvironmentPool`) and their results, as in TRL's `GRPOTrainer` (see `run_episodes`). `tokenizer`: as returned
    by `tool_tokenizer`. `sampling` sets how turns are sampled (`max_new_tokens` is each turn's budget left of
    `max_completion_length`; a `seed` gives round `r` the seed `seed + r`); `sampling.num_generations` must be 1."""
    prompts = list(prompts)
    if not prompts or not data.is_conversational_row({"prompt": prompts[0]}, ["prompt"]):
        raise ValueError("Tool calling needs conversational prompts (message lists): the chat template renders the "
                         "tool schemas and the tool results.")
    if sampling.num_generations != 1:
        raise ValueError(f"sample_episodes runs one episode per prompt (each with its own tools and environment): "
                         f"repeat each prompt num_generations times and pass num_generations=1, not "
                         f"{sampling.num_generations}.")
    if environments is not None and len(environments) != len(prompts):
        raise ValueError(f"Got {len(environments)} environments for {len(prompts)} prompts: one per prompt.")
    if not has_response_parser(tokenizer):
        raise ValueError("The tokenizer has no response template to find tool calls with: pass it through "
                         "`hf_align.tools.tool_tokenizer` first.")
    row_tools = [list(tools) + environment_tools(environment) for environment in environments or [None] * len(prompts)]
    prompt_ids = render_prompts(tokenizer, prompts, row_tools, sampling.chat_template_kwargs)
    rounds = iter(range(max_iterations + 1))

    def sample(prefixes: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        seed = None if sampling.seed is None else sampling.seed + next(rounds)
        return generate_continuations(model, tokenizer, prefixes,
                                      replace(sampling, max_new_tokens=max_new_tokens, seed=seed))

    config = models.unwrap_causal_lm(model).config
    return run_episodes(sample, tokenizer, prompt_ids, row_tools, stop_ids=stop_token_ids(model, tokenizer),
                        max_iterations=max_iterations, max_completion_length=max_completion_length,
                        max_length=getattr(config, "max_position_embeddings", None), tool_timeout_s=tool_timeout_s,
                        chat_template_kwargs=sampling.chat_template_kwargs)


# ----------------------------------------------------------------------------------------------------- environments


def environment_tools(environment) -> list[Callable]:
    """The tools an environment exposes (TRL's rule): its public methods but `reset` and `get_reward`, bound to it.
    None has none."""
    if environment is None:
        return []
    return [getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]


class EnvironmentReward:
    """A reward function (named after an environment class, TRL's reward name) scoring each episode with its
    environment's `get_reward()` when the environment is of exactly that class, None (not scored) otherwise."""

    def __init__(self, environment_class: type):
        self.environment_class = environment_class
        self.__name__ = environment_class.__name__

    def __call__(self, environments, **kwargs) -> list[float | None]:
        return [environment.get_reward() if type(environment) is self.environment_class else None
                for environment in environments]


class EnvironmentPool:
    """TRL's `environment_factory`: a callable returning an environment (an object with a `reset` method, whose
    public methods are tools and whose optional `get_reward()` scores an episode), or a dict of such callables chosen
    per row by the row's `environment` column. Each factory is called once up front (to check `reset` and list the
    tools); instances are reused batch after batch, more made only when a batch needs more of one environment."""

    def __init__(self, environment_factory: Callable | dict[str, Callable]):
        self.multiple = isinstance(environment_factory, dict)
        self.factories = environment_factory if self.multiple else {None: environment_factory}
        if not self.factories:
            raise ValueError("environment_factory is an empty dict: name at least one environment.")
        self.instances = {name: [self._make(name)] for name in self.factories}

    def _make(self, name):
        environment = self.factories[name]()
        if not callable(getattr(environment, "reset", None)):
            raise ValueError(f"The environment made by environment_factory{'' if name is None else f'[{name!r}]'} "
                             f"({type(environment).__name__}) must define a callable `reset`.")
        return environment

    def reward_functions(self) -> list[EnvironmentReward]:
        """One reward function per environment class that defines `get_reward` (weight 1 in TRL)."""
        classes = dict.fromkeys(type(pool[0]) for pool in self.instances.values())
        return [EnvironmentReward(cls) for cls in classes if callable(getattr(cls, "get_reward", None))]

    def tools(self) -> list[Callable]:
        """Every environment's tools (one instance's methods each): TRL's `trainer.tools` but the standalone ones."""
        return [tool for pool in self.instances.values() for tool in environment_tools(pool[0])]

    def start(self, rows: list[dict]) -> tuple[list, list]:
        """One environment per row, reset with the row's columns (but `environment`, with a dict of factories), and
        each row's prompt (`[{"role": "user", "content": ""}]` when the row has none) with the observation `reset`
        returned, if any, appended to its last message. Returns (environments, prompts)."""
        environments, prompts, taken = [], [], {}
        for index, row in enumerate(rows):
            name = row.get("environment") if self.multiple else None
            if name not in self.factories:
                raise ValueError(f"Row {index} has environment={name!r}, which is not among the environments of "
                                 f"environment_factory: {list(self.factories)}.")
            pool = self.instances[name]
            if taken.get(name, 0) == len(pool):
                pool.append(self._make(name))
            environment = pool[taken.get(name, 0)]
            taken[name] = taken.get(name, 0) + 1
            columns = {key: value for key, value in row.items() if not (self.multiple and key == "environment")}
            observation = environment.reset(**columns)
            prompt = row.get("prompt", [{"role": "user", "content": ""}])
            if observation is not None:
                if not isinstance(observation, str) or not isinstance(prompt[-1]["content"], str):
                    raise TypeError(f"Row {index}: reset() returned {type(observation).__name__}; an observation "
                                    "is appended to the prompt's last message and must be a string.")
                prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
            environments.append(environment)
            prompts.append(prompt)
        return environments, prompts


# ----------------------------------------------------------------------------------------------------- rollout_func

ROLLOUT_KEYS = ("prompt_ids", "completion_ids", "logprobs")


def _check_rows(output: dict, key: str, count: int, is_item: Callable, item: str, lengths=None) -> None:
    """Raises a `ValueError` naming `key` and the first bad row unless `output[key]` holds `count` lists of `item`s
    (each as long as `lengths[i]`, when given)."""
    rows = output[key]
    if not isinstance(rows, (list, tuple)) or len(rows) != count:
        got = f"a list of {len(rows)}" if isinstance(rows, (list, tuple)) else type(rows).__name__
        raise ValueError(f"rollout_func's {key!r} must be a list with one row per prompt ({count}), got {got}.")
    for index, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or not all(is_item(value) for value in row):
            raise ValueError(f"rollout_func's {key!r}, row {index}: expected a list of {item}, got {row!r:.80}.")
        if lengths is not None and len(row) != lengths[index]:
            raise ValueError(f"rollout_func's {key!r}, row {index}: {len(row)} values for {lengths[index]} "
                             f"completion tokens.")


def episodes_from_rollout(output: dict, prompts: list, tokenizer, stop_ids: list[int]) -> tuple[Episodes, dict]:
    """What `rollout_func(prompts, trainer)` returned, checked (a `ValueError` names the missing key or the bad row),
    as `Episodes` and the extra columns reward functions receive (a list is one value per row, anything else the same
    value for every row). `env_mask` (1 on the model's tokens, 0 on the environment's) becomes the tool mask (all
    ones without it); `logprobs` may be None. Completions are parsed as TRL does: message-list prompts give
    `[assistant message]` (with its tool calls, when the tokenizer has a response template), strings the text."""
    if not isinstance(output, dict):
        raise ValueError(f"rollout_func must return a dict, got {type(output).__name__}.")
    missing = [key for key in ROLLOUT_KEYS if key not in output]
    if missing:
        raise ValueError(f"rollout_func must return keys {missing} in its output dict (it returned {sorted(output)}).")
    count = len(prompts)
    is_id = lambda value: isinstance(value, int) and not isinstance(value, bool)  # noqa: E731
    _check_rows(output, "prompt_ids", count, is_id, "token ids (int)")
    _check_rows(output, "completion_ids", count, is_id, "token ids (int)")
    lengths = [len(row) for row in output["completion_ids"]]
    if output["logprobs"] is not None:
        _check_rows(output, "logprobs", count, lambda v: isinstance(v, (int, float)) or v is None, "floats", lengths)
    if output.get("env_mask") is not None:
        _check_rows(output, "env_mask", count, lambda v: v in (0, 1), "0/1 flags", lengths)
    extra = {key: value for key, value in output.items() if key not in ROLLOUT_KEYS + ("env_mask",)}
    for key, value in extra.items():
        if isinstance(value, list) and len(value) != count:
            raise ValueError(f"rollout_func's extra field {key!r} is a list of {len(value)} values for {count} rows: "
                             "give one per row (or a single non-list value for all).")
    prompt_ids = [list(row) for row in output["prompt_ids"]]
    completion_ids = [list(row) for row in output["completion_ids"]]
    if not data.is_conversational_row({"prompt": prompts[0]}, ["prompt"]):
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    elif has_response_parser(tokenizer):
        completions = [[_parse_turn(tokenizer, ids, prefix, [])] for ids, prefix in zip(completion_ids, prompt_ids)]
    else:
        completions = [[{"role": "assistant", "content": text}]
                       for text in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]
    env_mask = output.get("env_mask")
    episodes = Episodes(
        prompt_ids=prompt_ids, completion_ids=completion_ids,
        tool_mask=[list(row) for row in env_mask] if env_mask is not None else [[1] * n for n in lengths],
        completions=completions, is_truncated=truncated(completion_ids, stop_ids, tokenizer.pad_token_id),
        logprobs=None if output["logprobs"] is None else [list(row) for row in output["logprobs"]],
    )
    return episodes, {key: value if isinstance(value, list) else [value] * count for key, value in extra.items()}


# ------------------------------------------------------------------------------------------------------ python tool

PYTHON_TIMEOUT_S = 10.0
PYTHON_MEMORY_MB = 512
PYTHON_OUTPUT_CHARS = 2000  # the end of a long output is kept: the model sees the last lines, tracebacks included

# Runs the model's code in the sandbox runner with its output (and any traceback) captured, then writes the end of
# it to `output` in the sandbox folder, where `_run_python` reads it.
_CAPTURE = """\
import io as _io, sys as _sys, traceback as _traceback
_buffer = _io.StringIO()
_sys.stdout = _sys.stderr = _buffer
try:
    exec(compile({code!r}, "<tool>", "exec"), {{"__name__": "__main__"}})
except BaseException:
    _traceback.print_exc(limit=-1)
with open("output", "w") as _file:
    _file.write(_buffer.getvalue()[-{chars}:])
"""


def _run_python(code: str, timeout_s: float, memory_mb: int) -> str:
    """What `code` prints, run in `hf_align.verifiers`' sandbox (`run_sandbox_case`: a fresh `python -I` with its
    limits and audit hook, in a temporary folder, its process group killed after `timeout_s`)."""
    case = {"code": _CAPTURE.format(code=code, chars=PYTHON_OUTPUT_CHARS), "tests": [], "nonce": "python-tool",
            "memory_bytes": memory_mb * 2**20, "cpu_s": int(timeout_s) + 1, "file_bytes": verifiers._MAX_FILE_BYTES}
    returncode, output = verifiers.run_sandbox_case(case, timeout_s, "output")
    if returncode is None:
        raise TimeoutError(f"the code did not finish within {timeout_s:g} s")
    if output is None:
        raise RuntimeError(f"the code was stopped (exit code {returncode}), e.g. by its memory or CPU limit")
    return output


def python(code: str) -> str:
    """Runs a Python program in a sandbox and returns what it prints (and the traceback if it raises).

    Args:
        code: The Python program to run. Print the values you want to see.
    """
    return _run_python(code, PYTHON_TIMEOUT_S, PYTHON_MEMORY_MB)
