"""The reward layer of the online trainers (GRPO, RLOO, ReMax, REINFORCE, Online DPO, PPO): reward functions and reward
models scored into one `[N, F]` tensor, combined with weights, and summarised as TRL's metrics.

A *reward function* has TRL's signature, `f(prompts, completions, completion_ids, **kwargs) -> list[float | None]`:

- `prompts` / `completions`: strings (standard) or message lists (conversational; each completion is
  `[{"role": "assistant", "content": text}]`); `completion_ids`: one list of token ids per completion.
- `kwargs`: every other dataset column (one list per column, aligned with the samples), `trainer_state` (the
  `TrainerState`, or None outside a trainer), and, as TRL 1.16 passes them, `log_extra(column, values)` (a column
  for the completions table) and `log_metric(name, value)` (a scalar metric). `RewardScorer` buffers what they log;
  the trainer collects it with `pop_logs()`. TRL's `environments` keyword is not passed (no trainer here has
  environments).
- `None` (or NaN) means "does not apply to this sample": it becomes NaN and is left out of sums and means; a sample
  no function applies to gets a warning, no reward and no advantage (TRL 1.16). An infinite reward is an error.
- `async def` reward functions are awaited, one function after another (TRL gathers them concurrently).

A *reward model* is a one-label `PreTrainedModel` sequence classifier (or a model id / path, loaded with
`AutoModelForSequenceClassification`, `num_labels=1`) scored as TRL scores it: standard samples as the text
`prompt + completion`, conversational ones as the chat template of `prompt + completion` messages, in one right-padded
batch without special tokens added, no gradients; the reward is `logits[:, 0]`. Unlike TRL, inputs longer than the
tokenizer's `model_max_length` are truncated (on the tokenizer's `truncation_side`) instead of overflowing the
model's positions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from . import data, losses, models

logger = logging.getLogger(__name__)

__all__ = [
    "RewardFunctionError",
    "RewardScorer",
    "completion_text",
    "loading_args",
    "preview",
    "reward_function_metrics",
    "reward_name",
]

# Keyword arguments the scorer passes itself; a dataset column with one of these names would collide with them.
_RESERVED_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
# Columns TRL leaves out of the keyword arguments: they are already passed as `prompts` / `completions` / ids.
_PASSED_AS_ARGUMENTS = ("prompt", "completion", "completion_ids")
_PREVIEW_CHARS = 200


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names the function and, when one reproduces it, the sample."""


def completion_text(completion) -> str:
    """The text of one completion: the string itself, or the content of the last message of a message list (the
    final answer, also for a completion that holds tool calls and results)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise TypeError(f"A completion must be a string or a list of messages with string content, got {completion!r:.80}.")


def preview(value, limit: int = _PREVIEW_CHARS) -> str:
    """A prompt (string or messages) as one short string for error messages: `role: content` lines for messages,
    cut to `limit` characters."""
    if isinstance(value, list):
        value = "\n".join(f"{m.get('role')}: {m.get('content')}" if isinstance(m, dict) else repr(m) for m in value)
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def reward_name(reward_func) -> str:
    """The name TRL logs a reward under: a model's `config._name_or_path` basename (its class name when it was built
    in memory and has none), else the function's `__name__` (a `functools.partial` is unwrapped), else its class
    name."""
    if isinstance(reward_func, PreTrainedModel):
        return reward_func.config._name_or_path.rstrip("/").split("/")[-1] or type(reward_func).__name__
    while isinstance(reward_func, functools.partial):
        reward_func = reward_func.func
    return getattr(reward_func, "__name__", type(reward_func).__name__)


def loading_args(model_init_kwargs: dict | None) -> SimpleNamespace:
    """What `models.load_model` / `models.load_tokenizer` read from a Config, for a model given by id outside one:
    `model_init_kwargs` and whether it allows remote code."""
    return SimpleNamespace(model_init_kwargs=model_init_kwargs,
                           trust_remote_code=bool((model_init_kwargs or {}).get("trust_remote_code", False)))


def reward_function_metrics(per_func: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """TRL's per-function metrics of rewards `[N, F]`: `rewards/{name}/mean` and `rewards/{name}/std` over the
    samples where the function applied (NaN-aware; the std is unbiased, NaN with fewer than two values, as TRL's)."""
    if per_func.dim() != 2 or per_func.size(1) != len(names):
        raise ValueError(f"Expected rewards of shape [N, {len(names)}], got {list(per_func.shape)}.")
    metrics = {}
    for i, name in enumerate(names):
        column = per_func[:, i].float()
        metrics[f"rewards/{name}/mean"] = torch.nanmean(column).item()
        metrics[f"rewards/{name}/std"] = losses.nan_std(column).item()
    return metrics


def _as_reward(value) -> float | None:
    """A reward value as a float (None -> NaN); None when it is not a number."""
    if value is None:
        return float("nan")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    return None


def _resolve(result):
    """The value of a reward function's result, awaiting it first when the function is `async`. The coroutine runs
    in a fresh event loop on a helper thread, so this works whether or not the caller's thread has a running loop."""
    if not inspect.isawaitable(result):
        return result

    async def wait():
        return await result

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def _ignore_log(*_args) -> None:
    """Stands in for `log_extra` / `log_metric` while a failing batch is re-run sample by sample."""


class RewardScorer:
    """Scores completions with several reward functions and reward models into rewards `[N, F]`.

    `reward_funcs`: one or a list of reward functions, reward models, or reward model ids / paths (loaded with
    `model_init_kwargs`, fp32 unless they name a `dtype`). `reward_weights`: one weight per function (default 1 each).
    `reward_processing_classes`: the tokenizer of each reward model (one, or a list aligned with `reward_funcs`, its
    entries for plain functions ignored); a missing one is loaded from the model's id, and a tokenizer without a pad
    token pads with eos. `device`: where reward models (and reward functions with a `to` method, e.g. `JudgeReward`)
    run; None leaves them where they are. `prepare_model`: places a reward model for the run instead and returns the
    module to call (the online trainers pass `distributed.prepare_frozen_model` with their accelerator, which shards
    it under ZeRO-3 / FSDP); `reward_funcs` keeps the model itself. `chat_template_kwargs`: passed to the reward
    tokenizers' chat template (TRL's `GRPOConfig.chat_template_kwargs`). Reward models are put in eval mode.
    """

    def __init__(
        self,
        reward_funcs,
        reward_weights: Sequence[float] | None = None,
        reward_processing_classes=None,
        model_init_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        chat_template_kwargs: dict | None = None,
        prepare_model: Callable[[PreTrainedModel], torch.nn.Module] | None = None,
    ):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("`reward_funcs` is empty: give at least one reward function or reward model.")
        load_args = loading_args(model_init_kwargs)
        funcs = [models.load_model(f, load_args, AutoModelForSequenceClassification, num_labels=1)
                 if isinstance(f, str) else f for f in funcs]
        for i, func in enumerate(funcs):
            if not callable(func):
                raise TypeError(f"reward_funcs[{i}] is a {type(func).__name__}: expected a reward function, a "
                                "reward model or a model id / path.")
        self.reward_funcs = funcs
        self.names = [reward_name(f) for f in funcs]
        duplicates = sorted({name for name in self.names if self.names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Several reward functions are named {duplicates}; their metrics would mix. Give each a "
                             "distinct `__name__` (e.g. `func.__name__ = 'my_reward'`).")
        self.weights = self._weights(reward_weights, len(funcs))
        self.processing_classes = self._processing_classes(reward_processing_classes, load_args)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        for func in funcs:
            if isinstance(func, PreTrainedModel):
                func.eval()
            elif device is not None and callable(getattr(func, "to", None)):
                func.to(device)
        place = prepare_model or (lambda model: model.to(device) if device is not None else model)
        # reward_funcs index -> the module that scores with that reward model
        self.model_modules = {i: place(func) for i, func in enumerate(funcs) if isinstance(func, PreTrainedModel)}
        self._extra_columns: dict[str, list] = defaultdict(list)
        self._logged_metrics: dict[str, list[float]] = defaultdict(list)

    @staticmethod
    def _weights(reward_weights, num_funcs: int) -> torch.Tensor:
        if reward_weights is None:
            return torch.ones(num_funcs, dtype=torch.float32)
        weights = torch.as_tensor(list(reward_weights), dtype=torch.float32)
        if weights.dim() != 1 or weights.numel() != num_funcs:
            raise ValueError(f"reward_weights has {weights.numel()} values but there are {num_funcs} reward "
                             "functions: give one weight per reward function.")
        return weights

    def _processing_classes(self, reward_processing_classes, load_args) -> list:
        if reward_processing_classes is None:
            classes = [None] * len(self.reward_funcs)
        elif isinstance(reward_processing_classes, (list, tuple)):
            classes = list(reward_processing_classes)
        else:
            classes = [reward_processing_classes]
        if len(classes) != len(self.reward_funcs):
            raise ValueError(f"reward_processing_classes has {len(classes)} entries but there are "
                             f"{len(self.reward_funcs)} reward functions: give one per function (None for plain "
                             "functions).")
        for i, func in enumerate(self.reward_funcs):
            if isinstance(func, PreTrainedModel):
                tokenizer = classes[i] if classes[i] is not None else models.load_tokenizer(func, load_args)
                classes[i] = models.prepare_tokenizer(tokenizer, func)
        return classes

    # -- scoring ---------------------------------------------------------------------------------------------------
    def score(
        self,
        prompts: list,
        completions: list,
        completion_ids: list[list[int]],
        columns: dict[str, list] | None = None,
        trainer_state=None,
    ) -> torch.Tensor:
        """Rewards `[N, F]` (float32, on the CPU) of `N` completions under each of the `F` reward functions, NaN where
        a function returned None. `columns`: the other dataset columns, one list of `N` values each (`prompt`,
        `completion` and `completion_ids` entries are dropped, as TRL drops them)."""
        count = len(prompts)
        if len(completions) != count or len(completion_ids) != count:
            raise ValueError(f"Got {count} prompts, {len(completions)} completions and {len(completion_ids)} "
                             "completion id lists: one of each per sample.")
        columns = {k: v for k, v in (columns or {}).items() if k not in _PASSED_AS_ARGUMENTS}
        for name, values in columns.items():
            if name in _RESERVED_KEYWORDS:
                raise ValueError(f"Dataset column {name!r} collides with the reward-function keyword of that name; "
                                 "rename the column.")
            if len(values) != count:
                raise ValueError(f"Column {name!r} has {len(values)} values for {count} samples.")
        kwargs = {**columns, "trainer_state": trainer_state, "log_extra": self._log_extra,
                  "log_metric": self._log_metric}

        rewards = torch.empty(count, len(self.reward_funcs), dtype=torch.float32)
        if count == 0:
            return rewards
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.names)):
            if isinstance(func, PreTrainedModel):
                rewards[:, i] = self._score_with_model(self.model_modules[i], self.processing_classes[i], prompts,
                                                       completions)
            else:
                rewards[:, i] = torch.tensor(self._call(func, name, prompts, completions, completion_ids, kwargs))
        unscored = torch.isnan(rewards).all(dim=1)
        if unscored.any():
            row = int(unscored.nonzero()[0])
            logger.warning(f"Every reward function returned None or NaN for sample {row} (prompt: "
                           f"{preview(prompts[row])!r}); it gets no reward and no advantage. Make sure at least one "
                           "function applies to each sample.")
        return rewards

    def _call(self, func, name: str, prompts, completions, completion_ids, kwargs) -> list[float]:
        """Calls one reward function on the batch and checks its answer; when it raises, finds the sample."""
        try:
            output = _resolve(func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
        except Exception as error:
            raise self._locate_failure(func, name, prompts, completions, completion_ids, kwargs, error) from error
        try:
            output = list(output)
        except TypeError:
            raise TypeError(f"The reward function '{name}' returned {type(output).__name__}, not a list of "
                            f"{len(prompts)} rewards.") from None
        if len(output) != len(prompts):
            raise ValueError(f"The reward function '{name}' returned {len(output)} rewards, but {len(prompts)} were "
                             "expected (one per prompt-completion pair).")
        values = []
        for index, value in enumerate(output):
            reward = _as_reward(value)
            if reward is None:
                raise TypeError(f"The reward function '{name}' returned {value!r:.80} ({type(value).__name__}) for "
                                f"sample {index} (prompt: {preview(prompts[index])!r}): expected a number or None.")
            if math.isinf(reward):
                raise ValueError(f"The reward function '{name}' returned {reward} for sample {index} (prompt: "
                                 f"{preview(prompts[index])!r}): rewards must be finite (None or NaN: does not apply).")
            values.append(reward)
        return values

    @staticmethod
    def _locate_failure(func, name, prompts, completions, completion_ids, kwargs, error) -> RewardFunctionError:
        """Re-runs a batch that raised one sample at a time (logging switched off) and names the first sample that
        raises on its own; the error says so when none does (the failure depends on the whole batch)."""
        for index in range(len(prompts)):
            one = {k: (v[index : index + 1] if isinstance(v, list) else v) for k, v in kwargs.items()}
            one.update(log_extra=_ignore_log, log_metric=_ignore_log)
            try:
                _resolve(func(prompts=prompts[index : index + 1], completions=completions[index : index + 1],
                              completion_ids=completion_ids[index : index + 1], **one))
            except Exception as sample_error:
                return RewardFunctionError(
                    f"The reward function '{name}' raised {type(sample_error).__name__}: {sample_error} on sample "
                    f"{index} (prompt: {preview(prompts[index])!r}, completion: "
                    f"{preview(completions[index])!r})."
                )
        return RewardFunctionError(
            f"The reward function '{name}' raised {type(error).__name__}: {error} on a batch of {len(prompts)} "
            "samples, but on none of them alone."
        )

    def _score_with_model(self, model: torch.nn.Module, tokenizer, prompts, completions) -> torch.Tensor:
        """`logits[:, 0]` of a reward model for each prompt + completion, rendered as TRL renders them."""
        if data.is_conversational_row({"prompt": prompts[0]}, ["prompt"]):
            texts = [tokenizer.apply_chat_template(p + c, tokenize=False, **self.chat_template_kwargs)
                     for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                           add_special_tokens=False, truncation=True).to(model.device)
        with torch.inference_mode():
            return model(**inputs).logits[:, 0].float().cpu()

    # -- combining, metrics and what reward functions logged --------------------------------------------------------
    def combine(self, per_func: torch.Tensor) -> torch.Tensor:
        """The weighted reward `[N]` of rewards `[N, F]` (`losses.weighted_reward_sum`: NaN entries add nothing, and a
        sample no function applied to is NaN, left out of group statistics with advantage 0, as in TRL 1.16)."""
        return losses.weighted_reward_sum(per_func, self.weights)

    def metrics(self, per_func: torch.Tensor) -> dict[str, float]:
        """`rewards/{name}/mean` and `rewards/{name}/std` of each function (see `reward_function_metrics`)."""
        return reward_function_metrics(per_func, self.names)

    def _log_extra(self, column: str, values: list) -> None:
        self._extra_columns[column].extend(values)

    def _log_metric(self, name: str, value: float) -> None:
        self._logged_metrics[name].append(float(value))

    def pop_logs(self) -> tuple[dict[str, list], dict[str, list[float]]]:
        """What reward functions logged since the last call: completions-table columns (`log_extra`) and metric
        values (`log_metric`, to be averaged over the logging step, as TRL does); the buffers are emptied."""
        logged = dict(self._extra_columns), dict(self._logged_metrics)
        self._extra_columns.clear()
        self._logged_metrics.clear()
        return logged
