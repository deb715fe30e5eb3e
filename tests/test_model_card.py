"""The model card (`AlignTrainer.create_model_card`), in the shape of TRL's: quick start, training procedure with
the tracker's link, framework versions, citations."""

import re
import sys
import types

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_align import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

torch.set_num_threads(1)

WANDB_RUN_URL = "https://wandb.ai/me/tiny/runs/abc123"


def _quick_start(card_text: str) -> str:
    return re.search(r"## Quick start\n\n```python\n(.*?)```", card_text, re.S).group(1)


@pytest.fixture
def dpo_card(tiny_model_path, tiny_tokenizer, preference_data, tmp_path, monkeypatch):
    """The card a 1-step DPO run writes, with a W&B run active (a stand-in module: wandb is not installed here)."""
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=types.SimpleNamespace(url=WANDB_RUN_URL)))
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to="none",
                     save_strategy="no", beta=0.25)
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                         train_dataset=preference_data("preference", 4), processing_class=tiny_tokenizer)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(dataset_name="trl-lib/ultrafeedback_binarized")
    return tmp_path / "out", ModelCard((tmp_path / "out" / "README.md").read_text())


def test_dpo_card_has_every_part(dpo_card):
    out, card = dpo_card
    text = card.text
    assert {"hf_align", "dpo"} <= set(card.data.tags) and card.data.pipeline_tag == "text-generation"
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    quick_start = _quick_start(text)
    assert f'pipeline("text-generation", model="{out}"' in quick_start
    # Training procedure: the trainer, its paper, the key hyper-parameters and the tracker's run.
    assert "This model was trained with DPOTrainer (DPO)" in text
    assert "https://arxiv.org/abs/2305.18290" in text
    assert "- beta: 0.25" in text and "- max_steps: 1" in text and "- learning_rate:" in text
    assert f"[Visualize in Weights & Biases]({WANDB_RUN_URL})" in text
    versions = text.split("### Framework versions", 1)[1].split("## Citations", 1)[0]
    for package in ("hf_align", "trl", "transformers", "torch", "datasets", "tokenizers"):
        assert f"- {package}: " in versions, package
    assert "- peft:" not in versions  # no adapter was trained
    citations = text.split("## Citations", 1)[1]
    assert "@inproceedings{rafailov2023direct" in citations and "@software{hf_align" in citations
    assert "hub_token" not in text


def test_dpo_card_quick_start_loads_the_saved_model(dpo_card):
    _, card = dpo_card
    snippet = _quick_start(card.text).replace("max_new_tokens=128", "max_new_tokens=4")
    printed = []
    exec(snippet, {"print": printed.append})  # the snippet as a user would paste it
    assert len(printed) == 1 and isinstance(printed[0], str)


def test_reward_card_uses_text_classification_and_the_hub_id(tiny_seqcls_path, preference_data, tmp_path):
    args = RewardConfig(output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no",
                        hub_model_id="me/tiny-reward")
    trainer = RewardTrainer(tiny_seqcls_path, args=args, train_dataset=preference_data("preference", 4))
    trainer.create_model_card()
    card = ModelCard((tmp_path / "out" / "README.md").read_text())
    quick_start = _quick_start(card.text)
    assert 'pipeline("text-classification", model="me/tiny-reward"' in quick_start
    assert "text-generation" not in quick_start and card.data.pipeline_tag == "text-classification"
    assert "https://arxiv.org/abs/2203.02155" in card.text and "Weights & Biases" not in card.text
