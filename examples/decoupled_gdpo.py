"""Reward-decoupled GDPO (arXiv 2601.05242) with two rewards: a verifier and a format check, each normalised within
its group of answers before they are summed, then GRPO's loss. (examples/distributional_gdpo.py is the other GDPO,
arXiv 2412.20299.)

    accelerate launch examples/decoupled_gdpo.py    # embedded tiny model (after a short SFT) on "Which is larger?"
    accelerate launch examples/decoupled_gdpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_completion_length 1024

The first reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`); the
second, `number_format_reward`, is 1 when the whole answer is a number. Any `GDPOConfig` field is a flag
(`--reward_weights 1.0 0.5 --loss_type grpo`). Prints the held-out accuracy before and after on the embedded default.
Writes the model, its card and training_metrics.png to --output_dir (default outputs/gdpo).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align decoupled_gdpo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("decoupled_gdpo", argv)


if __name__ == "__main__":
    main()
