"""TRL Config fields several trainers share: `router_aux_loss_coef` (SFT, DPO, KTO), `pad_token` (DPO) and
`activation_offloading` (SFT, reward modelling, DPO, KTO)."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from hf_align import DPOConfig, DPOTrainer, KTOConfig, RewardConfig, SFTConfig, SFTTrainer

COMMON = dict(report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, max_steps=2,
              per_device_train_batch_size=4, learning_rate=1e-3)


def _mixtral(tokenizer) -> MixtralForCausalLM:
    """A tiny Mixture-of-Experts model whose config weights its load-balancing loss (Mixtral's default 0.001)."""
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           pad_token_id=tokenizer.pad_token_id)
    assert config.router_aux_loss_coef > 0
    return MixtralForCausalLM(config)


def test_router_aux_loss_coef_zero_trains_a_mixture_of_experts_without_it(tiny_tokenizer, embedded_data, tmp_path):
    model = _mixtral(tiny_tokenizer)
    model.config.output_router_logits = True
    args = SFTConfig(output_dir=str(tmp_path), router_aux_loss_coef=0.0, **COMMON)
    trainer = SFTTrainer(model, args=args, train_dataset=embedded_data("sft", 8), processing_class=tiny_tokenizer)
    assert trainer.model.config.output_router_logits is False  # as TRL: the model stops computing the loss
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and losses[1] < losses[0]


@pytest.mark.parametrize("coef", [None, 0.02])
def test_a_load_balancing_loss_hf_align_would_not_add_is_refused(coef, tiny_tokenizer, embedded_data, tmp_path):
    """TRL adds the load-balancing loss (the config's weight when the field is None); hf_align does not yet, so it
    says so instead of training something else."""
    args = SFTConfig(output_dir=str(tmp_path), router_aux_loss_coef=coef, **COMMON)
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.0"):
        SFTTrainer(_mixtral(tiny_tokenizer), args=args, train_dataset=embedded_data("sft", 8),
                   processing_class=tiny_tokenizer)


def test_router_aux_loss_coef_on_a_model_without_experts_is_refused(tiny_model_path, embedded_data, tmp_path):
    for config, trainer, dataset in ((SFTConfig, SFTTrainer, "sft"), (DPOConfig, DPOTrainer, "preference")):
        args = config(output_dir=str(tmp_path), router_aux_loss_coef=0.1, **COMMON)
        with pytest.raises(ValueError, match="has no experts"):
            trainer(tiny_model_path, args=args, train_dataset=embedded_data(dataset, 8))


def test_dpo_pad_token_pads_the_batches(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    pad = tiny_tokenizer.convert_ids_to_tokens(7)
    trainer = DPOTrainer(tiny_model_path, args=DPOConfig(output_dir=str(tmp_path), pad_token=pad, **COMMON),
                         train_dataset=embedded_data("preference", 8))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert trainer.tokenizer.pad_token_id == 7 and trainer.model.config.pad_token_id == 7
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 7).all() and (batch["attention_mask"] == 0).any()


@pytest.mark.parametrize("config", [SFTConfig, RewardConfig, DPOConfig, KTOConfig])
def test_activation_offloading_needs_a_cuda_device(config, tmp_path):
    with pytest.raises(ValueError, match="activation_offloading=True.*needs a CUDA device"):
        config(output_dir=str(tmp_path), activation_offloading=True)
