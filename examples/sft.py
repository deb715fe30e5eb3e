"""SFT on prompt-completion pairs (or `text` / `messages` datasets).

    accelerate launch examples/sft.py                      # embedded tiny chat model and pairs, offline
    accelerate launch examples/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B \
        --dataset_name trl-lib/Capybara --use_peft --learning_rate 2e-4

Any `SFTConfig` field is a flag (`--packing --max_length 512`). Writes the model, its card and
training_metrics.png to --output_dir (default outputs/sft).
"""

from hf_align import SFTTrainer
from hf_align.scripts import run

# For the embedded tiny model only: it starts from random weights, so it needs a large learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=2e-3, per_device_train_batch_size=8, num_train_epochs=2, logging_steps=10,
    eval_strategy="steps", eval_steps=50, save_strategy="no", report_to="none",
)

if __name__ == "__main__":
    run(SFTTrainer, "sft", EMBEDDED_DEFAULTS)
