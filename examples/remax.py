"""ReMax (arXiv 2310.10505) with verifiable rewards (RLVR): sample answers, check each with a verifier, and judge each
against the reward of the greedy answer to the same question; no critic.

    accelerate launch examples/remax.py         # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/remax.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_completion_length 1024

The reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`). Any
`ReMaxConfig` field is a flag (`--num_generations 1 --beta 0.05`). Prints the held-out accuracy before and after on
the embedded default. Writes the model, its card and training_metrics.png to --output_dir (default outputs/remax).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align remax` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("remax", argv)


if __name__ == "__main__":
    main()
