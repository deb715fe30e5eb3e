"""ORPO on preference pairs: supervised fine-tuning on the chosen answers plus an odds-ratio penalty on the rejected
ones, with no reference model.

    accelerate launch examples/orpo.py                     # embedded tiny chat model and pairs, offline
    accelerate launch examples/orpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --use_peft --learning_rate 8e-6

Any `ORPOConfig` field is a flag (`--beta 0.2` sets λ). Writes the model, its card and training_metrics.png to
--output_dir (default outputs/orpo).
"""

from hf_align import ORPOTrainer
from hf_align.scripts import run

# For the embedded tiny model only: it starts from random weights, so it needs a large learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=5e-4, per_device_train_batch_size=8, num_train_epochs=2, logging_steps=10,
    eval_strategy="steps", eval_steps=50, save_strategy="no", report_to="none",
)

if __name__ == "__main__":
    run(ORPOTrainer, "preference", EMBEDDED_DEFAULTS)
