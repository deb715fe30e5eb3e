"""RewardTrainer: parity with TRL 1.16's RewardTrainer, the loss formula (margin, centering), learning, model
loading (id, object, embedded default), LoRA, and validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_align import DataError, RewardConfig, RewardTrainer
from hf_align.defaults import DEFAULT_MODEL_NAME

torch.set_num_threads(1)

REL = 2e-3
N_ROWS = 8
METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens")


def _config(tmp_path, **kwargs) -> RewardConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", logging_steps=1,
        per_device_train_batch_size=N_ROWS,
    )
    return RewardConfig(**{**defaults, **kwargs})


def _with_margins(dataset: Dataset) -> Dataset:
    return dataset.add_column("margin", [0.25 * (i % 4) for i in range(len(dataset))])


def _first_batch_loss(trainer):
    """`compute_loss` in train mode on the first `N_ROWS` prepared rows, in order, and the metrics it recorded."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_ROWS)])
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), {key: values[-1] for key, values in trainer._metrics["train"].items()}


def _rewards(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return rewards.squeeze(-1).chunk(2)


# ----------------------------------------------------------------------------------------------------- TRL parity


@pytest.mark.parametrize(
    "kind, implicit_prompt, margin, center",
    [
        ("preference", False, False, None),
        ("preference", True, True, 0.01),
        ("preference_conversational", False, True, None),
        ("preference_conversational", True, False, 0.01),
    ],
)
def test_first_batch_loss_and_metrics_equal_trl(
    tmp_path, tiny_seqcls_path, preference_data, kind, implicit_prompt, margin, center
):
    trl = pytest.importorskip("trl")
    dataset = preference_data(kind, N_ROWS)
    if implicit_prompt:
        dataset = Dataset.from_list(
            [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in dataset]
        )
    if margin:
        dataset = _with_margins(dataset)
    args = _config(tmp_path, center_rewards_coefficient=center)
    ours = RewardTrainer(tiny_seqcls_path, args=args, train_dataset=dataset)
    theirs = trl.RewardTrainer(
        tiny_seqcls_path,
        args=trl.RewardConfig(
            output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, gradient_checkpointing=False,
            center_rewards_coefficient=center,
        ),
        train_dataset=dataset,
    )
    assert ours.train_dataset["chosen_ids"] == theirs.train_dataset["chosen_ids"]
    assert ours.train_dataset["rejected_ids"] == theirs.train_dataset["rejected_ids"]
    our_loss, our_metrics = _first_batch_loss(ours)
    their_loss, their_metrics = _first_batch_loss(theirs)
    assert our_loss == pytest.approx(their_loss, rel=REL)
    assert set(METRICS) <= set(their_metrics) and set(our_metrics) == set(their_metrics)
    for key in METRICS:
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=REL, abs=1e-6), key
    assert abs(our_metrics["margin"]) > 1e-4  # the comparison is not between zeros


# ---------------------------------------------------------------------------------------------------- the loss


def test_margin_and_centering_change_the_loss_as_the_formula_says(tmp_path, tiny_seqcls_path, preference_data):
    dataset = _with_margins(preference_data("preference", N_ROWS))
    trainer = RewardTrainer(tiny_seqcls_path, args=_config(tmp_path), train_dataset=dataset)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_ROWS)])
    chosen, rejected = _rewards(trainer, batch)
    margin = batch["margin"]
    assert margin.tolist() == [0.25 * (i % 4) for i in range(N_ROWS)]

    def loss_of(inputs, center=None):
        trainer.args.center_rewards_coefficient = center
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, inputs).item()

    no_margin = {k: v for k, v in batch.items() if k != "margin"}
    plain = -F.logsigmoid(chosen - rejected).mean().item()
    assert loss_of(no_margin) == pytest.approx(plain, rel=1e-6)
    with_margin = -F.logsigmoid(chosen - rejected - margin).mean().item()
    assert loss_of(batch) == pytest.approx(with_margin, rel=1e-6)
    assert with_margin > plain  # a positive margin asks for a larger gap
    centering = 0.5 * ((chosen + rejected) ** 2).mean().item()
    assert loss_of(batch, center=0.5) == pytest.approx(with_margin + centering, rel=1e-6)


# --------------------------------------------------------------------------------------------------- training


def test_heldout_pairwise_accuracy_rises(tmp_path, tiny_seqcls_path, preference_data):
    args = _config(
        tmp_path, learning_rate=1e-3, num_train_epochs=1, per_device_eval_batch_size=32, logging_steps=10,
        lr_scheduler_type="constant",
    )
    # The random head already prefers the (longer) chosen answers most of the time; flipped, it prefers the rejected.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_seqcls_path, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.neg_()
    trainer = RewardTrainer(
        model, args=args, train_dataset=preference_data("preference", 160),
        eval_dataset=preference_data("preference", split="test"),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_accuracy"] < 0.5 and after["eval_accuracy"] >= 0.95, (before, after)
    assert after["eval_loss"] < before["eval_loss"]
    assert set(METRICS) <= set(trainer.state.log_history[0])


def test_lora_trains_the_adapter_and_the_score_head(tmp_path, tiny_seqcls_path, preference_data):
    from peft import LoraConfig, PeftModel

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = RewardTrainer(
        tiny_seqcls_path, args=_config(tmp_path, learning_rate=1e-2, max_steps=4), peft_config=peft_config,
        train_dataset=preference_data("preference", 32),
    )
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].task_type == "SEQ_CLS"
    trainable = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable) and any("score" in name for name in trainable)
    assert not any("embed_tokens" in name for name in trainable)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    for name, before in trainable.items():
        assert not torch.equal(after[name], before), name


# ------------------------------------------------------------------------------------------------------ models


def test_model_id_and_model_object_give_the_same_loss(tmp_path, tiny_seqcls_path, tiny_model_path, preference_data):
    dataset = preference_data("preference", N_ROWS)
    from_id = RewardTrainer(tiny_seqcls_path, args=_config(tmp_path), train_dataset=dataset)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_seqcls_path, dtype=torch.float32)
    from_object = RewardTrainer(model, args=_config(tmp_path), train_dataset=dataset)
    assert _first_batch_loss(from_id)[0] == pytest.approx(_first_batch_loss(from_object)[0], rel=1e-6)
    # A causal-LM checkpoint given by path gets a new one-label head; as an object it is refused.
    from_causal_path = RewardTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset)
    assert from_causal_path.model.config.num_labels == 1 and from_causal_path.model.score.out_features == 1
    with pytest.raises(ValueError, match="sequence classifier with num_labels=1"):
        causal_lm = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        RewardTrainer(causal_lm, args=_config(tmp_path), train_dataset=dataset)


def test_embedded_default_name_loads_the_sequence_classifier(tmp_path, preference_data):
    dataset = preference_data("preference", N_ROWS)
    trainer = RewardTrainer(DEFAULT_MODEL_NAME, args=_config(tmp_path), train_dataset=dataset)
    assert type(trainer.model).__name__ == "LlamaForSequenceClassification"
    assert trainer.model.config.pad_token_id == trainer.tokenizer.pad_token_id is not None


# -------------------------------------------------------------------------------------------------- validation


def test_pairs_longer_than_max_length_are_dropped_and_counted(tmp_path, tiny_seqcls_path, preference_data):
    dataset = preference_data("preference", 32)
    full = RewardTrainer(tiny_seqcls_path, args=_config(tmp_path, max_length=None), train_dataset=dataset)
    pairs = zip(full.train_dataset["chosen_ids"], full.train_dataset["rejected_ids"])
    lengths = [max(len(chosen), len(rejected)) for chosen, rejected in pairs]
    max_length = sorted(lengths)[len(lengths) // 2]
    trainer = RewardTrainer(tiny_seqcls_path, args=_config(tmp_path, max_length=max_length), train_dataset=dataset)
    assert trainer.dropped_rows["train"] == sum(length > max_length for length in lengths) > 0
    assert len(trainer.train_dataset) == sum(length <= max_length for length in lengths)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": "Q:", "chosen": " a"}], r"no column \['rejected'\]"),
        ([{"chosen": "Q: a", "rejected": "Q: b"}, {"chosen": "Q: a", "rejected": ""}],
         r"row 1, column 'rejected': the text is empty"),
        ([{"prompt": "Q:", "chosen": " a", "rejected": " b"}, {"prompt": None, "chosen": " a", "rejected": " b"}],
         r"row 1, column 'prompt': expected a string, got None"),
        ([{"chosen": "Q: a", "rejected": "Q: b", "margin": 1.0},
          {"chosen": "Q: a", "rejected": "Q: b", "margin": None}],
         r"row 1, column 'margin': expected a finite number"),
    ],
)
def test_malformed_rows_raise_naming_row_and_column(tmp_path, tiny_seqcls_path, rows, match):
    with pytest.raises(DataError, match=match):
        RewardTrainer(tiny_seqcls_path, args=_config(tmp_path), train_dataset=Dataset.from_list(rows))
