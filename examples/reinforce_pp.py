"""REINFORCE++ (arXiv 2501.03262) with verifiable rewards (RLVR): per-token KL penalty plus the verifier's score at
the end, returns whitened over the whole batch, PPO-clipped; no critic.

    accelerate launch examples/reinforce_pp.py  # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/reinforce_pp.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_completion_length 1024

The reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`). Any
`ReinforcePPConfig` field is a flag (`--advantage_estimator reinforce++_baseline --beta 0.001 --num_iterations 2`).
Prints the held-out accuracy before and after on the embedded default. Writes the model, its card and
training_metrics.png to --output_dir (default outputs/reinforce++).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align reinforce_pp` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("reinforce_pp", argv)


if __name__ == "__main__":
    main()
