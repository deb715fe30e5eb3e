"""RLVR: GRPO with a verifier as its only reward raises held-out accuracy on the embedded verifiable task ("Which is
larger, a or b?", exact match), from a fixed seed. The model starts from a short SFT on the training questions (the
tiny model's weights are random), as the RLVR example does."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_align import GRPOConfig, GRPOTrainer
from hf_align.defaults import load_default_dataset
from hf_align.scripts import sft_warm_start, verifier_accuracy
from hf_align.verifiers import exact_match_reward


def test_grpo_with_a_verifier_raises_held_out_accuracy(hf_align_home, tmp_path):
    start = sft_warm_start("comparisons", str(tmp_path / "sft"), learning_rate=2e-3, num_train_epochs=5,
                           disable_tqdm=True)
    tokenizer = AutoTokenizer.from_pretrained(start)
    test = load_default_dataset("comparisons", "test")
    verifier = exact_match_reward()
    before = verifier_accuracy(AutoModelForCausalLM.from_pretrained(start), tokenizer, test, verifier)

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), learning_rate=1e-3, max_steps=200, per_device_train_batch_size=16,
        num_generations=8, max_completion_length=6, logging_steps=20, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = GRPOTrainer(start, verifier, args=args, train_dataset=load_default_dataset("comparisons"))
    trainer.train()
    after = verifier_accuracy(trainer.model, tokenizer, test, verifier)

    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(f"[rlvr] held-out accuracy {before:.3f} -> {after:.3f}; train reward by 20 steps {rewards}")
    assert after > before + 0.1
    assert rewards[-1] > rewards[0]
