"""SFTConfig's TRL options: `loss_type` (nll, dft), `packing_strategy`, `shuffle_dataset`, `eval_packing`,
`dataset_kwargs`, `eos_token`, `pad_token`, `chat_template_path`, `activation_offloading`, and the constructor's
`compute_loss_func`: against TRL 1.16's SFTTrainer where TRL runs them here, else by what they must do."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from test_sft import _sft_rows
from transformers import AutoTokenizer

from hf_align import DataError, RewardConfig, SFTConfig, SFTTrainer

trl = pytest.importorskip("trl")

REL = 2e-3
COMMON = dict(report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
              per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3)


def _pair(tmp_path, tiny_model_path, dataset, eval_dataset=None, **options):
    """(hf_align's, TRL's) SFT trainers on the same model, rows and options."""
    ours = SFTTrainer(tiny_model_path, args=SFTConfig(output_dir=str(tmp_path / "ours"), **COMMON, **options),
                      train_dataset=dataset, eval_dataset=eval_dataset)
    theirs = trl.SFTTrainer(
        tiny_model_path, train_dataset=dataset, eval_dataset=eval_dataset,
        args=trl.SFTConfig(output_dir=str(tmp_path / "trl"), bf16=False, gradient_checkpointing=False, **COMMON,
                           **options),
    )
    return ours, theirs


def _assert_same_logs(ours, theirs, keys=("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm")):
    ours.train()
    theirs.train()
    steps = [(a, b) for a, b in zip(ours.state.log_history, theirs.state.log_history) if "loss" in a]
    assert len(steps) == 2
    for a, b in steps:
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=REL), key


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_loss_types_train_like_trl(tmp_path, tiny_model_path, embedded_data, loss_type):
    ours, theirs = _pair(tmp_path, tiny_model_path, _sft_rows(embedded_data, "prompt_completion"),
                         loss_type=loss_type)
    _assert_same_logs(ours, theirs)


def test_dft_weights_each_token_by_its_probability(tmp_path, tiny_model_path, embedded_data):
    """On the same batch, DFT's loss is the probability-weighted NLL: below the NLL (every p < 1), and with the
    probabilities held constant its gradient is `p · ∇(-logp)`."""
    dataset = _sft_rows(embedded_data, "prompt_completion", 4)
    losses = {}
    for loss_type in ("nll", "dft"):
        trainer = SFTTrainer(tiny_model_path, args=SFTConfig(output_dir=str(tmp_path / loss_type), **COMMON,
                                                             loss_type=loss_type), train_dataset=dataset)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        losses[loss_type] = trainer.compute_loss(trainer.model, batch)
    assert 0 < losses["dft"] < losses["nll"]


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_packing_strategies_pack_and_train_like_trl(tmp_path, tiny_model_path, embedded_data, strategy):
    dataset = _sft_rows(embedded_data, "text", 16)
    ours, theirs = _pair(tmp_path, tiny_model_path, dataset, packing=True, packing_strategy=strategy, max_length=48)
    assert ours.train_dataset["input_ids"] == theirs.train_dataset["input_ids"]
    assert ours.train_dataset["labels"] == theirs.train_dataset["labels"]
    # Only the best-fit strategies keep sequences apart (one padding-free row per batch); wrapped rows attend across.
    batch = ours.data_collator([ours.train_dataset[i] for i in range(2)])
    assert ("position_ids" in batch) == (strategy != "wrapped")
    _assert_same_logs(ours, theirs)


def test_shuffle_dataset_and_eval_packing_prepare_rows_as_trl(tmp_path, tiny_model_path, embedded_data):
    dataset, eval_dataset = _sft_rows(embedded_data, "text", 16), _sft_rows(embedded_data, "text", 8, "test")
    ours, theirs = _pair(tmp_path, tiny_model_path, dataset, eval_dataset, shuffle_dataset=True, packing=True,
                         eval_packing=False, max_length=48)
    unshuffled = SFTTrainer(tiny_model_path, train_dataset=dataset, args=SFTConfig(
        output_dir=str(tmp_path / "plain"), **COMMON, packing=True, max_length=48))
    assert ours.train_dataset["input_ids"] == theirs.train_dataset["input_ids"]
    assert ours.train_dataset["input_ids"] != unshuffled.train_dataset["input_ids"]
    assert ours.eval_dataset["input_ids"] == theirs.eval_dataset["input_ids"]
    assert "seq_lengths" not in ours.eval_dataset.column_names and len(ours.eval_dataset) == 8  # not packed


def test_skip_prepare_dataset_uses_the_rows_as_they_are(tmp_path, tiny_model_path, embedded_data):
    tokenized = SFTTrainer(tiny_model_path, args=SFTConfig(output_dir=str(tmp_path / "a"), **COMMON),
                           train_dataset=_sft_rows(embedded_data, "prompt_completion", 4)).train_dataset
    rows = Dataset.from_dict({"input_ids": tokenized["input_ids"], "labels": tokenized["labels"]})
    args = SFTConfig(output_dir=str(tmp_path / "b"), **COMMON, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(tiny_model_path, args=args, train_dataset=rows)
    assert trainer.train_dataset["labels"] == tokenized["labels"]
    with pytest.raises(DataError, match="'input_ids' column"):
        SFTTrainer(tiny_model_path, args=args, train_dataset=Dataset.from_dict({"text": ["hi"]}))
    with pytest.raises(DataError, match="no 'labels'"):
        SFTTrainer(tiny_model_path, args=args,
                   train_dataset=Dataset.from_dict({"input_ids": [[1, 2]], "completion_mask": [[0, 1]]}))
    with pytest.raises(ValueError, match="unknown keys"):
        SFTConfig(output_dir=str(tmp_path), dataset_kwargs={"skip_prepare": True})


def test_eos_and_pad_tokens_replace_the_tokenizers(tmp_path, tiny_model_path, embedded_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    eos, pad = tokenizer.convert_ids_to_tokens([5, 6])
    dataset = _sft_rows(embedded_data, "text", 4)
    ours, theirs = _pair(tmp_path, tiny_model_path, dataset, eos_token=eos, pad_token=pad)
    assert ours.train_dataset["input_ids"] == theirs.train_dataset["input_ids"]
    assert all(ids[-1] == 5 for ids in ours.train_dataset["input_ids"])
    assert ours.model.config.eos_token_id == 5 and ours.model.generation_config.eos_token_id[0] == 5
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 6).all() and (batch["attention_mask"] == 0).any()
    for field in ("eos_token", "pad_token"):
        with pytest.raises(ValueError, match=f"`{field}='<nowhere>'` is not in the vocabulary"):
            SFTTrainer(tiny_model_path, args=SFTConfig(output_dir=str(tmp_path / "x"), **{field: "<nowhere>"}),
                       train_dataset=dataset)


def test_chat_template_path_from_a_jinja_file(tmp_path, tiny_model_path, embedded_data):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    dataset = _sft_rows(embedded_data, "messages", 4)
    ours, theirs = _pair(tmp_path, tiny_model_path, dataset, chat_template_path=str(template))
    assert ours.tokenizer.chat_template == template.read_text()
    assert ours.train_dataset["input_ids"] == theirs.train_dataset["input_ids"]
    expected = ours.tokenizer.apply_chat_template(dataset[0]["messages"], tokenize=True, return_dict=True)
    assert ours.train_dataset["input_ids"][0][: len(expected["input_ids"])] == list(expected["input_ids"])


def test_chat_template_path_from_a_tokenizer_clones_its_special_tokens(tmp_path, tiny_model_path, embedded_data):
    """A template source with a special token the model lacks: the token is added, the embeddings resized, and
    with LoRA that token's embedding trains (TRL's `trainable_token_indices`)."""
    source = AutoTokenizer.from_pretrained(tiny_model_path)
    source.add_special_tokens({"additional_special_tokens": ["<|turn|>"]})
    source.chat_template = "{% for m in messages %}<|turn|>{{ m['content'] }}{% endfor %}"
    source.save_pretrained(tmp_path / "source")
    args = SFTConfig(output_dir=str(tmp_path / "out"), **COMMON, chat_template_path=str(tmp_path / "source"))
    trainer = SFTTrainer(tiny_model_path, args=args, train_dataset=_sft_rows(embedded_data, "messages", 4),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    token_id = trainer.tokenizer.convert_tokens_to_ids("<|turn|>")
    assert trainer.tokenizer.chat_template == source.chat_template
    assert trainer.model.get_input_embeddings().weight.shape[0] > token_id
    assert token_id in trainer.model.peft_config["default"].trainable_token_indices["embed_tokens"]
    assert token_id in trainer.train_dataset["input_ids"][0]


def test_compute_loss_func_gets_the_models_logits(tmp_path, tiny_model_path, embedded_data):
    calls = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        calls.append(outputs.logits.shape[:2] == labels.shape)
        return outputs.logits.float().pow(2).mean()

    args = SFTConfig(output_dir=str(tmp_path), **COMMON)
    trainer = SFTTrainer(tiny_model_path, args=args, train_dataset=_sft_rows(embedded_data, "prompt_completion", 8),
                         compute_loss_func=loss_func)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert calls and all(calls) and losses[1] < losses[0]  # it trains on the given loss
    with pytest.raises(ValueError, match="loss_type='dft'"):
        SFTTrainer(tiny_model_path, args=SFTConfig(output_dir=str(tmp_path), loss_type="dft"),
                   train_dataset=_sft_rows(embedded_data, "prompt_completion", 4), compute_loss_func=loss_func)


def test_options_that_cannot_work_here_raise_at_config_time(tmp_path):
    for config in (SFTConfig, RewardConfig):
        with pytest.raises(ValueError, match="activation_offloading=True.*needs a CUDA device"):
            config(output_dir=str(tmp_path), activation_offloading=True)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        SFTConfig(output_dir=str(tmp_path), loss_type="focal")
    with pytest.raises(ValueError, match="packing_strategy must be one of"):
        SFTConfig(output_dir=str(tmp_path), packing_strategy="greedy")
    assert SFTConfig(output_dir=str(tmp_path), loss_type="chunked_nll").loss_type == "nll"  # TRL's old alias
    assert SFTConfig(output_dir=str(tmp_path), packing_strategy="bfd-requeue").packing_strategy == "bfd_split"
