"""Step-DPO (arXiv 2406.18629) on step-level pairs: given a question and its verified reasoning steps, prefer the
correct next step over the first wrong one.

    accelerate launch examples/step_dpo.py      # embedded tiny chat model and arithmetic word problems, offline
    accelerate launch examples/step_dpo.py --model_name_or_path Qwen/Qwen2.5-Math-1.5B-Instruct \
        --dataset_name xinlai/Math-Step-DPO-10K --use_peft --learning_rate 5e-6

Rows need `prompt`, `initial_reason_steps`, `chosen`, `rejected` (see `hf_align.StepDPOTrainer`). Any
`StepDPOConfig` field is a flag (`--beta 0.4`). Writes the model, its card and training_metrics.png to
--output_dir (default outputs/step-dpo).
"""

from hf_align import StepDPOTrainer
from hf_align.scripts import run

# For the embedded tiny model only: it starts from random weights, so it needs a large learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=1e-3, per_device_train_batch_size=8, num_train_epochs=4, warmup_steps=0.0, logging_steps=10,
    eval_strategy="steps", eval_steps=25, save_strategy="no", report_to="none",
)

if __name__ == "__main__":
    run(StepDPOTrainer, "step_preference", EMBEDDED_DEFAULTS)
