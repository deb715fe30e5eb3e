"""RLVR: GRPO with a verifier as its only reward raises held-out accuracy on the embedded verifiable task ("Which is
larger, a or b?", exact match), from a fixed seed. The model starts from a short SFT on the training questions (the
tiny model's weights are random), as the RLVR example does."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_align import GRPOConfig, GRPOTrainer
from hf_align.defaults import load_default_dataset
from hf_align.scripts import verifier_accuracy
from hf_align.verifiers import exact_match_reward


def test_grpo_with_a_verifier_raises_held_out_accuracy(rlvr_start_path, tmp_path):
    start = rlvr_start_path
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


def test_sandboxed_code_verifier_zeroes_hostile_code_and_training_continues(tiny_model_path, tiny_tokenizer,
                                                                            fixed_completions, tmp_path):
    """GRPO on a coding prompt whose sampled completions are an infinite loop, a fork bomb, a huge allocation and a
    network call, next to correct solutions: each hostile one scores 0 within the verifier's time limit, the correct
    ones 1, and the optimizer step is taken."""
    import time

    from datasets import Dataset

    from hf_align.verifiers import code_reward

    correct = "def add(a, b):\n    return a + b\n"
    completions = [
        "```python\ndef add(a, b):\n    while True:\n        pass\n```",
        correct,
        "import os\nwhile True:\n    os.fork()\n",
        correct,
        "blob = bytearray(10**11)\ndef add(a, b):\n    return a + b\n",
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=30)\ndef add(a, b):\n    return a + b\n",
    ]

    def completion(prompt_ids, row, tokenizer, model):
        return tokenizer(completions[row], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    fixed_completions(completion)
    dataset = Dataset.from_list([{"prompt": f"Write add(a, b) in Python ({i}).\n", "tests": ["assert add(1, 2) == 3",
                                  "assert add(-1, 1) == 0"]} for i in range(3)])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=6, num_generations=2,
                      max_completion_length=64, logging_steps=1, shuffle_dataset=False, report_to="none",
                      save_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(tiny_model_path, code_reward(timeout_s=3.0, memory_mb=256), args=args,
                          train_dataset=dataset, processing_class=tiny_tokenizer)
    started = time.monotonic()
    trainer.train()
    elapsed = time.monotonic() - started

    assert trainer.state.global_step == 1
    logged = trainer.state.log_history[0]
    assert logged["rewards/code_reward/mean"] == pytest.approx(2 / 6)  # the two correct solutions only
    assert elapsed < 3.0 * 2 + 10  # the hostile samples run concurrently, each cut at its 3 s limit


def test_rlvr_example_path_runs_offline(tmp_path, monkeypatch):
    """What `python examples/grpo.py` does with no arguments (warm start, verifier from the columns, training,
    accuracy before and after), shortened to two steps."""
    from hf_align.scripts import run_rlvr

    monkeypatch.chdir(tmp_path)
    trainer = run_rlvr(GRPOTrainer, dict(max_steps=2, per_device_train_batch_size=8, num_generations=4,
                                         max_completion_length=4, report_to="none", save_strategy="no"),
                       argv=["--disable_tqdm=True"])
    assert trainer.state.global_step == 2
    assert trainer.reward_scorer.names == ["exact_match_reward"]
    assert (tmp_path / "outputs" / "grpo" / "README.md").is_file()
