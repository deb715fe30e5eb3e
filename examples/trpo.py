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

from hf_align import TRPOTrainer
from hf_align.scripts import run_rlvr

# For the embedded tiny model only (after its SFT warm start): group-relative advantages over 8 samples a prompt,
# one trust-region step per batch of 32 completions.
EMBEDDED_DEFAULTS = dict(
    advantage_estimator="grpo", num_generations=8, per_device_train_batch_size=32, max_completion_length=6,
    max_kl=0.02, max_steps=30, logging_steps=5, save_strategy="no", report_to="none",
)


if __name__ == "__main__":
    run_rlvr(TRPOTrainer, EMBEDDED_DEFAULTS)
