"""ReMax (arXiv 2310.10505) with verifiable rewards (RLVR): sample answers, check each with a verifier, and judge each
against the reward of the greedy answer to the same question; no critic.

    accelerate launch examples/remax.py         # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/remax.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_completion_length 1024

The reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`). Any
`ReMaxConfig` field is a flag (`--num_generations 1 --beta 0.05`). Prints the held-out accuracy before and after on
the embedded default. Writes the model, its card and training_metrics.png to --output_dir (default outputs/remax).
"""

from hf_align.scripts import run_rlvr
from hf_align.trainers.remax import ReMaxTrainer

# For the embedded tiny model only (after its SFT warm start): two samples a prompt (the paper's one learns more slowly
# here), short answers, a large learning rate. The warm start's greedy answers beat most of its samples, so most
# advantages are negative; the KL to the warm start keeps pushing down wrong samples from spreading probability over
# nonsense.
EMBEDDED_DEFAULTS = dict(
    learning_rate=1e-3, max_steps=300, per_device_train_batch_size=16, num_generations=2, max_completion_length=6,
    beta=0.1, logging_steps=20, save_strategy="no", report_to="none",
)


if __name__ == "__main__":
    run_rlvr(ReMaxTrainer, EMBEDDED_DEFAULTS)
