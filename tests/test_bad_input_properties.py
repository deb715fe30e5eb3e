"""Bad input, tried wide: hypothesis feeds the dataset pipeline of every trainer random datasets that mix valid rows
with malformed ones (missing keys, None, numbers, lists or dicts where text is expected, empty or blank text, unusual
unicode, over-long prompts, messages with unknown roles, missing keys or out of order, wrong labels and margins).

The property, for each pipeline: it either raises `DataError` whose message names the dataset, and, when it names a
row, a row that was generated malformed and a column; or it succeeds, and then no malformed row was accepted, every
row is kept or counted in `dropped_rows` (only over-long or questionable rows may be dropped), and every kept row
holds in-vocabulary token ids, its completions non-empty. Any other exception fails the test.

Each pipeline runs as a trainer's constructor runs it (`trainer.prepare_dataset(dataset, name, args)`), on a trainer
object created without a model: the pipeline reads only the tokenizer (and SFT's `formatting_func`) and writes
`dropped_rows`, and loading a model for every example would cost seconds each. Per-row type mixes (a number in a text
column) come in as `datasets` JSON columns, as `load_dataset("json")` gives them for such files.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass

import pyarrow as pa
import pytest
from datasets import Dataset
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from hf_align import (
    DataError, DistributionalGDPOConfig, DistributionalGDPOTrainer, DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer,
    KTOConfig, KTOTrainer, ORPOConfig, ORPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer, SPINConfig,
    SPINTrainer, StepDPOConfig, StepDPOTrainer,
)
from hf_align.defaults import EOS_TOKEN
from hf_align.generation import encode_prompts
from hf_align.trainers.sft import IGNORE_INDEX

MAX_LENGTH = 96  # tokens: valid rows stay well under it (texts of at most 6 characters), LONG_TEXT exceeds it
LONG_TEXT = " ".join(["overlong"] * MAX_LENGTH)

PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# Row flags. "clean": valid; "long": valid but over-long (may be dropped); "odd": questionable (a role out of the
# usual order, an empty message): may be rejected, dropped or kept; "bad": must be rejected.
CLEAN, LONG, ODD, BAD = "clean", "long", "odd", "bad"
ROW_FLAGS = st.sampled_from([CLEAN] * 5 + [BAD] * 2 + [LONG, ODD])

# -- values ----------------------------------------------------------------------------------------------------------
UNUSUAL_TEXTS = ["Hi", "مرحبا", "שלום", "🙂👍🏽", "a\x00b", "\u200b", "e\u0301", "<|im_end|>", "<|endoftext|>",
                 "x\r\ny", "Ωç√"]


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# Texts that are JSON ("0", "null") are left out: a `datasets` JSON column reads them back as what they encode.
TEXT = st.one_of(
    st.sampled_from(UNUSUAL_TEXTS),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=6).filter(
        lambda text: text.strip() and not is_json(text)
    ),
)
BAD_TEXT = st.one_of(
    st.sampled_from([None, "", " ", "\n\t ", 0, 7, 2.5, True, ["a", "list"], {"a": "dict"}, []]),
    st.integers(-(2**31), 2**31), st.lists(TEXT, max_size=2),
)


def message(role, content) -> dict:
    return {"role": role, "content": content}


def messages(*roles, content=TEXT):
    return st.tuples(*(st.builds(message, st.just(role), content) for role in roles)).map(list)


BAD_MESSAGE = st.one_of(
    st.builds(message, st.sampled_from(["bot", "human", "", "User", None, 3]), TEXT),
    st.builds(message, st.just("user"), st.sampled_from([None, 3, {"text": "x"}, ["a part"]])),
    st.sampled_from([{"role": "user"}, {"content": "hi"}, {}, "a bare string", None, 5, ["user", "hi"]]),
)
PARTS = [{"type": "text", "text": "Hi"}]  # multimodal content parts: the text-only ChatML template cannot render them
ODD_MESSAGE = st.one_of(
    st.builds(message, st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["", " "])),
    st.builds(message, st.just("user"), st.just(PARTS)),
)


@st.composite
def bad_messages(draw, valid):
    """A malformed value for a message-list column whose valid values come from `valid`."""
    kind = draw(st.sampled_from(["empty", "not a list", "bad message"]))
    if kind == "empty":
        return []
    if kind == "not a list":
        return draw(st.sampled_from([None, 3, {"role": "user", "content": "hi"}]))
    value = draw(valid)
    value.insert(draw(st.integers(0, len(value))), draw(BAD_MESSAGE))
    return value


@st.composite
def odd_messages(draw, valid, out_of_order):
    """A questionable value: roles out of the usual order, a valid list with an odd message in it, or text (which
    makes a dataset of mixed formats, or of text if every row has it)."""
    kind = draw(st.sampled_from(["out of order", "odd message", "text"]))
    if kind == "out of order":
        return draw(out_of_order)
    if kind == "text":
        return draw(TEXT)
    value = draw(valid)
    value[draw(st.integers(0, len(value) - 1))] = draw(ODD_MESSAGE)
    return value


@dataclass(frozen=True)
class Kind:
    """The values of one kind of column: valid, malformed (`bad`), questionable (`odd`) and over-long ones."""

    valid: st.SearchStrategy
    bad: st.SearchStrategy
    odd: st.SearchStrategy | None = None
    long: st.SearchStrategy | None = None


# A message list in a text column makes a dataset of mixed formats, or a conversational one if every row has it.
TEXT_AS_MESSAGES = st.just([message("user", "hi")])
TEXT_KIND = Kind(TEXT, BAD_TEXT, odd=TEXT_AS_MESSAGES)
TEXT_MAYBE_LONG = Kind(TEXT, BAD_TEXT, odd=TEXT_AS_MESSAGES, long=st.just(LONG_TEXT))
_PROMPT = st.one_of(messages("user"), messages("system", "user"))
PROMPT_MESSAGES = Kind(
    _PROMPT, bad_messages(_PROMPT),
    odd=odd_messages(_PROMPT, st.one_of(messages("assistant"), messages("system"), messages("user", "assistant"))),
    long=messages("user", content=st.just(LONG_TEXT)),
)
_COMPLETION = messages("assistant")
COMPLETION_MESSAGES = Kind(
    _COMPLETION, bad_messages(_COMPLETION),
    odd=odd_messages(_COMPLETION, st.one_of(messages("user"), messages("system"), messages("assistant", "user"))),
)
_CONVERSATION = st.one_of(messages("user", "assistant"), messages("system", "user", "assistant"))
CONVERSATION = Kind(
    _CONVERSATION, bad_messages(_CONVERSATION),
    odd=odd_messages(_CONVERSATION, st.one_of(messages("assistant", "user"), messages("user"),
                                              messages("user", "user", "assistant"))),
    long=messages("user", "assistant", content=st.just(LONG_TEXT)),
)
STEPS = Kind(st.one_of(st.just(""), TEXT), st.sampled_from([None, 0, 2.5, ["a step"], {"a": "dict"}]))
LABEL = Kind(st.booleans(), st.sampled_from([None, "yes", "True", 2, -1, 0.5, [True], {"a": 1}]),
             odd=st.sampled_from([0, 1, 0.0, 1.0]))
# True is no bad margin here: a column of floats stores it as 1.0.
MARGIN = Kind(st.floats(-3, 3), st.sampled_from([None, math.nan, math.inf, -math.inf, "high", [1.0]]))


# -- rows and datasets -----------------------------------------------------------------------------------------------
@dataclass
class Case:
    """A generated dataset: its rows, each row's flag, and its columns. A key missing from a row is None there, as
    `load_dataset("json")` reads it."""

    rows: list[dict]
    flags: list[str]
    columns: tuple[str, ...]

    def dataset(self) -> Dataset:
        return Dataset.from_dict({column: [row.get(column) for row in self.rows] for column in self.columns},
                                 on_mixed_types="use_json")


def corrupt(draw, row: dict, kinds: dict[str, Kind], flag: str) -> str:
    """Applies `flag` to one column of the valid `row` (in place); returns the flag that holds afterwards ("clean"
    when the row has no column of that sort)."""
    if flag == BAD:
        column = draw(st.sampled_from(sorted(kinds)))
        if draw(st.integers(0, 4)) == 0:
            del row[column]
        else:
            row[column] = draw(kinds[column].bad)
        return BAD
    if flag == CLEAN:
        return CLEAN
    candidates = sorted(column for column, kind in kinds.items() if getattr(kind, flag) is not None)
    if not candidates:
        return CLEAN
    column = draw(st.sampled_from(candidates))
    row[column] = draw(getattr(kinds[column], flag))
    return flag


@st.composite
def plain_rows(draw, kinds: dict[str, Kind]):
    """`(row, flag)`: a row whose columns are independent values of the given kinds, then corrupted per its flag."""
    row = {column: draw(kind.valid) for column, kind in kinds.items()}
    return row, corrupt(draw, row, kinds, draw(ROW_FLAGS))


@st.composite
def implicit_prompt_rows(draw, conversational: bool):
    """`(row, flag)`: `chosen`/`rejected` that both start with the prompt (TRL's implicit-prompt format). Valid
    completions start differently, as real pairs do, so the extracted prompt is the one generated."""
    flag = draw(ROW_FLAGS)
    chosen, rejected = "+" + draw(TEXT), "-" + draw(TEXT)
    if conversational:
        prompt = draw(PROMPT_MESSAGES.long if flag == LONG else _PROMPT)
        row = {"chosen": prompt + [message("assistant", chosen)], "rejected": prompt + [message("assistant", rejected)]}
        kinds = {"chosen": CONVERSATION, "rejected": CONVERSATION}
    else:
        prompt = LONG_TEXT if flag == LONG else draw(TEXT)
        row = {"chosen": prompt + chosen, "rejected": prompt + rejected}
        kinds = {"chosen": TEXT_KIND, "rejected": TEXT_KIND}
    if flag == ODD:  # nothing shared: the prompt extracted is empty
        row["rejected"] = [message("system", "other")] + row["rejected"] if conversational else "\t" + rejected
    return row, flag if flag in (LONG, ODD) else corrupt(draw, row, kinds, flag)


@st.composite
def belief_rows(draw):
    """`(row, flag)`: a distributional GDPO row, then corrupted: the belief columns get malformations of their own."""
    beliefs = draw(st.lists(st.sampled_from(["Yes.", "No.", "Unsure.", "Agree.\n", "Disagree.\n"]), min_size=2,
                            max_size=3, unique=True))
    weights = draw(st.lists(st.integers(1, 5), min_size=len(beliefs), max_size=len(beliefs)))
    row = {"prompt": draw(TEXT), "beliefs": beliefs, "belief_distribution": [w / sum(weights) for w in weights],
           "belief": draw(st.sampled_from(beliefs)), "chosen": draw(TEXT), "rejected": draw(TEXT)}
    text_kinds = {"prompt": TEXT_MAYBE_LONG, "belief": TEXT_KIND, "chosen": TEXT_KIND, "rejected": TEXT_KIND}
    flag = draw(ROW_FLAGS)
    if flag == BAD and draw(st.booleans()):
        column, value = draw(st.sampled_from([
            ("beliefs", "Yes."), ("beliefs", ["Yes."]), ("beliefs", beliefs + [beliefs[0]]),
            ("beliefs", [beliefs[0], beliefs[0] + "."]), ("beliefs", beliefs[:-1] + [None]),
            ("beliefs", beliefs[:-1] + [""]), ("belief_distribution", row["belief_distribution"][:-1]),
            ("belief_distribution", [-1.0] + row["belief_distribution"][1:]),
            ("belief_distribution", [math.nan] * len(beliefs)), ("belief_distribution", [None] * len(beliefs)),
            ("belief_distribution", [0.9] * len(beliefs)), ("belief_distribution", "uniform"),
            ("belief", "Not a candidate."),
        ]))
        row[column] = value
        if column == "beliefs":
            row["belief_distribution"] = [1 / len(value)] * len(value) if isinstance(value, list) else [1.0]
        return row, BAD
    if flag == BAD and draw(st.booleans()):  # the row's belief held by no one
        row["belief_distribution"] = [0.0 if b == row["belief"] else 1 / (len(beliefs) - 1) for b in beliefs]
        return row, BAD
    return row, corrupt(draw, row, text_kinds, flag)


@st.composite
def cases(draw, rows, columns: tuple[str, ...], optional: tuple[str, ...] = ()):
    """A `Case` of 1 to 6 rows drawn from `rows` (or none, now and then). Now and then a column is missing from the
    dataset, which makes every row malformed, or questionable for an `optional` column (the dataset may be another
    valid format then)."""
    drawn = draw(st.lists(rows, min_size=1, max_size=6)) if draw(st.integers(0, 19)) else []
    case = Case([row for row, _ in drawn], [flag for _, flag in drawn], columns)
    if case.rows and draw(st.integers(0, 9)) == 0:
        missing = draw(st.sampled_from(columns))
        case.columns = tuple(column for column in columns if column != missing)
        case.flags = [ODD if missing in optional else BAD] * len(case.rows)
    return case


def formats(optional: tuple[str, ...] = (), **kinds_by_format: dict[str, Kind]) -> dict[str, st.SearchStrategy]:
    return {name: cases(plain_rows(kinds), tuple(kinds), optional) for name, kinds in kinds_by_format.items()}


PREFERENCE_FORMATS = {
    **formats(
        optional=("prompt",),  # without it, chosen and rejected may share an implicit prompt
        standard={"prompt": TEXT_MAYBE_LONG, "chosen": TEXT_KIND, "rejected": TEXT_KIND},
        conversational={"prompt": PROMPT_MESSAGES, "chosen": COMPLETION_MESSAGES, "rejected": COMPLETION_MESSAGES},
    ),
    "standard, implicit prompt": cases(implicit_prompt_rows(False), ("chosen", "rejected")),
    "conversational, implicit prompt": cases(implicit_prompt_rows(True), ("chosen", "rejected")),
}
UNPAIRED_FORMATS = formats(
    standard={"prompt": TEXT_MAYBE_LONG, "completion": TEXT_KIND, "label": LABEL},
    conversational={"prompt": PROMPT_MESSAGES, "completion": COMPLETION_MESSAGES, "label": LABEL},
)
SFT_FORMATS = formats(
    # The eos token alone is one token, which nothing predicts: no token to train on.
    text={"text": Kind(TEXT.filter(lambda text: text != EOS_TOKEN), BAD_TEXT, odd=st.just(EOS_TOKEN),
                       long=st.just(LONG_TEXT))},
    messages={"messages": CONVERSATION},
    prompt_completion={"prompt": TEXT_MAYBE_LONG, "completion": TEXT_KIND},
    conversational_prompt_completion={"prompt": PROMPT_MESSAGES, "completion": COMPLETION_MESSAGES},
)
REWARD_FORMATS = formats(
    optional=("prompt", "margin"),
    standard={"prompt": TEXT_MAYBE_LONG, "chosen": TEXT_MAYBE_LONG, "rejected": TEXT_KIND},
    standard_implicit={"chosen": TEXT_MAYBE_LONG, "rejected": TEXT_KIND, "margin": MARGIN},
    conversational={"prompt": PROMPT_MESSAGES, "chosen": COMPLETION_MESSAGES, "rejected": COMPLETION_MESSAGES},
    conversational_implicit={"chosen": CONVERSATION, "rejected": CONVERSATION, "margin": MARGIN},
)
STEP_FORMATS = formats(
    standard={"prompt": TEXT_MAYBE_LONG, "initial_reason_steps": STEPS, "chosen": TEXT_KIND, "rejected": TEXT_KIND},
    conversational={"prompt": Kind(messages("user"), bad_messages(messages("user")),
                                   odd=st.one_of(messages("user", "assistant"), messages("system")),
                                   long=messages("user", content=st.just(LONG_TEXT))),
                    "initial_reason_steps": STEPS, "chosen": TEXT_KIND, "rejected": TEXT_KIND},
)
SPIN_FORMATS = formats(
    prompt_completion={"prompt": TEXT_MAYBE_LONG, "completion": TEXT_KIND},
    conversational={"prompt": PROMPT_MESSAGES, "completion": COMPLETION_MESSAGES},
    messages={"messages": CONVERSATION},
)
PROMPT_FORMATS = formats(
    standard={"prompt": TEXT_MAYBE_LONG},
    conversational={"prompt": PROMPT_MESSAGES},
)


# -- running a pipeline and checking the outcome ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def make_args(tmp_path_factory):
    """`make_args(config_class, **fields)`: a Config with `max_length=MAX_LENGTH`, built once per set of fields."""
    output_dir = str(tmp_path_factory.mktemp("bad-input"))

    @functools.cache
    def make(config_class, **fields):
        return config_class(output_dir=output_dir, max_length=MAX_LENGTH, report_to="none", **fields)

    return make


def prepare(trainer_class, args, tokenizer, dataset, name: str):
    """`(prepared dataset, rows dropped)` of `trainer_class`'s pipeline, as its constructor runs it."""
    trainer = object.__new__(trainer_class)  # no model: see the module docstring
    trainer.tokenizer, trainer.dropped_rows, trainer.formatting_func = tokenizer, {}, None
    prepared = trainer.prepare_dataset(dataset, name, args)
    return prepared, trainer.dropped_rows.get(name, 0)


def check_ids(tokenizer, row: dict, *columns: str, may_be_empty: bool = False) -> None:
    for column in columns:
        ids = row[column]
        assert ids or may_be_empty, f"{column} is empty"
        assert all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids), f"{column} holds bad ids: {ids}"


def run_and_check(trainer_class, args, tokenizer, case: Case, name: str, check_row, rows_per_input: int = 1):
    """Runs the pipeline on `case` and checks the property (module docstring); `check_row(row)` checks a kept row."""
    flags = case.flags * rows_per_input  # KTO unpairs n pairs into n chosen rows, then n rejected rows
    try:
        dataset = case.dataset()
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a mix of types no `datasets` column holds: no dataset to test
        reject()
    try:
        prepared, dropped = prepare(trainer_class, args, tokenizer, dataset, name)
    except DataError as error:
        message = str(error)
        assert f"{name} dataset" in message, message
        row = re.search(r"\brow (\d+)\b", message)
        event("DataError naming a row" if row else "DataError about the dataset")
        if row is None:  # about the whole dataset: a missing column, no rows, every row dropped
            assert set(flags) != {CLEAN}, f"a valid dataset was refused: {message}"
        else:
            # The format (text or messages) is the first row's, as in TRL: when that row has the other format, the
            # first valid row is the one that does not match.
            mismatch = flags[0] in (BAD, ODD) and re.search(r"expected a (string|non-empty list of messages)", message)
            assert flags[int(row[1])] in (BAD, ODD) or mismatch, f"a valid row was blamed: {message}"
            assert re.search(r"\bcolumns? '\w+'", message), f"no column named: {message}"
        return
    event("prepared, rows dropped" if dropped else "prepared")
    assert BAD not in case.flags, "a malformed row was accepted"
    assert len(prepared) + dropped == len(flags), "rows went missing without being counted"
    assert dropped <= flags.count(LONG) + flags.count(ODD), "a valid row that is not over-long was dropped"
    for row in prepared:
        check_row(tokenizer, row)


NAMES = st.sampled_from(["train", "eval"])


# -- the properties, one per family of data formats ------------------------------------------------------------------
def check_pair(tokenizer, row):
    # A prompt whose tokens all merge with the completion's first one is left empty, as TRL leaves it ("f" + "f").
    check_ids(tokenizer, row, "prompt_ids", may_be_empty=True)
    check_ids(tokenizer, row, "chosen_ids", "rejected_ids")


@pytest.mark.parametrize("trainer_class, config_class", [(DPOTrainer, DPOConfig), (ORPOTrainer, ORPOConfig)])
@pytest.mark.parametrize("data_format", sorted(PREFERENCE_FORMATS))
@given(data=st.data(), name=NAMES)
@PROPERTY_SETTINGS
def test_preference_pairs(trainer_class, config_class, data_format, tokenizer, make_args, data, name):
    """DPO (and IPO, and SPIN's rounds, which prepare their pairs as DPO does), ORPO (and SimPO, whose pipeline is
    ORPO's)."""
    case = data.draw(PREFERENCE_FORMATS[data_format], label="case")
    run_and_check(trainer_class, make_args(config_class), tokenizer, case, name, check_pair)


def check_unpaired(tokenizer, row):
    check_ids(tokenizer, row, "prompt_ids", may_be_empty=True)  # see `check_pair`
    check_ids(tokenizer, row, "completion_ids", "KL_completion_ids")
    assert isinstance(row["label"], bool), row["label"]


@pytest.mark.parametrize("data_format", sorted(UNPAIRED_FORMATS) + [f"paired {f}" for f in sorted(PREFERENCE_FORMATS)])
@given(data=st.data(), name=NAMES)
@PROPERTY_SETTINGS
def test_kto_rows(data_format, tokenizer, make_args, data, name):
    """KTO: `prompt`/`completion`/`label` rows, or pairs that it unpairs into two rows each."""
    paired = data_format.startswith("paired ")
    formats = PREFERENCE_FORMATS if paired else UNPAIRED_FORMATS
    case = data.draw(formats[data_format.removeprefix("paired ")], label="case")
    args = make_args(KTOConfig, per_device_train_batch_size=2)
    run_and_check(KTOTrainer, args, tokenizer, case, name, check_unpaired, rows_per_input=2 if paired else 1)


def check_sft(tokenizer, row):
    check_ids(tokenizer, row, "input_ids")
    assert len(row["labels"]) == len(row["input_ids"]) <= MAX_LENGTH
    assert any(label != IGNORE_INDEX for label in row["labels"][1:]), "no trained token"


@pytest.mark.parametrize("data_format", sorted(SFT_FORMATS))
@given(data=st.data(), name=NAMES)
@PROPERTY_SETTINGS
def test_sft_rows(data_format, tokenizer, make_args, data, name):
    case = data.draw(SFT_FORMATS[data_format], label="case")
    run_and_check(SFTTrainer, make_args(SFTConfig), tokenizer, case, name, check_sft)


def check_reward_pair(tokenizer, row):
    check_ids(tokenizer, row, "chosen_ids", "rejected_ids")
    assert len(row["chosen_ids"]) <= MAX_LENGTH and len(row["rejected_ids"]) <= MAX_LENGTH
    assert "margin" not in row or math.isfinite(row["margin"])


@pytest.mark.parametrize("data_format", sorted(REWARD_FORMATS))
@given(data=st.data(), name=NAMES)
@PROPERTY_SETTINGS
def test_reward_pairs(data_format, tokenizer, make_args, data, name):
    case = data.draw(REWARD_FORMATS[data_format], label="case")
    run_and_check(RewardTrainer, make_args(RewardConfig), tokenizer, case, name, check_reward_pair)


@pytest.mark.parametrize("data_format", sorted(STEP_FORMATS))
@given(data=st.data(), name=NAMES)
@PROPERTY_SETTINGS
def test_step_dpo_rows(data_format, tokenizer, make_args, data, name):
    case = data.draw(STEP_FORMATS[data_format], label="case")
    run_and_check(StepDPOTrainer, make_args(StepDPOConfig), tokenizer, case, name, check_pair)


def check_belief_row(tokenizer, row):
    check_pair(tokenizer, row)
    check_ids(tokenizer, row, "belief_prompt_ids", may_be_empty=True)
    for ids in row["belief_ids"]:
        check_ids(tokenizer, {"belief_ids": ids}, "belief_ids")
    assert math.isclose(sum(row["belief_distribution"]), 1, rel_tol=1e-6)
    assert 0 <= row["belief_index"] < len(row["belief_ids"])


@given(data=st.data(), name=NAMES)
@PROPERTY_SETTINGS
def test_distributional_gdpo_rows(tokenizer, make_args, data, name):
    columns = ("prompt", "beliefs", "belief_distribution", "belief", "chosen", "rejected")
    case = data.draw(cases(belief_rows(), columns), label="case")
    args = make_args(DistributionalGDPOConfig)
    run_and_check(DistributionalGDPOTrainer, args, tokenizer, case, name, check_belief_row)


def check_prompt(tokenizer, row):
    """The prompt renders as generation renders it, into in-vocabulary ids."""
    check_ids(tokenizer, {"prompt": encode_prompts(tokenizer, [row["prompt"]])[0]}, "prompt")


@pytest.mark.parametrize("data_format", sorted(SPIN_FORMATS))
@given(data=st.data(), name=NAMES)
@PROPERTY_SETTINGS
def test_spin_rows(data_format, tokenizer, make_args, data, name):
    """SPIN keeps its SFT rows as `prompt`/`completion` until each round samples from the prompts."""
    case = data.draw(SPIN_FORMATS[data_format], label="case")
    run_and_check(SPINTrainer, make_args(SPINConfig), tokenizer, case, name, check_prompt)


@pytest.mark.parametrize("data_format", sorted(PROMPT_FORMATS))
@given(data=st.data(), name=NAMES)
@PROPERTY_SETTINGS
def test_online_prompts(data_format, tokenizer, make_args, data, name):
    """Every online trainer (GRPO, RLOO, ReMax, REINFORCE, PPO, TRPO, Online DPO, ...) prepares its prompts this way."""
    case = data.draw(PROMPT_FORMATS[data_format], label="case")
    run_and_check(GRPOTrainer, make_args(GRPOConfig), tokenizer, case, name, check_prompt)


# -- what the properties found, pinned -------------------------------------------------------------------------------
def _pair(chosen_content="Sure."):
    return {"prompt": [message("user", "Hi?")], "chosen": [message("assistant", chosen_content)],
            "rejected": [message("assistant", "No.")]}


FOUND = {
    "no rows": (DPOTrainer, DPOConfig, {"prompt": [], "chosen": [], "rejected": []}, r"train dataset has no rows"),
    "content parts in a completion": (
        DPOTrainer, DPOConfig,
        {"prompt": [_pair()["prompt"]] * 2, "chosen": [_pair()["chosen"], _pair(PARTS)["chosen"]],
         "rejected": [_pair()["rejected"]] * 2},
        r"train dataset, row 1, column 'chosen': the tokenizer's chat template cannot render",
    ),
    "content parts in an online prompt": (
        GRPOTrainer, GRPOConfig, {"prompt": [[message("user", "Hi")], [message("user", PARTS)]]},
        r"train dataset, row 1, column 'prompt': the tokenizer's chat template cannot render",
    ),
    "content parts in a SPIN prompt": (
        SPINTrainer, SPINConfig, {"prompt": [[message("user", PARTS)]], "completion": [[message("assistant", "Hi")]]},
        r"train dataset, row 0, column 'prompt': the tokenizer's chat template cannot render",
    ),
    "a string first in a messages column": (
        SFTTrainer, SFTConfig, {"messages": ["Hi", [message("user", "Hi"), message("assistant", "Hello")]]},
        r"train dataset, row 0, column 'messages': expected a non-empty list of messages",
    ),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_found_bad_inputs_raise_data_errors(case, tokenizer, make_args):
    trainer_class, config_class, columns, match = FOUND[case]
    dataset = Dataset.from_dict(columns, on_mixed_types="use_json")
    with pytest.raises(DataError, match=match):
        prepare(trainer_class, make_args(config_class), tokenizer, dataset, "train")


def test_a_template_that_refuses_a_role_gives_a_data_error(tiny_model_path, make_args):
    """A chat template's own `raise_exception` (here: no system turns) names the row, not a jinja traceback."""
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tiny_model_path)
    refuse_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('No system turns.') }}{% endif %}"
    strict.chat_template = refuse_system + strict.chat_template
    rows = [_pair(), {**_pair(), "prompt": [message("system", "Be brief."), message("user", "Hi?")]}]
    with pytest.raises(DataError, match=r"row 1, column 'prompt'.*No system turns"):
        prepare(DPOTrainer, make_args(DPOConfig), strict, Dataset.from_list(rows), "train")


def test_numeric_kto_labels_are_stored_as_bools(tokenizer, make_args):
    rows = [{"prompt": "Hi?", "completion": " Sure.", "label": label} for label in (1.0, 0.0, 1.0)]
    prepared, _ = prepare(KTOTrainer, make_args(KTOConfig, per_device_train_batch_size=2), tokenizer,
                          Dataset.from_list(rows), "train")
    assert prepared["label"][:] == [True, False, True]
