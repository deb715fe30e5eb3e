"""Which trainer fits my data? `recommend(dataset)` reads a dataset's column names and the types of their values and
returns the hf_align trainers that can train on it, best first, each with why, the columns it needs and a few
Config settings to start from. Trainers hf_align does not have yet are listed as planned (`available=False`),
checked against `hf_align.__all__` at call time.

    python -m hf_align.advisor trl-lib/ultrafeedback_binarized      # a Hub dataset (only its first rows are read)
    python -m hf_align.advisor my_pairs.jsonl                        # a local .json / .jsonl / .parquet / .csv file
    python -m hf_align.advisor belief_preference                     # an embedded dataset

The formats are TRL's (standard text or conversational message lists), plus hf_align's step-wise and belief
columns; see `RECOGNISED_FORMATS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass, field, replace
from itertools import islice

from .data import DataError

# Columns that let a verifier score a sampled completion (math answer equivalence, exact match, code tests).
ANSWER_COLUMNS = ("answer", "solution", "ground_truth", "reference", "target", "final_answer", "tests", "test_cases")
# Common names for TRL's columns, for the hint when nothing is recognised.
COLUMN_ALIASES = {
    "question": "prompt", "instruction": "prompt", "query": "prompt", "input": "prompt",
    "response": "completion", "output": "completion",
    "conversations": "messages", "conversation": "messages", "dialogue": "messages",
    "preferred": "chosen", "better": "chosen", "dispreferred": "rejected", "worse": "rejected",
}
RECOGNISED_FORMATS = (
    "preference pairs: chosen, rejected (+ prompt, or a prompt shared by both), text or message lists"
    " -> DPO, IPO, SimPO, ORPO, reward model",
    "step-wise pairs: prompt, initial_reason_steps, chosen, rejected -> Step-DPO",
    "belief-conditioned pairs: prompt, beliefs, belief_distribution, belief, chosen, rejected -> distributional GDPO",
    "unpaired labels: prompt, completion, label (True/False) -> KTO",
    "SFT data: messages, or text, or prompt + completion -> SFT, then SPIN",
    "prompts for RL: prompt (+ answer / solution / ground_truth / tests for a verifier) -> GRPO, RLOO, ReMax, PPO",
)
SAMPLE_ROWS = 1000  # rows read to learn value types and label balance


@dataclass
class Recommendation:
    """One trainer that fits the data: `trainer` (the class name in hf_align), `why` it fits and when to prefer it,
    the `required_columns` it reads, `config_hints` (fields of its Config to start from) and whether hf_align has it
    now (`available`; False: planned)."""

    trainer: str
    why: str
    required_columns: tuple[str, ...]
    config_hints: dict = field(default_factory=dict)
    available: bool = True

    @property
    def config(self) -> str:
        return self.trainer.removesuffix("Trainer") + "Config"

    def __str__(self) -> str:
        status = "available" if self.available else "planned, not in hf_align yet"
        why = textwrap.fill(self.why, width=110, initial_indent="   why:   ", subsequent_indent=" " * 10)
        lines = [f"{self.trainer} [{status}]", why, f"   needs: {', '.join(self.required_columns)}"]
        if self.config_hints:
            settings = ", ".join(f"{key}={value!r}" for key, value in self.config_hints.items())
            lines.append(f"   start: {self.config}({settings})")
        return "\n".join(lines)


@dataclass
class DatasetProfile:
    """What the advisor sees of a dataset: its columns, the type of each column's values (`value_kind`), sampled
    rows, and the row count when known."""

    columns: list[str]
    kinds: dict[str, str]
    rows: list[dict]
    num_rows: int | None = None
    split: str | None = None

    def has(self, *columns: str) -> bool:
        return all(column in self.kinds for column in columns)

    def text_like(self, column: str) -> bool:
        return self.kinds.get(column) in ("text", "messages")

    def describe(self) -> str:
        return ", ".join(f"{column} ({self.kinds[column]})" for column in self.columns)


def value_kind(value) -> str:
    """"text", "messages", "bool", "number", "text list", "number list", "list", "dict", "none" or "other"."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(item, dict) and "role" in item for item in value):
            return "messages"
        if value and all(isinstance(item, str) for item in value):
            return "text list"
        if value and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
            return "number list"
        return "list"
    return "dict" if isinstance(value, dict) else "other"


def profile_dataset(dataset) -> DatasetProfile:
    """Columns and value kinds of a `Dataset`, `IterableDataset`, `DatasetDict` (its "train" split, else the first)
    or list of dicts; a string is loaded first (see `load_for_advice`)."""
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, str):
        dataset = load_for_advice(dataset)
    split = None
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        if not dataset:
            raise DataError("The DatasetDict has no split.")
        split = "train" if "train" in dataset else next(iter(dataset))
        dataset = dataset[split]
    if isinstance(dataset, list):
        if not all(isinstance(row, dict) for row in dataset):
            raise DataError("A list dataset must hold one dict per row.")
        rows, num_rows = dataset[:SAMPLE_ROWS], len(dataset)
    else:
        rows = list(islice(iter(dataset), SAMPLE_ROWS))
        num_rows = len(dataset) if hasattr(dataset, "__len__") else None
    columns = list(getattr(dataset, "column_names", None) or dict.fromkeys(key for row in rows for key in row))
    if not rows:
        raise DataError(f"The dataset has no rows (columns: {columns}).")
    kinds = {}
    for column in columns:
        values = (row.get(column) for row in rows)
        kinds[column] = next((value_kind(v) for v in values if v is not None), "none")
    return DatasetProfile(columns, kinds, rows, num_rows, split)


# ---------------------------------------------------------------------------------------------------- the rules


def _format(profile: DatasetProfile, column: str) -> str:
    return "conversational (message lists)" if profile.kinds.get(column) == "messages" else "standard text"


def _belief_pairs(profile: DatasetProfile) -> list[Recommendation] | None:
    if not (profile.has("beliefs") or profile.has("belief_distribution")):
        return None
    required = ("prompt", "beliefs", "belief_distribution", "belief", "chosen", "rejected")
    missing = [column for column in required if not profile.has(column)]
    why = ("each row carries a group's belief distribution, a member's belief and responses given it: distributional "
           "GDPO (arXiv 2412.20299) calibrates the model's beliefs to the group's and trains the responses on DPO "
           "given the belief, so minority beliefs are not left behind")
    if missing:
        why += f"; add the missing column(s) {missing}"
    recommendations = [Recommendation("DistributionalGDPOTrainer", why, required, {"beta": 0.1})]
    if profile.has("chosen", "rejected"):
        recommendations.append(Recommendation(
            "DPOTrainer",
            "ignores the distribution: DPO on prompt + belief -> chosen/rejected (append the belief to the prompt). "
            "DPO alone drifts toward the majority belief, the failure GDPO fixes",
            ("prompt", "chosen", "rejected"), {"beta": 0.1},
        ))
    return recommendations


def _step_pairs(profile: DatasetProfile) -> list[Recommendation] | None:
    if not profile.has("initial_reason_steps"):
        return None
    required = ("prompt", "initial_reason_steps", "chosen", "rejected")
    missing = [column for column in required if not profile.has(column)]
    why = ("pairs of next reasoning steps after verified earlier steps: Step-DPO (arXiv 2406.18629) prefers the "
           "correct step to the first wrong one, a denser signal than whole-answer pairs for long reasoning")
    if missing:
        why += f"; add the missing column(s) {missing}"
    return [
        Recommendation("StepDPOTrainer", why, required, {"beta": 0.5, "learning_rate": 5e-7}),
        Recommendation(
            "DPOTrainer", "plain DPO on the same pairs with the steps moved into the prompt (prompt + "
            "initial_reason_steps); Step-DPO does exactly that, with the authors' settings",
            ("prompt", "chosen", "rejected"), {"beta": 0.1},
        ),
    ]


def _preference_pairs(profile: DatasetProfile) -> list[Recommendation] | None:
    if not (profile.text_like("chosen") and profile.text_like("rejected")):
        return None
    implicit = not profile.has("prompt")
    columns = ("chosen", "rejected") if implicit else ("prompt", "chosen", "rejected")
    shape = f"{_format(profile, 'chosen')} preference pairs" + (
        " with the prompt implicit (the shared start of chosen and rejected is taken as the prompt)" if implicit
        else ""
    )
    reward_why = ("a Bradley-Terry reward model from the same pairs, to score samples in online RL (GRPO, RLOO, "
                  "PPO) later")
    if profile.has("margin"):
        reward_why += "; the 'margin' column is used as the required reward gap"
    return [
        Recommendation("DPOTrainer", f"{shape}: DPO (arXiv 2305.18290) is the standard first choice; it needs a "
                       "reference model (a frozen copy, or the adapter disabled with LoRA)", columns, {"beta": 0.1}),
        Recommendation("IPOTrainer", "IPO (arXiv 2310.12036) when DPO overfits or is unstable: near-deterministic "
                       "preferences push DPO's margins without bound, IPO targets a finite margin", columns,
                       {"beta": 0.5}),
        Recommendation("SimPOTrainer", "SimPO (arXiv 2405.14734) when memory is short: no reference model, a "
                       "length-normalised reward with a target margin", columns, {"beta": 2.0, "simpo_gamma": 0.5}),
        Recommendation("ORPOTrainer", "ORPO (arXiv 2403.07691) when memory is short or there is no SFT model yet: no "
                       "reference model, SFT and preference in one stage", columns, {"beta": 0.1}),
        Recommendation("RewardTrainer", reward_why, columns),
    ]


def _unpaired_labels(profile: DatasetProfile) -> list[Recommendation] | None:
    if not (profile.has("label") and profile.text_like("completion")):
        return None
    columns = ("prompt", "completion", "label")
    why = ("completions labelled desirable / undesirable, not paired: KTO (arXiv 2402.01306) learns from the labels "
           "alone (per-device batch size > 1)")
    hints: dict = {"beta": 0.1}
    if profile.kinds["label"] != "bool":
        why += (f"; 'label' holds {profile.kinds['label']} values, KTO needs True/False: convert it first "
                "(e.g. label = score >= threshold)")
    else:
        labels = [row["label"] for row in profile.rows if isinstance(row.get("label"), bool)]
        desirable, undesirable = sum(labels), len(labels) - sum(labels)
        # KTO paper: weight so that λD·nD / (λU·nU) lies in [1, 4/3].
        if desirable and undesirable and desirable < undesirable:
            hints["desirable_weight"] = round(undesirable / desirable, 2)
        elif desirable and undesirable and desirable > 4 / 3 * undesirable:
            hints["undesirable_weight"] = round(3 / 4 * desirable / undesirable, 2)
    if not profile.has("prompt"):
        why += "; add a 'prompt' column"
    return [
        Recommendation("KTOTrainer", why, columns, hints),
        Recommendation("SFTTrainer", "supervised fine-tuning on the desirable rows only (filter label == True "
                       "first): ignores what the undesirable rows teach", ("prompt", "completion")),
    ]


def _sft_data(profile: DatasetProfile) -> list[Recommendation] | None:
    if profile.kinds.get("messages") == "messages":
        columns, shape, hints = ("messages",), "conversations (message lists)", {"assistant_only_loss": True}
    elif profile.text_like("prompt") and profile.text_like("completion"):
        columns, shape, hints = ("prompt", "completion"), f"{_format(profile, 'completion')} prompt/completion", {}
    elif profile.kinds.get("text") == "text":
        columns, shape, hints = ("text",), "plain text (language modelling)", {}
    else:
        return None
    recommendations = [Recommendation(
        "SFTTrainer", f"{shape} without preference labels: supervised fine-tuning first"
        + (", with the loss on the assistant's tokens" if hints else ""), columns, hints,
    )]
    if columns != ("text",):
        recommendations.append(Recommendation(
            "SPINTrainer", "then self-play (arXiv 2401.01335) on the same data, no preference labels needed: the "
            "ground truth is chosen, the model's own samples rejected, for a few rounds", columns, {"num_rounds": 3},
        ))
    return recommendations


def _rl_prompts(profile: DatasetProfile) -> list[Recommendation] | None:
    if not profile.text_like("prompt"):
        return None
    answers = [column for column in ANSWER_COLUMNS if column in profile.kinds]
    if answers:
        reward = (f"a verifier reward from column {answers[0]!r} (math answer equivalence, exact match or code "
                  "tests), given as a reward function f(prompts, completions, completion_ids, **columns)")
        columns = ("prompt", answers[0])
    else:
        reward = "a reward model or reward function (no answer column for a verifier was found)"
        columns = ("prompt",)
    return [
        Recommendation("GRPOTrainer", f"prompts only: online RL with {reward}; GRPO (arXiv 2402.03300) samples a "
                       "group per prompt and needs no critic", columns, {"num_generations": 8}),
        Recommendation("RLOOTrainer", "RLOO (arXiv 2402.14740): leave-one-out baseline over the group's samples, "
                       "no critic; same data and rewards", columns, {"num_generations": 4}),
        Recommendation("ReMaxTrainer", "ReMax (arXiv 2310.10505): the greedy sample's reward as baseline, one sample "
                       "per prompt plus one greedy decode, the fewest samples", columns),
        Recommendation("PPOTrainer", "PPO (arXiv 1707.06347) with a value model (critic): more memory, per-token "
                       "credit assignment", columns),
    ]


_RULES = (_belief_pairs, _step_pairs, _preference_pairs, _unpaired_labels, _sft_data, _rl_prompts)


def unrecognised_message(profile: DatasetProfile) -> str:
    lines = [f"No hf_align trainer recognises a dataset with columns: {profile.describe()}.", "Recognised formats:"]
    lines += [f"  - {fmt}" for fmt in RECOGNISED_FORMATS]
    renames = {column: COLUMN_ALIASES[column] for column in profile.columns if column in COLUMN_ALIASES}
    for column in ("chosen", "rejected", "prompt", "completion"):
        if column in profile.kinds and not profile.text_like(column):
            lines.append(f"Column {column!r} holds {profile.kinds[column]} values; it must hold text or messages.")
    if renames:
        calls = "".join(f".rename_column({old!r}, {new!r})" for old, new in renames.items())
        lines.append(f"Maybe rename columns: dataset{calls}")
    return "\n".join(lines)


def recommend(dataset) -> list[Recommendation]:
    """The trainers that fit `dataset` (a `datasets.Dataset`, `IterableDataset`, `DatasetDict`, list of dicts, or a
    name: embedded dataset, local file or Hub id), best first. Raises `DataError` listing the recognised formats
    when no trainer fits."""
    return recommend_for_profile(profile_dataset(dataset))


def recommend_for_profile(profile: DatasetProfile) -> list[Recommendation]:
    """`recommend` on what `profile_dataset` read."""
    import hf_align

    for rule in _RULES:
        recommendations = rule(profile)
        if recommendations:
            return [replace(r, available=r.trainer in hf_align.__all__) for r in recommendations]
    raise DataError(unrecognised_message(profile))


# ------------------------------------------------------------------------------------------------------------ CLI


def load_for_advice(name: str, split: str = "train", config: str | None = None):
    """An embedded dataset name, a local .json/.jsonl/.parquet/.csv file, or a Hub id (streamed: only the rows the
    advisor reads are downloaded)."""
    import datasets

    from . import defaults

    if name in defaults._DATASET_NAMES:
        return defaults.load_default_dataset(name, split)
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lstrip(".").lower()
        builder = {"jsonl": "json"}.get(extension, extension)
        return datasets.load_dataset(builder, data_files=name, split="train")
    return datasets.load_dataset(name, config, split=split, streaming=True)


def report(name: str, recommendations: list[Recommendation], profile: DatasetProfile) -> str:
    size = f"{profile.num_rows} rows" if profile.num_rows is not None else f"first {len(profile.rows)} rows read"
    lines = [f"Dataset: {name}" + (f" (split {profile.split})" if profile.split else "") + f", {size}",
             f"Columns: {profile.describe()}", "", "Trainers that fit, best first:"]
    for rank, recommendation in enumerate(recommendations, 1):
        lines.append(f"{rank}. {recommendation}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_align.advisor", description="Which trainer fits my data?")
    parser.add_argument("dataset", help="embedded dataset name, local .json/.jsonl/.parquet/.csv file, or Hub id")
    parser.add_argument("--split", default="train", help="split to read (default: train)")
    parser.add_argument("--config", default=None, help="Hub dataset configuration name")
    args = parser.parse_args(argv)
    try:
        profile = profile_dataset(load_for_advice(args.dataset, args.split, args.config))
    except DataError as error:
        print(error, file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - any loading failure is reported, not raised, by a CLI
        print(f"Could not load {args.dataset!r}: {error}", file=sys.stderr)
        return 1
    try:
        recommendations = recommend_for_profile(profile)
    except DataError as error:
        print(error)
        return 2
    print(report(args.dataset, recommendations, profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
