"""The reference of every trainer that has one is the starting policy, also when the policy is a `PeftModel` whose
adapter was trained before (the usual "SFT with LoRA, then DPO on the same adapter"): then the first DPO loss is ln 2
with zero margins, KTO's rewards and KL start at 0, GRPO's KL is 0 at the first step; with a quantized (4-bit) base
too, with precomputed reference log-probs, and when a run resumes from a checkpoint. A fresh LoRA adapter is the
identity: its reference is the model with the adapter disabled, and no copy is made."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import hf_align
from hf_align import logprobs, models

QUIET = dict(report_to="none", disable_tqdm=True, logging_steps=1, seed=0, learning_rate=1e-3)
OFFLINE = dict(per_device_train_batch_size=4, max_steps=1, save_strategy="no")
ONLINE = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=4, beta=0.1, max_steps=1,
              save_strategy="no")


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def trained_adapter_path(tiny_model_path, tmp_path_factory) -> str:
    """A LoRA adapter saved to disk after "training" (fixed-seed noise on A and B): it changes the model's outputs."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), lora_config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn_like(parameter))
    path = str(tmp_path_factory.mktemp("sft-adapter"))
    model.save_pretrained(path)
    return path


def load_trained(tiny_model_path, adapter_path, quantized: bool = False) -> PeftModel:
    """The base model with the trained adapter loaded for further training, as a user starts "DPO after SFT"."""
    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs.update(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, **kwargs)
    return PeftModel.from_pretrained(base, adapter_path, is_trainable=True)


def sample_logps(module, tokenizer) -> torch.Tensor:
    """Per-token log-probs of two fixed sentences under `module`, without gradients."""
    batch = tokenizer(["The cat sat on the mat.", "Two plus two is four"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return logprobs.completion_logprobs(module, batch["input_ids"], batch["attention_mask"],
                                            batch["attention_mask"]).token_logps


def reference_logps(trainer) -> torch.Tensor:
    with models.reference_model(trainer.model, trainer.ref_model) as reference:
        return sample_logps(reference, trainer.tokenizer)


def first_log(trainer) -> dict:
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


REFERENCE_TRAINERS = {
    "DPOTrainer": ("preference", OFFLINE),
    "IPOTrainer": ("preference", OFFLINE),
    "StepDPOTrainer": ("step_preference", OFFLINE),
    "DistributionalGDPOTrainer": ("belief_preference", OFFLINE),
    "KTOTrainer": ("unpaired_preference", OFFLINE),
    "GRPOTrainer": ("prompts", ONLINE),
    "RLOOTrainer": ("prompts", ONLINE),
    "ReMaxTrainer": ("prompts", ONLINE),
    "ReinforceTrainer": ("prompts", ONLINE),
    "ReinforcePPTrainer": ("prompts", ONLINE),
    "GDPOTrainer": ("prompts", ONLINE),
    "OnlineDPOTrainer": ("prompts", dict(ONLINE, max_new_tokens=4, max_length=64)),
    "PPOTrainer": ("prompts", dict(ONLINE, num_generations=1)),
    "TRPOTrainer": ("prompts", dict(ONLINE, num_generations=1)),
}


def distinct_tokens(completion_ids, **kwargs) -> list[float]:
    return [float(len(set(ids))) for ids in completion_ids]


def build(name, model, embedded_data, tmp_path, **config):
    trainer_cls = getattr(hf_align, name)
    dataset, settings = REFERENCE_TRAINERS[name]
    settings = {key: value for key, value in settings.items() if key in trainer_cls.config_class.__dataclass_fields__}
    args = trainer_cls.config_class(output_dir=str(tmp_path / name), **{**QUIET, **settings, **config})
    kwargs = {"reward_funcs": distinct_tokens} if dataset == "prompts" else {}
    return trainer_cls(model, args=args, train_dataset=embedded_data(dataset, 8), **kwargs)


@pytest.mark.parametrize("name", list(REFERENCE_TRAINERS))
def test_every_reference_is_the_trained_adapter_not_the_base(name, tiny_model_path, trained_adapter_path,
                                                             tiny_tokenizer, embedded_data, tmp_path):
    policy = load_trained(tiny_model_path, trained_adapter_path)
    with policy.disable_adapter():
        base = sample_logps(policy, tiny_tokenizer)
    start = sample_logps(policy, tiny_tokenizer)
    assert (start - base).abs().max() > 1e-2  # the adapter matters, so a base-model reference would be caught
    trainer = build(name, policy, embedded_data, tmp_path)
    torch.testing.assert_close(reference_logps(trainer), start, rtol=0, atol=1e-6)
    # The reference adapter is frozen and stays out of training; the trained one is active and trainable after it ran.
    peft_model = models.unwrap_wrappers(trainer.model)
    assert peft_model.active_adapter == "default"
    for parameter_name, parameter in peft_model.named_parameters():
        if ".ref." in parameter_name:
            assert not parameter.requires_grad, parameter_name
        if ".default." in parameter_name and "lora_" in parameter_name:
            assert parameter.requires_grad, parameter_name


def test_fresh_lora_uses_the_disabled_adapter_without_a_copy(tiny_model_path, tiny_tokenizer, embedded_data,
                                                             tmp_path):
    trainer = hf_align.DPOTrainer(tiny_model_path, args=hf_align.DPOConfig(output_dir=str(tmp_path), **QUIET, **OFFLINE),
                                  train_dataset=embedded_data("preference", 8), peft_config=lora_config())
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    torch.testing.assert_close(reference_logps(trainer), sample_logps(trainer.model, tiny_tokenizer), rtol=0, atol=0)


@pytest.mark.parametrize("setting", ["live", "precomputed", "4-bit base"])
def test_dpo_on_a_trained_adapter_starts_at_ln2(setting, tiny_model_path, trained_adapter_path, embedded_data,
                                                tmp_path):
    policy = load_trained(tiny_model_path, trained_adapter_path, quantized=setting == "4-bit base")
    args = hf_align.DPOConfig(output_dir=str(tmp_path), **QUIET, **OFFLINE,
                              precompute_ref_log_probs=setting == "precomputed")
    trainer = hf_align.DPOTrainer(policy, args=args, train_dataset=embedded_data("preference", 8))
    trainer.train()
    log = first_log(trainer)
    assert log["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert log["rewards/margins"] == pytest.approx(0, abs=1e-5) and log["rewards/chosen"] == pytest.approx(0, abs=1e-5)


def test_kto_on_a_trained_adapter_starts_with_zero_rewards_and_kl(tiny_model_path, trained_adapter_path,
                                                                  embedded_data, tmp_path):
    policy = load_trained(tiny_model_path, trained_adapter_path)
    trainer = build("KTOTrainer", policy, embedded_data, tmp_path)
    trainer.train()
    log = first_log(trainer)
    assert log["kl"] == pytest.approx(0, abs=1e-6) and log["loss"] == pytest.approx(0.5, abs=1e-5)
    assert log["rewards/chosen"] == pytest.approx(0, abs=1e-5)


def test_grpo_on_a_trained_adapter_has_zero_kl_at_the_first_step(tiny_model_path, trained_adapter_path,
                                                                 embedded_data, tmp_path):
    policy = load_trained(tiny_model_path, trained_adapter_path)
    trainer = build("GRPOTrainer", policy, embedded_data, tmp_path)
    trainer.train()
    assert first_log(trainer)["kl"] == pytest.approx(0, abs=1e-7)


def test_resumed_run_keeps_the_starting_adapter_as_reference(tiny_model_path, trained_adapter_path, tiny_tokenizer,
                                                             embedded_data, tmp_path):
    """A run resumed from a checkpoint (its policy adapter moved on) still compares against the adapter it started
    from, and logs what the uninterrupted run logged."""
    start = sample_logps(load_trained(tiny_model_path, trained_adapter_path), tiny_tokenizer)
    settings = dict(max_steps=3, save_strategy="steps", save_steps=2, learning_rate=1e-2)

    def make(folder):
        policy = load_trained(tiny_model_path, trained_adapter_path)
        return build("DPOTrainer", policy, embedded_data, tmp_path / folder, **settings)

    uninterrupted = make("uninterrupted")
    uninterrupted.train()
    resumed = make("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "uninterrupted" / "DPOTrainer" / "checkpoint-2"))
    torch.testing.assert_close(reference_logps(resumed), start, rtol=0, atol=1e-6)
    assert (sample_logps(resumed.model, tiny_tokenizer) - start).abs().max() > 1e-3  # the policy did move
    expected = {e["step"]: e["loss"] for e in uninterrupted.state.log_history if "loss" in e}
    got = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert got[3] == pytest.approx(expected[3], rel=1e-5)
