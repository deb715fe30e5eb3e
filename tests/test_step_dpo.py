"""StepDPOTrainer: step rows become DPO rows (text and chat), bad rows name their row and column, the embedded
step dataset, parity with TRL's DPOTrainer on the equivalent rows, and learning on held-out step pairs."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_align import DataError, StepDPOConfig, StepDPOTrainer
from hf_align.defaults import load_default_dataset

FAST = dict(max_steps=2, per_device_train_batch_size=2, report_to="none", save_strategy="no")


def _trainer(tiny_model_path, tiny_tokenizer, tmp_path, dataset, **config):
    args = StepDPOConfig(output_dir=str(tmp_path / "out"), **{**FAST, **config})
    return StepDPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args, train_dataset=dataset,
                          processing_class=tiny_tokenizer)


def _conversational(rows: list[dict]) -> list[dict]:
    """The embedded rows with the question as a user turn (the steps then start the assistant's reply)."""
    out = []
    for row in rows:
        question = row["prompt"][len("Question: "):-len("\nAnswer:\n")]
        out.append({**row, "prompt": [{"role": "user", "content": question}]})
    return out


# ------------------------------------------------------------------------------------------------- embedded data


def test_embedded_step_dataset():
    train, test = load_default_dataset("step_preference"), load_default_dataset("step_preference", "test")
    assert len(train) == 200 and len(test) == 40
    for dataset in (train, test):
        assert set(dataset.column_names) == {"prompt", "initial_reason_steps", "chosen", "rejected"}
        for row in dataset:
            assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\n")
            steps = row["initial_reason_steps"]
            assert steps == "" or steps.endswith("\n")
            index = steps.count("Step ") + 1  # chosen and rejected are the same step: the first wrong one
            assert row["chosen"].startswith(f"Step {index}: ") and row["rejected"].startswith(f"Step {index}: ")
            assert row["chosen"] != row["rejected"]
    assert not set(train["prompt"]) & set(test["prompt"])
    assert len(set(train["prompt"])) == len(train)
    # Some rows have no verified step (the first step is wrong), some end the solution.
    assert "" in train["initial_reason_steps"] and any("The answer is" in c for c in train["chosen"])
    from importlib import resources

    assets = resources.files("hf_align").joinpath("assets")
    size = sum(os.path.getsize(str(assets / f"step_preference{s}.jsonl")) for s in ("", "_test"))
    assert size < 100 * 1024


# ------------------------------------------------------------------------------------------------ rows -> DPO rows


def test_text_rows_become_dpo_rows(tiny_model_path, tiny_tokenizer, tmp_path):
    rows = load_default_dataset("step_preference").select(range(30))
    trainer = _trainer(tiny_model_path, tiny_tokenizer, tmp_path, rows)
    eos = tiny_tokenizer.eos_token_id
    for row, ids in zip(rows, trainer.train_dataset):
        context = row["prompt"] + row["initial_reason_steps"]
        # The model sees the question and the verified steps; the prompt is not cut (it ends with "\n").
        assert ids["prompt_ids"] == tiny_tokenizer(context)["input_ids"]
        for column in ("chosen", "rejected"):
            assert ids["prompt_ids"] + ids[f"{column}_ids"] == tiny_tokenizer(context + row[column])["input_ids"]
            assert tiny_tokenizer.decode(ids[f"{column}_ids"]) == row[column]
            assert eos not in ids[f"{column}_ids"]  # a step continues the solution: no eos appended
    assert trainer.dropped_rows["train"] == 0


def test_conversational_rows_continue_the_assistant_reply(tiny_model_path, tiny_tokenizer, tmp_path):
    rows = _conversational(load_default_dataset("step_preference").select(range(30)).to_list())
    trainer = _trainer(tiny_model_path, tiny_tokenizer, tmp_path, Dataset.from_list(rows))
    seen_empty = False
    for row, ids in zip(rows, trainer.train_dataset):
        question, steps = row["prompt"][0]["content"], row["initial_reason_steps"]
        prompt = tiny_tokenizer.decode(ids["prompt_ids"])
        assert prompt == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{steps}"
        if not steps:  # no verified step: the prompt is exactly the chat template's generation prompt
            seen_empty = True
            generation_prompt = tiny_tokenizer.apply_chat_template(
                row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            assert ids["prompt_ids"] == list(generation_prompt)
        for column in ("chosen", "rejected"):
            assert tiny_tokenizer.decode(ids[f"{column}_ids"]) == row[column]  # no end of turn: the reply goes on
    assert seen_empty
    trainer.train()
    assert trainer.state.global_step == 2


# ---------------------------------------------------------------------------------------------- malformed data


def _rows(n: int = 5) -> list[dict]:
    return [
        {"prompt": f"Question: {i} + 1 + 2?\nAnswer:\n", "initial_reason_steps": f"Step 1: {i} + 1 = {i + 1}.\n",
         "chosen": f"Step 2: {i + 1} + 2 = {i + 3}.", "rejected": f"Step 2: {i + 1} + 2 = {i + 4}."}
        for i in range(n)
    ]


def _with(rows, index, **changes):
    rows = [dict(row) for row in rows]
    rows[index].update(changes)
    return rows


MALFORMED = {
    "missing-initial-reason-steps": (
        [{k: v for k, v in row.items() if k != "initial_reason_steps"} for row in _rows()],
        ["train dataset", "'initial_reason_steps'"],
    ),
    "empty-chosen-row-3": (_with(_rows(), 3, chosen=""), ["row 3", "'chosen'", "empty"]),
    "blank-rejected-row-2": (_with(_rows(), 2, rejected="  \n"), ["row 2", "'rejected'", "empty"]),
    "none-steps-row-1": (_with(_rows(), 1, initial_reason_steps=None), ["row 1", "'initial_reason_steps'", "None"]),
    "int-prompts": ([{**row, "prompt": i} for i, row in enumerate(_rows())], ["row 0", "'prompt'", "int"]),
    "prompt-ends-with-assistant": (
        [{**row, "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Step 1"}]}
         for row in _rows()],
        ["row 0", "'prompt'", "assistant"],
    ),
    "message-list-chosen": (
        [{**row, "prompt": [{"role": "user", "content": "Hi"}],
          "chosen": [{"role": "assistant", "content": row["chosen"]}]} for row in _rows()],
        ["row 0", "'chosen'", "expected a string"],
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_rows_raise_naming_row_and_column(case, tiny_model_path, tiny_tokenizer, tmp_path):
    rows, fragments = MALFORMED[case]
    with pytest.raises(DataError) as info:
        _trainer(tiny_model_path, tiny_tokenizer, tmp_path, Dataset.from_list(rows))
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


def test_empty_steps_are_allowed(tiny_model_path, tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_model_path, tiny_tokenizer, tmp_path,
                       Dataset.from_list(_with(_rows(), 0, initial_reason_steps="")))
    assert tiny_tokenizer.decode(trainer.train_dataset[0]["prompt_ids"]) == "Question: 0 + 1 + 2?\nAnswer:\n"


# -------------------------------------------------------------------------------------------------- TRL parity


def test_matches_trl_dpo_on_the_equivalent_rows(tiny_model_path, tiny_tokenizer, tmp_path):
    """Step rows whose steps end with the eos token are DPO rows `(prompt + steps, step, step)` to TRL (which appends
    no eos then either): the token ids and the first-step loss and metrics of TRL's DPOTrainer match."""
    trl = pytest.importorskip("trl")
    eos = tiny_tokenizer.eos_token
    rows = [{**row, "chosen": row["chosen"] + eos, "rejected": row["rejected"] + eos}
            for row in load_default_dataset("step_preference").select(range(16)).to_list()]
    dpo_rows = [{"prompt": r["prompt"] + r["initial_reason_steps"], "chosen": r["chosen"], "rejected": r["rejected"]}
                for r in rows]
    state = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    generator = torch.Generator().manual_seed(0)
    perturbed = {name: value + 0.05 * torch.randn(value.shape, generator=generator) for name, value in state.items()}

    def models():
        policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        policy.load_state_dict(perturbed)
        return policy, AutoModelForCausalLM.from_pretrained(tiny_model_path)

    common = dict(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=8, beta=0.5)
    policy, reference = models()
    theirs = trl.DPOTrainer(model=policy, ref_model=reference, processing_class=tiny_tokenizer,
                            args=trl.DPOConfig(bf16=False, gradient_checkpointing=False, **common),
                            train_dataset=Dataset.from_list(dpo_rows))
    policy, reference = models()
    ours = StepDPOTrainer(model=policy, ref_model=reference, processing_class=tiny_tokenizer,
                          args=StepDPOConfig(**common), train_dataset=Dataset.from_list(rows))
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours.train_dataset[column] == theirs.train_dataset[column]

    def first_step(trainer):
        trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        loss = trainer.compute_loss(trainer.model, batch)
        return {"loss": loss.item(), **{k: v[-1] for k, v in trainer._metrics["train"].items() if v}}

    expected, actual = first_step(theirs), first_step(ours)
    assert abs(expected["rewards/margins"]) > 1e-2  # the policy differs from the reference
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert actual[key] == pytest.approx(expected[key], rel=2e-3, abs=1e-6), key
    worst = max(abs(actual[k] - expected[k]) / max(abs(expected[k]), 1e-12) for k in ("loss", "rewards/margins"))
    print(f"[parity] Step-DPO vs TRL DPO: loss {expected['loss']:.6f} vs {actual['loss']:.6f}, worst rel {worst:.1e}")


# ------------------------------------------------------------------------------------------ held-out learning


def test_learns_to_prefer_the_correct_step_on_held_out_problems(tiny_model_path, tiny_tokenizer, tmp_path):
    train, test = load_default_dataset("step_preference"), load_default_dataset("step_preference", "test")
    args = StepDPOConfig(
        output_dir=str(tmp_path / "out"), learning_rate=1e-3, max_steps=80, per_device_train_batch_size=8,
        per_device_eval_batch_size=len(test), lr_scheduler_type="constant", warmup_steps=0, logging_steps=20,
        report_to="none", save_strategy="no", seed=0,
    )
    trainer = StepDPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args, train_dataset=train,
                             processing_class=tiny_tokenizer)
    before = trainer.evaluate(test)
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # the policy is the reference
    assert before["eval_rewards/accuracies"] == 0.0
    trainer.train()
    after = trainer.evaluate(test)
    print(f"[step-dpo] held-out accuracy {after['eval_rewards/accuracies']:.3f}, "
          f"margin {after['eval_rewards/margins']:.3f}, loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}")
    assert after["eval_rewards/accuracies"] >= 0.7
    assert after["eval_rewards/margins"] > 0.3
    assert after["eval_loss"] < before["eval_loss"] - 0.1


def test_config_defaults_and_card():
    config = StepDPOConfig(output_dir="unused", report_to="none")
    assert (config.beta, config.learning_rate, config.lr_scheduler_type, config.warmup_steps) == (
        0.5, 5e-7, "cosine", 0.1
    )
    assert config.loss_type == ["sigmoid"]
    assert StepDPOTrainer.paper["id"] == "2406.18629"
