"""REINFORCE (Williams 1992) with verifiable rewards (RLVR): each answer's return minus the mean return of the other
answers to the same question, times the gradient of its log-probability; on-policy, no clipping, no critic.

    accelerate launch examples/reinforce.py     # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/reinforce.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_completion_length 1024

The reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`). Any
`ReinforceConfig` field is a flag (`--gamma 0.99 --beta 0.01`). Prints the held-out accuracy before and after on the
embedded default. Writes the model, its card and training_metrics.png to --output_dir (default outputs/reinforce).
"""

from hf_align.scripts import run_rlvr
from hf_align.trainers.reinforce import ReinforceTrainer

# For the embedded tiny model only (after its SFT warm start): four samples a prompt, short answers, a large
# learning rate, no KL (the warm start is a weak reference).
EMBEDDED_DEFAULTS = dict(
    learning_rate=1e-3, max_steps=150, per_device_train_batch_size=16, num_generations=4, max_completion_length=6,
    beta=0.0, logging_steps=20, save_strategy="no", report_to="none",
)


if __name__ == "__main__":
    run_rlvr(ReinforceTrainer, EMBEDDED_DEFAULTS)
