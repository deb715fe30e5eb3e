"""Step-DPO: step-wise preference optimisation for long-chain reasoning (Lai et al., arXiv 2406.18629).

DPO where the unit of preference is one reasoning step: the model is conditioned on the question and the verified
earlier steps (`initial_reason_steps`), and learns to prefer the correct next step (`chosen`) over the first wrong
step (`rejected`). The loss, the reference handling and the logged metrics are `DPOTrainer`'s; only the rows differ.

Data: columns `prompt`, `initial_reason_steps`, `chosen`, `rejected` (the Math-Step-DPO-10K format). Standard text:
the sequence is `prompt + initial_reason_steps + step`, concatenated as they are (the data carries its separators;
`initial_reason_steps` may be empty when the first step is already wrong). Conversational: `prompt` is a message list
and the steps are the start of the assistant's reply, rendered by the chat template as an unfinished assistant
message (`continue_final_message`), which the step continues — as the authors' code places them after the
assistant header. A step is a continuation, not the end of the answer: no eos (or end-of-turn) token is appended to
it, as in the authors' code (a step that should end the sequence can end with the eos token itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import data
from .dpo import DPOConfig, DPOTrainer

STEP_DPO_CITATION = """@article{lai2024stepdpo,
    title   = {{Step-DPO: Step-wise Preference Optimization for Long-chain Reasoning of LLMs}},
    author  = {Xin Lai and Zhuotao Tian and Yukang Chen and Senqiao Yang and Xiangru Peng and Jiaya Jia},
    year    = 2024,
    journal = {arXiv preprint arXiv:2406.18629},
}"""

STEP_COLUMNS = ("prompt", "initial_reason_steps", "chosen", "rejected")


@dataclass
class StepDPOConfig(DPOConfig):
    """`DPOConfig` with the Step-DPO authors' settings: β = 0.5 (their runs of models up to 57B; 0.4 for the 72B
    ones), learning rate 5e-7 with a cosine schedule after a 10% warm-up."""

    beta: float = field(default=0.5, metadata={"help": "β of the DPO loss (the authors use 0.4 for 72B models)."})
    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate (the authors' value)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warm-up steps (a float < 1: a fraction of them)."})


def _chat_ids(tokenizer, messages: list[dict], steps: str, template_kwargs: dict, where: str) -> list[int]:
    """`messages` followed by an assistant reply that starts with `steps` and is left open."""
    reply = [{"role": "assistant", "content": steps}]
    return list(
        data.apply_chat_template(
            tokenizer, messages + reply, where, continue_final_message=True, **template_kwargs
        )["input_ids"]
    )


def tokenize_step_row(tokenizer, row: dict, where: str, *, conversational: bool) -> dict[str, list[int]]:
    """`prompt_ids` (the question and the verified steps), `chosen_ids` and `rejected_ids` (the next steps) of a
    Step-DPO row, with no eos appended. The prompt is the longest prefix shared by the tokenized context and both
    tokenized continuations, as in `data.tokenize_prompt_completions`. `where` names the row in errors."""
    steps = row["initial_reason_steps"]
    if not conversational:
        dpo_row = {"prompt": row["prompt"] + steps, "chosen": row["chosen"], "rejected": row["rejected"]}
        return data.tokenize_prompt_completions(
            tokenizer, dpo_row, ("chosen", "rejected"), where, conversational=False, append_eos=False
        )
    template_kwargs = data.chat_template_kwargs(row)
    prompt_ids = _chat_ids(tokenizer, row["prompt"], steps, template_kwargs, f"{where}, column 'prompt'")
    full_ids = {column: _chat_ids(tokenizer, row["prompt"], steps + row[column], template_kwargs,
                                  f"{where}, column '{column}'")
                for column in ("chosen", "rejected")}
    prompt_len = min(data.common_prefix_length(prompt_ids, ids) for ids in full_ids.values())
    out = {"prompt_ids": prompt_ids[:prompt_len]}
    for column, ids in full_ids.items():
        out[f"{column}_ids"] = ids[prompt_len:]
    return out


def check_step_row(row: dict, where: str, *, conversational: bool) -> None:
    """Raises `data.DataError` (naming `where`, the row, and the column) unless the row is a Step-DPO row: a prompt
    (string, or message list not ending with an assistant turn), a string of verified steps (may be empty) and two
    non-empty step strings."""
    data.check_value(row["prompt"], f"{where}, column 'prompt'", conversational=conversational)
    if conversational and row["prompt"][-1]["role"] == "assistant":
        raise data.DataError(
            f"{where}, column 'prompt': the last message is an assistant turn; the steps start the assistant's reply, "
            "so the prompt must end with the user's turn."
        )
    data.check_value(row["initial_reason_steps"], f"{where}, column 'initial_reason_steps'", conversational=False,
                     allow_empty=True)
    for column in ("chosen", "rejected"):
        data.check_value(row[column], f"{where}, column '{column}'", conversational=False)


class StepDPOTrainer(DPOTrainer):
    """`DPOTrainer` on step-level pairs: each row is turned into DPO's `prompt_ids` (question + verified steps),
    `chosen_ids` (the correct next step) and `rejected_ids` (the first wrong step); everything else is DPO."""

    config_class = StepDPOConfig
    algorithm = "Step-DPO"
    paper = {"title": "Step-DPO: Step-wise Preference Optimization for Long-chain Reasoning of LLMs",
             "id": "2406.18629", "citation": STEP_DPO_CITATION}

    def prepare_dataset(self, dataset, name, args):
        keep = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in (dataset.column_names or [])]
        data.check_columns(dataset, name, STEP_COLUMNS)
        conversational = data.is_conversational_row(data.first_row(dataset, name), ["prompt"])
        tokenizer = self.tokenizer  # `process` captures no `self`: `datasets` hashes it and may send it to workers

        def process(row, index):
            where = f"{name} dataset, row {index}"
            check_step_row(row, where, conversational=conversational)
            return tokenize_step_row(tokenizer, row, where, conversational=conversational)

        columns = data.dataset_columns(dataset, name)
        remove = [column for column in columns if column not in keep]
        kwargs = data.map_kwargs(dataset, f"Tokenizing {name}", args.dataset_num_proc)
        dataset = dataset.map(process, with_indices=True, remove_columns=remove, **kwargs)
        dataset, self.dropped_rows[name] = data.drop_overlong_prompts(
            dataset, name, args.max_length, args.truncation_mode, args.dataset_num_proc
        )
        return dataset
