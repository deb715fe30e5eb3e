"""REINFORCE (Williams 1992) with verifiable rewards (RLVR): each answer's return minus the mean return of the other
answers to the same question, times the gradient of its log-probability; on-policy, no clipping, no critic.

    accelerate launch examples/reinforce.py     # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/reinforce.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_completion_length 1024

The reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`). Any
`ReinforceConfig` field is a flag (`--gamma 0.99 --beta 0.01`). Prints the held-out accuracy before and after on the
embedded default. Writes the model, its card and training_metrics.png to --output_dir (default outputs/reinforce).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align reinforce` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("reinforce", argv)


if __name__ == "__main__":
    main()
