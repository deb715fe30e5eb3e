"""TRL Config fields several trainers share: `router_aux_loss_coef` (SFT, DPO, KTO), `pad_token` (DPO) and
`activation_offloading` (SFT, reward modelling, DPO, KTO)."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import hf_align
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


def _mixtral_path(tokenizer, folder) -> str:
    model = _mixtral(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("trainer_name, dataset", [("SFT", "sft"), ("DPO", "preference"),
                                                   ("KTO", "unpaired_preference")])
@pytest.mark.parametrize("coef", [None, 0.5, 0.0])
def test_router_aux_loss_trains_like_trl(trainer_name, dataset, coef, tiny_tokenizer, embedded_data, tmp_path):
    """A Mixture-of-Experts model: the load-balancing loss is added with the config's weight (None), a given one,
    or not at all (0), and the losses and `aux_loss` logged over two steps are TRL's."""
    trl = pytest.importorskip("trl")
    path = _mixtral_path(tiny_tokenizer, tmp_path / "mixtral")
    rows = embedded_data(dataset, 8)
    options = dict(COMMON, router_aux_loss_coef=coef, bf16=False, seed=0)
    logs = []
    for module in (trl, hf_align):
        config = getattr(module, f"{trainer_name}Config")(output_dir=str(tmp_path / module.__name__), **options,
                                                          **({} if module is hf_align else
                                                             {"gradient_checkpointing": False}))
        trainer = getattr(module, f"{trainer_name}Trainer")(path, args=config, train_dataset=rows,
                                                            processing_class=tiny_tokenizer)
        trainer.train()
        logs.append([entry for entry in trainer.state.log_history if "loss" in entry])
    ours, theirs = logs[1], logs[0]
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
        assert ("aux_loss" in a) == ("aux_loss" in b) == (coef != 0.0)
        if "aux_loss" in b:
            assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=2e-3) and a["aux_loss"] > 0


def test_router_aux_loss_with_packed_rows_is_refused(tiny_tokenizer, embedded_data, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), router_aux_loss_coef=0.5, prefix_sharing=True, **COMMON)
    with pytest.raises(ValueError, match="packed rows"):
        DPOTrainer(_mixtral(tiny_tokenizer), args=args, train_dataset=embedded_data("preference", 8),
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
