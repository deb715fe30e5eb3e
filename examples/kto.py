"""KTO on examples labelled desirable or undesirable (no pairs needed).

    accelerate launch examples/kto.py                      # embedded tiny chat model and labelled examples, offline
    accelerate launch examples/kto.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/kto-mix-14k --use_peft --learning_rate 5e-6

Any `KTOConfig` field is a flag (`--beta 0.05 --desirable_weight 1.2`). A paired dataset (prompt/chosen/rejected) is
unpaired automatically. Writes the model, its card and training_metrics.png to --output_dir (default outputs/kto).
"""

from hf_align import KTOTrainer
from hf_align.scripts import run

# For the embedded tiny model only: it starts from random weights, so it needs a large learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=5e-4, per_device_train_batch_size=8, num_train_epochs=2, logging_steps=10,
    eval_strategy="steps", eval_steps=50, save_strategy="no", report_to="none",
)

if __name__ == "__main__":
    run(KTOTrainer, "unpaired_preference", EMBEDDED_DEFAULTS)
