"""TRL's documented SFT and reward-model quickstarts with `from trl import ...` replaced by `from hf_align import ...`:
a model id or a model object, with and without a LoRA `peft_config`. (DPO's is in test_dpo.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hf_align import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

FAST = dict(max_steps=3, per_device_train_batch_size=2, report_to="none", save_strategy="no", learning_rate=1e-3)


def _train_and_check(trainer):
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 3
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[name], after[name].detach()) for name in before), "no trainable weight moved"


@pytest.mark.parametrize("as_id", [True, False], ids=["model-id", "model-object"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_sft_quickstart(as_id, peft, tiny_model_path, embedded_data, tmp_path):
    dataset = embedded_data("sft_conversational", 12)
    model = tiny_model_path if as_id else AutoModelForCausalLM.from_pretrained(tiny_model_path)
    kwargs = {} if as_id else {"processing_class": AutoTokenizer.from_pretrained(tiny_model_path)}
    if peft:
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    trainer = SFTTrainer(model=model, train_dataset=dataset, args=SFTConfig(output_dir=str(tmp_path), **FAST),
                         **kwargs)
    _train_and_check(trainer)


@pytest.mark.parametrize("as_id", [True, False], ids=["model-id", "model-object"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_reward_quickstart(as_id, peft, tiny_seqcls_path, preference_data, tmp_path):
    dataset = preference_data("conversational", 12)
    if as_id:
        model, kwargs = tiny_seqcls_path, {}
    else:
        model = AutoModelForSequenceClassification.from_pretrained(tiny_seqcls_path, num_labels=1)
        kwargs = {"processing_class": AutoTokenizer.from_pretrained(tiny_seqcls_path)}
    if peft:
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=str(tmp_path), **FAST), train_dataset=dataset,
                            **kwargs)
    _train_and_check(trainer)
