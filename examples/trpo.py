"""TRPO (arXiv 1502.05477) for LLMs: natural-gradient steps, each inside a trust region `KL(π_old ‖ π) ≤ max_kl`
found by conjugate gradient on Fisher-vector products and checked by a line search.

    accelerate launch examples/trpo.py          # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/trpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --advantage_estimator grpo --num_generations 8 \
        --per_device_train_batch_size 64 --max_completion_length 1024

The reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`). Any
`TRPOConfig` field is a flag (`--max_kl 0.01 --cg_iterations 10`; `--advantage_estimator gae` for a critic and GAE).
One process. Prints the held-out accuracy before and after on the embedded default. Writes the model, its card and
training_metrics.png to --output_dir (default outputs/trpo).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align trpo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("trpo", argv)


if __name__ == "__main__":
    main()
