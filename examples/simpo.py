"""SimPO on preference pairs: the length-normalised log-likelihood is the reward, chosen must beat rejected by a
margin γ, and no reference model is used.

    accelerate launch examples/simpo.py                    # embedded tiny chat model and pairs, offline
    accelerate launch examples/simpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --use_peft --learning_rate 1e-6 --beta 2.5 --simpo_gamma 1.4

Any `SimPOConfig` field is a flag (`--beta`, `--simpo_gamma`, `--label_smoothing`). Writes the model, its card and
training_metrics.png to --output_dir (default outputs/simpo).
"""

from hf_align import SimPOTrainer
from hf_align.scripts import run

# For the embedded tiny model only: it starts from random weights, so it needs a large learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=5e-4, per_device_train_batch_size=8, num_train_epochs=2, logging_steps=10,
    eval_strategy="steps", eval_steps=50, save_strategy="no", report_to="none",
)

if __name__ == "__main__":
    run(SimPOTrainer, "preference", EMBEDDED_DEFAULTS)
