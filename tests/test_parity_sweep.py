"""Parity sweep off the tested path: hf_align's DPO, KTO, GRPO and RLOO trainers log TRL 1.16's numbers (2e-3 relative
on the loss and on every metric both log) on architectures other than Llama, under LoRA (a fresh adapter, and one
trained before), and with gradient accumulation.

Each case trains both trainers with `Trainer.train()` (`logging_steps=1`) from the same weights on the same rows and
compares their `log_history`:

- architectures: Qwen2, Mistral (a sliding window shorter than the sequences) and Gemma 2 (logit and attention soft
  caps), built tiny from configs here with random fp32 weights, over the tiny tokenizer of `tiny_model_path` (always
  passed as an object: `AutoTokenizer` on a qwen2 folder would swap in Qwen's pre-tokenizer).
- plain: DPO and KTO train the model against a noised, sharper copy of it as an explicit `ref_model` (so rewards,
  margins and KTO's KL are non-zero at the first step) for one optimizer step; GRPO and RLOO train from the saved
  folder on the fixed completions of `test_grpo` for four optimizer steps over two generation batches (the reference is
  the start: the KL is 0 at the first step, not once the policy moved; RLOO's, in the reward, on the second batch).
- LoRA: a fresh adapter (`peft_config` to both trainers; its reference is the adapter disabled) and a trained one (a
  `PeftModel` whose LoRA B weights are non-zero, no `peft_config`; TRL copies it into a frozen "ref" adapter): two
  optimizer steps, the first checks the reference is the starting policy, the second that the update matched.
- gradient accumulation 2: DPO (two micro-batches of 4 pairs) and GRPO (one generation batch of 16 completions split
  in two micro-batches) for one optimizer step.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, MistralConfig, Qwen2Config

import hf_align
# hf_align's sampling replaced (a fixture) and TRL's, by the same fixed completions.
from test_grpo import answer_reward, length_reward, patch_hf_align_generation, patch_trl_generation  # noqa: F401
from test_reference_policy import lora_config

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("patch_hf_align_generation")  # GRPO / RLOO sample the fixed completions

REL = 2e-3
ARCHS = ("qwen2", "mistral", "gemma2")
TRAINERS = ("DPO", "KTO", "GRPO", "RLOO")
QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, bf16=False, gradient_checkpointing=False,
             logging_steps=1, seed=0)
# Logged by the Trainer itself, not by the algorithm.
TRAINER_KEYS = {"learning_rate", "epoch", "step"}


def _config(arch: str, tokenizer):
    ids = dict(vocab_size=1024, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**ids, **shape)
    if arch == "mistral":
        return MistralConfig(**ids, **shape, head_dim=8, sliding_window=8)
    if arch == "gemma2":
        return Gemma2Config(**ids, **shape, head_dim=8, sliding_window=8, final_logit_softcapping=3.0,
                            attn_logit_softcapping=5.0, query_pre_attn_scalar=8)
    raise ValueError(arch)


@pytest.fixture(scope="module")
def arch_path(tiny_model_path, tmp_path_factory):
    """`arch_path(arch)`: a folder holding the tiny random fp32 model of `arch` (no tokenizer: pass the object)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert len(tokenizer) <= 1024
    paths = {}

    def get(arch: str) -> str:
        if arch not in paths:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_config(arch, tokenizer), dtype=torch.float32)
            with torch.no_grad():  # logits spread over several units (a random tiny model is nearly uniform)
                model.get_output_embeddings().weight.mul_(8.0)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            paths[arch] = str(path)
        return paths[arch]

    return get


def _load(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _reference(path: str) -> torch.nn.Module:
    """The model at `path` plus fixed-seed noise, its logits sharpened: it scores the (random to it) rows lower than
    the model does, so DPO's rewards and KTO's KL (clamped at 0) are clearly non-zero."""
    model = _load(path)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        model.get_output_embeddings().weight.mul_(1.5)
    return model


@pytest.fixture(scope="module")
def trained_adapter(arch_path, tmp_path_factory):
    """`trained_adapter(arch)`: a fresh `PeftModel` (trainable) loading a LoRA adapter "trained" before (fixed-seed
    noise on A and B, saved to disk), as a user starts "DPO after SFT"."""
    saved = {}

    def get(arch: str) -> PeftModel:
        if arch not in saved:
            torch.manual_seed(0)
            model = get_peft_model(_load(arch_path(arch)), lora_config())
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_" in name:
                        parameter.copy_(0.3 * torch.randn_like(parameter))
            saved[arch] = str(tmp_path_factory.mktemp(f"adapter-{arch}"))
            model.save_pretrained(saved[arch])
        return PeftModel.from_pretrained(_load(arch_path(arch)), saved[arch], is_trainable=True)

    return get


# ------------------------------------------------------------------------------------------------------ the runs


def _logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _offline_dataset(name: str, embedded_data, preference_data):
    return preference_data("preference", 8) if name == "DPO" else embedded_data("unpaired_preference", 8)


def _online_settings(tmp_path, **overrides) -> dict:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_steps=2,
                    max_completion_length=8, learning_rate=5e-3, num_iterations=2, beta=0.04, temperature=0.7,
                    **QUIET)
    settings.update(overrides)
    return settings


def run_pair(name: str, make_model, tokenizer_path: str, embedded_data, preference_data, tmp_path, *,
             ref_model=None, peft_config=None, **overrides):
    """Trains TRL's and hf_align's `name` trainer from `make_model()` (a fresh model or folder per call) with the same
    settings; returns their logs (TRL's first)."""
    online = name in ("GRPO", "RLOO")
    if online:
        settings = _online_settings(tmp_path, **overrides)
        dataset = embedded_data("prompts", 16)
    else:
        settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1,
                        learning_rate=1e-2, **QUIET)
        settings.update(overrides)
        dataset = _offline_dataset(name, embedded_data, preference_data)
    trainers = []
    for library in (trl, hf_align):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        args = getattr(library, f"{name}Config")(**settings)
        kwargs = dict(args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
        torch.manual_seed(0)  # a fresh adapter's random A weights
        if online:
            trainer = getattr(library, f"{name}Trainer")(make_model(), [length_reward, answer_reward], **kwargs)
            if library is trl:
                patch_trl_generation(trainer, tokenizer.eos_token_id)
        else:
            trainer = getattr(library, f"{name}Trainer")(make_model(), ref_model=ref_model and ref_model(), **kwargs)
        trainers.append(trainer)
    # Both start from the same weights, with the same ones trainable (a trained adapter's "ref" copy frozen in both).
    theirs, ours = ({name: (p.detach().clone(), p.requires_grad) for name, p in t.model.named_parameters()}
                    for t in trainers)
    assert theirs.keys() == ours.keys(), set(theirs) ^ set(ours)
    for key, (value, trainable) in theirs.items():
        assert torch.equal(ours[key][0], value) and ours[key][1] == trainable, key
    for trainer in trainers:
        trainer.train()
    return [_logs(trainer) for trainer in trainers]


def compare(theirs: list[dict], ours: list[dict], steps: int, label: str) -> None:
    """Every key both log at each step agrees to `REL` (1e-6 absolute for values ~0 in both)."""
    assert len(theirs) == len(ours) == steps, (len(theirs), len(ours))
    for step, (expected, actual) in enumerate(zip(theirs, ours), start=1):
        shared = sorted(set(expected) & set(actual) - TRAINER_KEYS)
        assert "loss" in shared and "grad_norm" in shared
        mismatched = {key: (expected[key], actual[key]) for key in shared
                      if actual[key] != pytest.approx(expected[key], rel=REL, abs=1e-6)}
        assert not mismatched, f"{label} step {step}: key: (TRL, hf_align) {mismatched}"
        worst = max((abs(actual[key] - expected[key]) / abs(expected[key]), key) for key in shared
                    if abs(expected[key]) > 1e-6)
        print(f"[sweep] {label} step {step}: {len(shared)} keys agree (worst relative difference {worst[0]:.1e}, "
              f"{worst[1]}); TRL only {sorted(set(expected) - set(actual))}, hf_align only "
              f"{sorted(set(actual) - set(expected))}")


# ------------------------------------------------------------------------------------------------ architectures


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", TRAINERS)
def test_architectures(name, arch, arch_path, tiny_model_path, embedded_data, preference_data, tmp_path):
    path = arch_path(arch)
    if name in ("GRPO", "RLOO"):
        # Two generation batches, each used for two optimizer steps: the second is sampled after two updates.
        theirs, ours = run_pair(name, lambda: path, tiny_model_path, embedded_data, preference_data, tmp_path,
                                max_steps=4)
        compare(theirs, ours, 4, f"{name}/{arch}")
        # After an update the loss and the ratios move; the KL (RLOO's, in the reward, measured when sampling) too.
        assert abs(ours[1]["loss"]) > 1e-4 and ours[1]["clip_ratio/region_mean"] > 0
        assert ours[2]["kl"] > 1e-6 and "reward" in ours[2]
    else:
        theirs, ours = run_pair(name, lambda: _load(path), tiny_model_path, embedded_data, preference_data,
                                tmp_path, ref_model=lambda: _reference(path))
        compare(theirs, ours, 1, f"{name}/{arch}")
        assert abs(ours[0]["rewards/margins"]) > 1e-2
        if name == "KTO":
            assert ours[0]["kl"] > 1e-2


# ----------------------------------------------------------------------------------------------------------- LoRA

# Each trainer on one architecture (not Llama), spread over the three.
LORA_ARCH = {"DPO": "mistral", "KTO": "gemma2", "GRPO": "qwen2", "RLOO": "mistral"}


@pytest.mark.parametrize("adapter", ["fresh", "trained"])
@pytest.mark.parametrize("name", TRAINERS)
def test_lora(name, adapter, arch_path, trained_adapter, tiny_model_path, embedded_data, preference_data, tmp_path):
    arch = LORA_ARCH[name]
    label = f"{name}/{arch}/{adapter}-lora"
    online = name in ("GRPO", "RLOO")
    if adapter == "fresh":
        make_model = (lambda: arch_path(arch)) if online else (lambda: _load(arch_path(arch)))
        peft_config = lora_config()
    else:
        make_model, peft_config = (lambda: trained_adapter(arch)), None
    # Two optimizer steps: the first against the starting policy, the second after an update of the adapter.
    theirs, ours = run_pair(name, make_model, tiny_model_path, embedded_data, preference_data, tmp_path,
                            peft_config=peft_config, max_steps=2, learning_rate=2e-2)
    compare(theirs, ours, 2, label)
    first, second = ours
    if name == "DPO":  # the reference is the starting policy: margins 0 and loss ln 2 at first
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(second["rewards/margins"]) > 1e-2
    elif name == "KTO":
        assert first["kl"] == pytest.approx(0, abs=1e-6) and abs(second["rewards/margins"]) > 1e-2
    else:
        assert first["kl"] == pytest.approx(0, abs=1e-6) and abs(second["loss"]) > 1e-4
        assert name == "RLOO" or second["kl"] > 1e-6


# ------------------------------------------------------------------------------------------ gradient accumulation


@pytest.mark.parametrize(("name", "arch"), [("DPO", "gemma2"), ("GRPO", "mistral")])
def test_gradient_accumulation(name, arch, arch_path, tiny_model_path, embedded_data, preference_data, tmp_path):
    """One optimizer step over two micro-batches: the logged loss and metrics cover both."""
    path = arch_path(arch)
    if name == "DPO":  # 8 pairs, 4 per micro-batch
        theirs, ours = run_pair(name, lambda: _load(path), tiny_model_path, embedded_data, preference_data, tmp_path,
                                ref_model=lambda: _reference(path), per_device_train_batch_size=4,
                                gradient_accumulation_steps=2)
        assert abs(ours[0]["rewards/margins"]) > 1e-2
    else:  # one generation batch of 16 completions (4 prompts x 4), 8 per micro-batch
        theirs, ours = run_pair(name, lambda: path, tiny_model_path, embedded_data, preference_data, tmp_path,
                                gradient_accumulation_steps=2, num_iterations=1, max_steps=1)
        assert abs(ours[0]["loss"]) > 1e-4
    compare(theirs, ours, 1, f"{name}/{arch}/grad-accum-2")
