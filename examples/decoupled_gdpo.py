"""Reward-decoupled GDPO (arXiv 2601.05242) with two rewards: a verifier and a format check, each normalised within
its group of answers before they are summed, then GRPO's loss. (examples/gdpo.py is the other GDPO, arXiv
2412.20299.)

    accelerate launch examples/decoupled_gdpo.py    # embedded tiny model (after a short SFT) on "Which is larger?"
    accelerate launch examples/decoupled_gdpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_completion_length 1024

The first reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`); the
second, `number_format_reward`, is 1 when the whole answer is a number. Any `GDPOConfig` field is a flag
(`--reward_weights 1.0 0.5 --loss_type grpo`). Prints the held-out accuracy before and after on the embedded default.
Writes the model, its card and training_metrics.png to --output_dir (default outputs/gdpo).
"""

from hf_align.scripts import run_rlvr
from hf_align.trainers.decoupled_gdpo import GDPOTrainer
from hf_align.verifiers import regex_reward

NUMBER_FORMAT_REWARD = regex_reward(r"\s*-?\d+\s*", name="number_format_reward")


# For the embedded tiny model only (after its SFT warm start): four samples a prompt, short answers, a large
# learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=1e-3, max_steps=150, per_device_train_batch_size=16, num_generations=4, max_completion_length=6,
    logging_steps=20, save_strategy="no", report_to="none",
)


if __name__ == "__main__":
    run_rlvr(GDPOTrainer, EMBEDDED_DEFAULTS, extra_reward_funcs=[NUMBER_FORMAT_REWARD])
