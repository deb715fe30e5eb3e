"""Reward model on preference pairs (a one-output sequence classifier, Bradley–Terry loss).

    accelerate launch examples/reward.py                   # embedded tiny reward model and pairs, offline
    accelerate launch examples/reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --use_peft --learning_rate 1e-4

Any `RewardConfig` field is a flag (`--center_rewards_coefficient 0.01`). A causal-LM checkpoint gets a new
one-output head; with --use_peft the adapter is SEQ_CLS, so the head is trained too. Writes the model, its card and
training_metrics.png to --output_dir (default outputs/reward).
"""

from hf_align import RewardTrainer
from hf_align.scripts import run

# For the embedded tiny model only: it starts from random weights, so it needs a large learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=5e-4, per_device_train_batch_size=8, num_train_epochs=2, logging_steps=10,
    eval_strategy="steps", eval_steps=50, save_strategy="no", report_to="none",
)

if __name__ == "__main__":
    run(RewardTrainer, "preference", EMBEDDED_DEFAULTS)
