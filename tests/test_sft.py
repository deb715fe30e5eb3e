"""SFTTrainer: TRL-identical tokenization, completion-only masking, packing, validation, and learning."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from hf_align import DataError, SFTConfig, SFTTrainer

torch.set_num_threads(1)

N_ROWS = 8


def _config(tmp_path, **kwargs) -> SFTConfig:
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", logging_steps=1)
    return SFTConfig(**{**defaults, **kwargs})


def _sft_rows(embedded_data, kind: str, n: int = N_ROWS, split: str = "train") -> Dataset:
    """`n` rows of each SFT format, built from the embedded datasets."""
    if kind == "prompt_completion":
        return embedded_data("sft", n, split)
    if kind == "prompt_completion_conversational":
        rows = embedded_data("preference_conversational", n, split)
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    if kind == "text":
        return Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in embedded_data("sft", n, split)])
    if kind == "messages":
        return embedded_data("sft_conversational", n, split)
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize(
    "kind, assistant_only_loss",
    [
        ("prompt_completion", False),
        ("prompt_completion_conversational", False),
        ("text", False),
        ("messages", False),
        ("messages", True),
    ],
)
def test_token_ids_and_labels_equal_trl(tmp_path, tiny_model_path, embedded_data, kind, assistant_only_loss):
    trl = pytest.importorskip("trl")
    dataset = _sft_rows(embedded_data, kind)
    ours = SFTTrainer(
        tiny_model_path, args=_config(tmp_path, assistant_only_loss=assistant_only_loss), train_dataset=dataset
    )
    theirs = trl.SFTTrainer(
        tiny_model_path,
        args=trl.SFTConfig(
            output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, gradient_checkpointing=False,
            assistant_only_loss=assistant_only_loss,
        ),
        train_dataset=dataset,
    )
    assert ours.train_dataset["input_ids"] == theirs.train_dataset["input_ids"]
    assert ours.train_dataset["labels"] == theirs.train_dataset["labels"]
    masked = sum(label == -100 for labels in ours.train_dataset["labels"] for label in labels)
    assert (masked > 0) == (kind.startswith("prompt_completion") or assistant_only_loss)


def test_collator_masks_prompt_tokens(tmp_path, tiny_model_path, embedded_data):
    dataset = _sft_rows(embedded_data, "prompt_completion")
    trainer = SFTTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset)
    tokenizer = trainer.tokenizer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_ROWS)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for i, row in enumerate(dataset):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full_ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        n_prompt, n_full = len(prompt_ids), len(full_ids)
        assert batch["input_ids"][i, :n_full].tolist() == full_ids
        assert batch["input_ids"][i, :n_prompt].tolist() == prompt_ids
        assert (batch["labels"][i, :n_prompt] == -100).all()
        assert batch["labels"][i, n_prompt:n_full].tolist() == full_ids[n_prompt:]
        assert full_ids[-1] == tokenizer.eos_token_id  # the eos is trained
        assert (batch["labels"][i, n_full:] == -100).all() and (batch["attention_mask"][i, n_full:] == 0).all()
        assert tokenizer.decode(full_ids[n_prompt:]).startswith(row["completion"])


def test_completion_only_loss_false_trains_every_token(tmp_path, tiny_model_path, embedded_data):
    dataset = _sft_rows(embedded_data, "prompt_completion")
    trainer = SFTTrainer(tiny_model_path, args=_config(tmp_path, completion_only_loss=False), train_dataset=dataset)
    assert trainer.train_dataset["labels"] == trainer.train_dataset["input_ids"]


def test_overlong_rows_truncated_and_fully_masked_rows_dropped(tmp_path, tiny_model_path, embedded_data):
    dataset = _sft_rows(embedded_data, "prompt_completion", 32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    max_length = 13
    prompt_lengths = [len(tokenizer(row["prompt"])["input_ids"]) for row in dataset]
    expected_dropped = sum(length >= max_length for length in prompt_lengths)
    assert 0 < expected_dropped < len(dataset)
    trainer = SFTTrainer(tiny_model_path, args=_config(tmp_path, max_length=max_length), train_dataset=dataset)
    assert trainer.dropped_rows["train"] == expected_dropped
    assert len(trainer.train_dataset) == len(dataset) - expected_dropped
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) == max_length


# ------------------------------------------------------------------------------------------------------ packing


def test_packing_gives_the_same_per_token_loss(tmp_path, tiny_model_path, embedded_data):
    dataset = _sft_rows(embedded_data, "prompt_completion", 16)
    unpacked = SFTTrainer(tiny_model_path, args=_config(tmp_path, max_length=128), train_dataset=dataset)
    packed = SFTTrainer(tiny_model_path, args=_config(tmp_path, max_length=128, packing=True), train_dataset=dataset)
    assert len(packed.train_dataset) < len(dataset)  # rows were packed together
    packed.model.load_state_dict(unpacked.model.state_dict())

    def token_logps(trainer, batch):
        trainer.model.eval()
        with torch.no_grad():
            loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        mask = batch["labels"][:, 1:] != -100
        return loss, out["token_logps"][:, 1:][mask]

    rows = [unpacked.train_dataset[i] for i in range(len(dataset))]
    loss_u, logps_u = token_logps(unpacked, unpacked.data_collator(rows))
    packed_batch = packed.data_collator([packed.train_dataset[i] for i in range(len(packed.train_dataset))])
    assert "attention_mask" not in packed_batch and packed_batch["input_ids"].shape[0] == 1
    loss_p, logps_p = token_logps(packed, packed_batch)
    assert logps_u.numel() == logps_p.numel() > 100
    torch.testing.assert_close(logps_p.sort().values, logps_u.sort().values, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_p, loss_u, rtol=0, atol=1e-5)
    # Control: without restarting positions, attention crosses documents and the loss changes.
    crossing = {**packed_batch, "position_ids": torch.arange(packed_batch["input_ids"].shape[1])[None]}
    loss_x, _ = token_logps(packed, crossing)
    assert abs(loss_x - loss_u) > 1e-3


def test_padding_free_batches_give_the_same_loss_and_gradients(tmp_path, tiny_model_path, embedded_data):
    dataset = _sft_rows(embedded_data, "prompt_completion", 8)
    trainers = [SFTTrainer(tiny_model_path, args=_config(tmp_path, max_length=128, padding_free=flat),
                           train_dataset=dataset) for flat in (False, True)]
    results = []
    for trainer in trainers:
        trainer.model.load_state_dict(trainers[0].model.state_dict())
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((batch, loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]))
    (padded, loss, grads), (flat, flat_loss, flat_grads) = results
    assert flat["input_ids"].shape[0] == 1 and flat["input_ids"].numel() == padded["attention_mask"].sum()
    torch.testing.assert_close(flat_loss, loss, rtol=1e-5, atol=1e-6)
    for grad, flat_grad in zip(grads, flat_grads):
        assert (flat_grad - grad).norm() <= 1e-5 * grad.norm()


# --------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": "Q: hi\nA:"}, {"prompt": "Q: yo\nA:"}], r"no column \['completion'\]"),
        ([{"prompt": "Q: hi\nA:", "completion": " ok"}, {"prompt": "Q: yo\nA:", "completion": "  "}],
         r"row 1, column 'completion': the text is empty"),
        ([{"prompt": "Q: hi\nA:", "completion": " ok"}, {"prompt": "Q: yo\nA:", "completion": None}],
         r"row 1, column 'completion': expected a string, got None"),
        ([{"prompt": "Q: hi\nA:", "completion": 3}, {"prompt": "Q: yo\nA:", "completion": 4}],
         r"row 0, column 'completion': expected a string, got int 3"),
        ([{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "ok"}]},
          {"prompt": [{"role": "user", "content": "yo"}], "completion": []}],
         r"row 1, column 'completion': expected a non-empty list of messages"),
        ([{"text": "hello"}, {"text": ""}], r"row 1, column 'text': the text is empty"),
        ([{"body": "hello"}], r"none of the SFT formats"),
    ],
)
def test_malformed_rows_raise_naming_row_and_column(tmp_path, tiny_model_path, rows, match):
    with pytest.raises(DataError, match=match):
        SFTTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=Dataset.from_list(rows))


def test_loss_options_that_cannot_apply_raise(tmp_path, tiny_model_path, embedded_data):
    text = _sft_rows(embedded_data, "text")
    with pytest.raises(ValueError, match="completion_only_loss=True"):
        SFTTrainer(tiny_model_path, args=_config(tmp_path, completion_only_loss=True), train_dataset=text)
    with pytest.raises(ValueError, match="needs conversational data"):
        SFTTrainer(tiny_model_path, args=_config(tmp_path, assistant_only_loss=True), train_dataset=text)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    for marker in ("{%- generation %}", "{%- endgeneration %}"):
        tokenizer.chat_template = tokenizer.chat_template.replace(marker, "")
    with pytest.raises(ValueError, match=r"\{% generation %\}"):
        SFTTrainer(
            tiny_model_path, args=_config(tmp_path, assistant_only_loss=True), processing_class=tokenizer,
            train_dataset=_sft_rows(embedded_data, "messages"),
        )


def test_formatting_func_makes_language_modeling_rows(tmp_path, tiny_model_path, embedded_data):
    dataset = _sft_rows(embedded_data, "prompt_completion")
    trainer = SFTTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=dataset,
        formatting_func=lambda row: row["prompt"] + row["completion"],
    )
    reference = SFTTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=_sft_rows(embedded_data, "text"))
    assert trainer.train_dataset["input_ids"] == reference.train_dataset["input_ids"]
    assert trainer.train_dataset["labels"] == trainer.train_dataset["input_ids"]


# ----------------------------------------------------------------------------------------------------- training


def test_heldout_completion_loss_falls(tmp_path, tiny_model_path, embedded_data):
    train, test = embedded_data("sft", 240), embedded_data("sft", split="test")
    args = _config(
        tmp_path, learning_rate=2e-3, per_device_train_batch_size=8, per_device_eval_batch_size=32,
        num_train_epochs=1, logging_steps=10, lr_scheduler_type="constant",
    )
    trainer = SFTTrainer(tiny_model_path, args=args, train_dataset=train, eval_dataset=test)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 1.5, (before, after)
    assert after["eval_mean_token_accuracy"] > before["eval_mean_token_accuracy"] + 0.2
    logged = trainer.state.log_history[0]
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= set(logged)


def test_gradient_accumulation_normalises_by_the_step_token_count(tmp_path, tiny_model_path, embedded_data):
    """Two micro-batches of 2 rows make the same update as one batch of 4 (TRL's token-count normalisation)."""
    dataset = _sft_rows(embedded_data, "prompt_completion", 4)
    updated = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = _config(
            tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1,
            optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
        )
        trainer = SFTTrainer(tiny_model_path, args=args, train_dataset=dataset)
        trainer.train()
        updated.append(trainer.model.model.embed_tokens.weight.detach().clone())
    torch.testing.assert_close(updated[0], updated[1], rtol=0, atol=1e-5)
