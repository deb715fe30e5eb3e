"""IPO on preference pairs (DPO's data; squared loss on length-normalised log-ratios).

    accelerate launch examples/ipo.py                      # embedded tiny chat model and pairs, offline
    accelerate launch examples/ipo.py --model_name_or_path <hub id> --dataset_name <hub dataset> --use_peft

Any `IPOConfig` field is a flag. Writes the model, its card and training_metrics.png to --output_dir.
"""

from hf_align import IPOTrainer
from hf_align.scripts import run

# For the embedded tiny model only: it starts from random weights, so it needs a large learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=5e-4, per_device_train_batch_size=8, num_train_epochs=2, logging_steps=10,
    eval_strategy="steps", eval_steps=50, save_strategy="no", report_to="none",
)

if __name__ == "__main__":
    run(IPOTrainer, "preference", EMBEDDED_DEFAULTS)
