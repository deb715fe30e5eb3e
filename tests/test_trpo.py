"""TRPOTrainer: every accepted update stays inside the trust region (measured KL(π_old ‖ π_new) ≤ δ), TRPO raises
held-out accuracy on the embedded verifiable task from a fixed seed, the critic of the GAE mode is trained by the
optimizer while the policy moves only by trust-region steps, and the configuration guards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_align.defaults import load_default_dataset
from hf_align.scripts import verifier_accuracy
from hf_align.trainers.trpo import TRPOConfig, TRPOTrainer
from hf_align.verifiers import exact_match_reward

QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)


def test_accepted_updates_stay_within_the_trust_region_and_raise_accuracy(rlvr_start_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(rlvr_start_path)
    test = load_default_dataset("comparisons", "test")
    verifier = exact_match_reward()
    before = verifier_accuracy(AutoModelForCausalLM.from_pretrained(rlvr_start_path), tokenizer, test, verifier)

    max_kl = 0.02
    args = TRPOConfig(output_dir=str(tmp_path / "trpo"), max_steps=10, per_device_train_batch_size=32,
                      num_generations=8, advantage_estimator="grpo", max_completion_length=6, max_kl=max_kl, **QUIET)
    trainer = TRPOTrainer(rlvr_start_path, verifier, args=args, train_dataset=load_default_dataset("comparisons"))
    trainer.train()
    after = verifier_accuracy(trainer.model, tokenizer, test, verifier)

    history = trainer.trpo_history
    print(f"[trpo] held-out accuracy {before:.3f} -> {after:.3f}; KL per update "
          f"{[round(stats.kl, 4) for stats in history]}")
    assert len(history) == 10 and sum(stats.accepted for stats in history) >= 8
    assert all(stats.kl <= max_kl * (1 + 1e-3) for stats in history if stats.accepted)
    assert all(stats.improvement > 0 for stats in history if stats.accepted)
    assert after > before + 0.05
    logged = [entry for entry in trainer.state.log_history if "trpo/kl" in entry]
    assert {"trpo/line_search_steps", "trpo/cg_residual", "trpo/accepted"} <= set(logged[0])


def test_gae_mode_trains_the_critic_by_gradient_and_the_policy_by_trust_region(rlvr_start_path, tmp_path):
    args = TRPOConfig(output_dir=str(tmp_path / "trpo"), max_steps=2, per_device_train_batch_size=8,
                      max_completion_length=6, max_kl=0.01, learning_rate=1e-2, **QUIET)
    trainer = TRPOTrainer(rlvr_start_path, exact_match_reward(), args=args,
                          train_dataset=load_default_dataset("comparisons"))
    head = [p.detach().clone() for p in trainer.critic.parameters()]
    trainer.train()
    assert all(stats.kl <= 0.01 * (1 + 1e-3) for stats in trainer.trpo_history if stats.accepted)
    assert any(not torch.equal(before, after) for before, after in zip(head, trainer.critic.parameters()))
    assert "loss/value" in trainer.state.log_history[0] and "val/explained_variance" in trainer.state.log_history[0]


def test_configuration_guards(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        TRPOConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to="none")
    with pytest.raises(ValueError, match="num_generations >= 2"):
        TRPOConfig(output_dir=str(tmp_path), advantage_estimator="grpo", report_to="none")
    with pytest.raises(ValueError, match="max_kl"):
        TRPOConfig(output_dir=str(tmp_path), max_kl=0, report_to="none")
