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

from hf_align.scripts import run_rlvr
from hf_align.trainers.reinforce import ReinforcePPTrainer

# For the embedded tiny model only (after its SFT warm start): four samples a prompt with the group baseline, short
# answers, a large learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=1e-3, max_steps=150, per_device_train_batch_size=16, num_generations=4, max_completion_length=6,
    advantage_estimator="reinforce++_baseline", logging_steps=20, save_strategy="no", report_to="none",
)


if __name__ == "__main__":
    run_rlvr(ReinforcePPTrainer, EMBEDDED_DEFAULTS)
