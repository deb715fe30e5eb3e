"""RLOO (arXiv 2402.14740): REINFORCE with a leave-one-out baseline, each completion judged against the mean reward
of the other completions of its prompt, and the sequence KL to the reference folded into the reward.

    accelerate launch examples/rloo.py          # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/rloo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_completion_length 1024

The reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`). Any
`RLOOConfig` field is a flag (`--num_generations 4 --beta 0.05 --normalize_advantages`). Prints the held-out
accuracy before and after on the embedded default. Writes the model, its card and training_metrics.png to
--output_dir (default outputs/rloo).
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_align import RLOOTrainer
from hf_align.defaults import load_default_dataset
from hf_align.scripts import run, sft_warm_start, verifier_accuracy, verifier_rewards

# For the embedded tiny model only (after its SFT warm start): four samples a prompt, short answers, a large
# learning rate, no KL (the warm start is a weak reference).
EMBEDDED_DEFAULTS = dict(
    learning_rate=1e-3, max_steps=300, per_device_train_batch_size=16, num_generations=4, max_completion_length=6,
    beta=0.0, logging_steps=20, save_strategy="no", report_to="none",
)


def held_out_accuracy(model, tokenizer) -> float:
    test = load_default_dataset("comparisons", "test")
    return verifier_accuracy(model, tokenizer, test, verifier_rewards(test)["reward_funcs"][0])


if __name__ == "__main__":
    argv = sys.argv[1:]
    embedded = not any(arg.split("=")[0] == "--model_name_or_path" for arg in argv)
    if embedded:
        start = sft_warm_start("comparisons", "outputs/grpo-sft-start", learning_rate=2e-3, num_train_epochs=5)
        tokenizer = AutoTokenizer.from_pretrained(start)
        before = held_out_accuracy(AutoModelForCausalLM.from_pretrained(start), tokenizer)
        argv = ["--model_name_or_path", start, *[f"--{key}={value}" for key, value in EMBEDDED_DEFAULTS.items()], *argv]
    trainer = run(RLOOTrainer, "comparisons", EMBEDDED_DEFAULTS, argv, trainer_kwargs=verifier_rewards)
    if embedded and trainer.is_world_process_zero():
        after = held_out_accuracy(trainer.model, tokenizer)
        print(f"Held-out accuracy (4 samples per question, temperature 1): {before:.1%} before RLOO, {after:.1%} after")
