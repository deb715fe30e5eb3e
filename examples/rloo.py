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

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align rloo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("rloo", argv)


if __name__ == "__main__":
    main()
