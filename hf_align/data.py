"""Dataset formats, validation and tokenization shared by every trainer.

Two formats, as in TRL: *standard* (text columns are strings) and *conversational* (text columns are lists of
`{"role", "content"}` messages, rendered with the tokenizer's chat template). Every row is checked before any
tokenization; a bad row raises `DataError` naming the dataset, the row and the column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import torch
from datasets import Dataset
from jinja2 import TemplateError
from trl.data_utils import extract_prompt

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool", "developer")


class DataError(ValueError):
    """A dataset row that cannot be trained on."""


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def check_value(value, where: str, *, conversational: bool, allow_empty: bool = False) -> None:
    """Raises `DataError` unless `value` is a non-empty string (standard) or message list (conversational)."""
    if conversational:
        if not isinstance(value, list) or (not value and not allow_empty):
            raise DataError(f"{where}: expected a non-empty list of messages, got {_describe(value)}.")
        for i, message in enumerate(value):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"{where}, message {i}: expected a dict with 'role' and 'content', got {message!r}.")
            if message["role"] not in ROLES:
                raise DataError(f"{where}, message {i}: unknown role {message['role']!r} (expected one of {ROLES}).")
            if not isinstance(message["content"], (str, list)):
                raise DataError(f"{where}, message {i}: content must be a string, got {_describe(message['content'])}.")
        return
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string, got {_describe(value)}.")
    if not value.strip() and not allow_empty:
        raise DataError(f"{where}: the text is empty.")


def _describe(value) -> str:
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def is_conversational_row(row: dict, columns: Sequence[str]) -> bool:
    return any(_is_messages(row.get(column)) for column in columns)


def map_kwargs(dataset, desc: str, num_proc: int | None = None) -> dict:
    """Options for `dataset.map` / `dataset.filter`: a progress label and processes (an `IterableDataset` takes
    neither)."""
    return {"num_proc": num_proc, "desc": desc} if isinstance(dataset, Dataset) else {}


def first_row(dataset, name: str) -> dict:
    """The dataset's first row (the format is read from it); `DataError` when it has no rows."""
    for row in dataset:
        return row
    raise DataError(f"The {name} dataset has no rows; nothing to train on.")


def dataset_columns(dataset, name: str) -> list[str]:
    """The dataset's columns: an `IterableDataset` whose features are unknown gives its first row's."""
    return dataset.column_names if dataset.column_names is not None else list(first_row(dataset, name))


def check_columns(dataset, name: str, required: Sequence[str]) -> None:
    columns = dataset_columns(dataset, name)
    missing = [column for column in required if column not in columns]
    if missing:
        raise DataError(f"The {name} dataset has no column {missing} (its columns: {columns}).")


def extract_implicit_prompt(dataset, name: str, num_proc=None):
    """`chosen`/`rejected` that both start with the prompt (TRL's implicit-prompt format) get a `prompt` column."""
    if "prompt" in (dataset.column_names or []):
        return dataset
    check_columns(dataset, name, ["chosen", "rejected"])
    conversational = is_conversational_row(first_row(dataset, name), ["chosen", "rejected"])

    def checked_extract(row, index):
        for column in ("chosen", "rejected"):
            check_value(row[column], f"{name} dataset, row {index}, column '{column}'", conversational=conversational)
        return extract_prompt(row)

    kwargs = map_kwargs(dataset, f"Extracting prompt from {name}", num_proc)
    return dataset.map(checked_extract, with_indices=True, **kwargs)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_template_kwargs(row: dict) -> dict:
    """The row's `tools` (a list, or its JSON string) and `chat_template_kwargs`, for `apply_chat_template`."""
    tools = row.get("tools")
    return {"tools": json.loads(tools) if isinstance(tools, str) else tools, **(row.get("chat_template_kwargs") or {})}


# What a chat template raises on messages it cannot render: its own `raise_exception` (a role or a turn order it
# refuses) and other template errors, or a TypeError (content it cannot concatenate, such as a list of parts).
TEMPLATE_ERRORS = (TemplateError, TypeError)


def apply_chat_template(tokenizer, messages: list, where: str, **kwargs) -> dict:
    """`tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)`, raising `DataError`
    naming `where` when the template cannot render the messages."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except TEMPLATE_ERRORS as error:
        raise DataError(
            f"{where}: the tokenizer's chat template cannot render these messages ({type(error).__name__}: {error})."
        ) from error


def _render_ids(tokenizer, value, where: str, *, conversational: bool, template_kwargs: dict,
                add_generation_prompt: bool = False) -> list[int]:
    if conversational:
        rendered = apply_chat_template(
            tokenizer, value, where, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
        return list(rendered["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def tokenize_prompt_completions(
    tokenizer, row: dict, completion_columns: Sequence[str], where: str, *, conversational: bool,
    append_eos: bool = True,
) -> dict[str, list[int]]:
    """Tokenizes `prompt` and each `prompt + completion` exactly as TRL does, so ids match token for token.

    Standard text gets the eos token appended to each completion that lacks it (not with `append_eos=False`: for a
    completion the model goes on from, such as a belief that precedes its response). The prompt is the longest prefix
    shared by the tokenized prompt and every tokenized prompt+completion (BPE can merge across the boundary, and some
    chat templates render a lone prompt differently); each completion is the rest. A chat template that cannot
    render the row raises `DataError` naming `where` (the row) and the column.
    Returns `prompt_ids` and `{column}_ids` for each completion column."""
    template_kwargs = chat_template_kwargs(row)
    prompt = row["prompt"]
    prompt_ids = _render_ids(tokenizer, prompt, f"{where}, column 'prompt'", conversational=conversational,
                             template_kwargs=template_kwargs, add_generation_prompt=True)
    full_ids = {}
    for column in completion_columns:
        completion = row[column]
        if append_eos and not conversational and not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        full_ids[column] = _render_ids(tokenizer, prompt + completion, f"{where}, column '{column}'",
                                       conversational=conversational, template_kwargs=template_kwargs)
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids.values())
    out = {"prompt_ids": prompt_ids[:prompt_len]}
    for column, ids in full_ids.items():
        out[f"{column}_ids"] = ids[prompt_len:]
    return out


def tokenize_sequence(
    tokenizer, row: dict, value, *, conversational: bool, assistant_masks: bool = False, where: str = "the messages"
) -> dict:
    """Token ids of one whole sequence, as TRL's SFT and reward trainers tokenize it: a string gets the eos token
    appended when it lacks it and goes through the tokenizer; a message list goes through the chat template with the
    row's `tools` and `chat_template_kwargs` (a template that cannot render it raises `DataError` naming `where`, the
    row and column). Returns `{"input_ids": [...]}`, plus, with `assistant_masks` (conversational only), the
    template's `assistant_masks`: 1 on tokens inside its `{% generation %}` markers."""
    if not conversational:
        if not value.endswith(tokenizer.eos_token):
            value = value + tokenizer.eos_token
        return {"input_ids": list(tokenizer(text=value)["input_ids"])}
    rendered = apply_chat_template(
        tokenizer, value, where, return_assistant_tokens_mask=assistant_masks, **chat_template_kwargs(row)
    )
    out = {"input_ids": list(rendered["input_ids"])}
    if assistant_masks:
        out["assistant_masks"] = list(rendered["assistant_masks"])
    return out


def tokenize_dataset(
    dataset,
    tokenizer,
    name: str,
    *,
    text_columns: Sequence[str],
    completion_columns: Sequence[str],
    keep_columns: Sequence[str] = (),
    num_proc: int | None = None,
):
    """Checks every row, then tokenizes `prompt` + each completion column (see `tokenize_prompt_completions`).

    `text_columns` (prompt and completions) must each hold a non-empty string or message list, all in one format
    across the dataset. Keeps `keep_columns` (labels, precomputed values) and drops the rest."""
    check_columns(dataset, name, list(text_columns) + list(keep_columns))
    first = first_row(dataset, name)
    conversational = is_conversational_row(first, text_columns)

    def process(row, index):
        where = f"{name} dataset, row {index}"
        for column in text_columns:
            check_value(row[column], f"{where}, column '{column}'", conversational=conversational)
        return tokenize_prompt_completions(tokenizer, row, completion_columns, where, conversational=conversational)

    remove = [c for c in (dataset.column_names or first.keys()) if c not in keep_columns]
    kwargs = map_kwargs(dataset, f"Tokenizing {name}", num_proc)
    return dataset.map(process, with_indices=True, remove_columns=remove, **kwargs)


def drop_rows(dataset, name: str, keep, reason: str, num_proc=None):
    """Drops the rows of `dataset` where `keep(row)` is false, logs how many and why (`reason`), and raises
    `DataError` when no row is left. An `IterableDataset` is returned as is (its rows are not counted up front).
    Returns `(dataset, dropped)`."""
    if not isinstance(dataset, Dataset):
        return dataset, 0
    before = len(dataset)
    dataset = dataset.filter(keep, **map_kwargs(dataset, f"Dropping rows of {name}", num_proc))
    dropped = before - len(dataset)
    if dropped:
        logger.warning("Dropped %d of %d rows of the %s dataset: %s.", dropped, before, name, reason)
    if len(dataset) == 0:
        raise DataError(f"Every row of the {name} dataset was dropped ({reason}); nothing is left to train on.")
    return dataset, dropped


def drop_overlong_prompts(dataset, name: str, max_length: int | None, truncation_mode: str, num_proc=None):
    """Rows whose prompt alone fills `max_length` would keep no completion token: they are dropped, and the count is
    logged and returned. An empty result is an error. Returns `(dataset, dropped)`."""
    if max_length is None or truncation_mode != "keep_start":
        return dataset, 0
    reason = f"their prompt alone is >= max_length={max_length} tokens; raise `max_length` or shorten the prompts"
    return drop_rows(dataset, name, lambda row: len(row["prompt_ids"]) < max_length, reason, num_proc)


def truncate(ids: list, max_length: int | None, truncation_mode: str) -> list:
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[:max_length] if truncation_mode == "keep_start" else ids[-max_length:]


def pad(sequences: Sequence[torch.Tensor], padding_value, pad_to_multiple_of: int | None = None) -> torch.Tensor:
    """Right-pads 1-D tensors to one `[N, T]` tensor."""
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(sequences), length), padding_value, dtype=sequences[0].dtype)
    for i, sequence in enumerate(sequences):
        out[i, : len(sequence)] = sequence
    return out


def truncate_prompt_completion(prompt: Sequence[int], completion: Sequence[int], max_length: int | None,
                               truncation_mode: str) -> tuple[list[int], list[int]]:
    """`prompt + completion` truncated to `max_length` as one sequence (TRL's collators), split back into its prompt
    and completion parts."""
    ids = truncate(list(prompt) + list(completion), max_length, truncation_mode)
    completion_length = min(len(completion), len(ids) - len(prompt) if truncation_mode == "keep_start" else len(ids))
    return ids[: len(ids) - completion_length], ids[len(ids) - completion_length :]


def collate_prompt_completions(
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    pad_token_id: int,
    max_length: int | None,
    truncation_mode: str,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `completion_mask` `[N, T]` for rows `prompt + completion`, each truncated to
    `max_length` first (as TRL's collators do) and right-padded."""
    ids, masks = [], []
    for prompt, completion in zip(prompt_ids, completion_ids):
        prompt, completion = truncate_prompt_completion(prompt, completion, max_length, truncation_mode)
        ids.append(torch.tensor(prompt + completion))
        masks.append(torch.tensor([0] * len(prompt) + [1] * len(completion)))
    return {
        "input_ids": pad(ids, pad_token_id, pad_to_multiple_of),
        "attention_mask": pad([torch.ones_like(i) for i in ids], 0, pad_to_multiple_of),
        "completion_mask": pad(masks, 0, pad_to_multiple_of),
    }


def check_rows(dataset, name: str, columns: Sequence[str], num_proc: int | None = None):
    """Checks, without tokenizing, that each row's `columns` hold a non-empty string or message list, in one format
    across the dataset; raises `DataError` naming the row and the column. Returns the dataset (an `IterableDataset`
    is checked as it is read)."""
    check_columns(dataset, name, list(columns))
    conversational = is_conversational_row(first_row(dataset, name), columns)

    def check(row, index):
        for column in columns:
            check_value(row[column], f"{name} dataset, row {index}, column '{column}'", conversational=conversational)
        return {}

    return dataset.map(check, with_indices=True, **map_kwargs(dataset, f"Checking {name}", num_proc))


def check_prompts(dataset, name: str, tokenizer, num_proc: int | None = None, template_kwargs: dict | None = None):
    """`check_rows` for the `prompt` column of an online trainer's dataset, plus what it needs from the tokenizer:
    the chat template must render each message list as generation will (with the generation prompt and
    `template_kwargs`), so that a row it cannot render fails here, not in the middle of training. Returns the
    dataset."""
    dataset = check_rows(dataset, name, ("prompt",), num_proc)
    if not is_conversational_row(first_row(dataset, name), ["prompt"]):
        return dataset  # a string always tokenizes

    template_kwargs = template_kwargs or {}

    def render(row, index):
        apply_chat_template(tokenizer, row["prompt"], f"{name} dataset, row {index}, column 'prompt'",
                            add_generation_prompt=True, **template_kwargs)
        return {}

    return dataset.map(render, with_indices=True, **map_kwargs(dataset, f"Rendering the prompts of {name}", num_proc))
