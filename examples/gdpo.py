"""Distributional GDPO (arXiv 2412.20299) on belief-conditioned preference pairs: calibrate the model's beliefs to a
group's belief distribution, and prefer responses consistent with the belief they follow.

    accelerate launch examples/gdpo.py          # embedded tiny chat model and the toy town survey, offline
    accelerate launch examples/gdpo.py --model_name_or_path Qwen/Qwen2.5-0.5B \
        --dataset_name my_beliefs.jsonl --use_peft --learning_rate 5e-6

Rows need `prompt`, `beliefs`, `belief_distribution`, `belief`, `chosen`, `rejected` (see
`hf_align.DistributionalGDPOTrainer`). Any `DistributionalGDPOConfig` field is a flag (`--beta 0.1
--calibration_weight 2`). Writes the model, its card and training_metrics.png to --output_dir (default
outputs/gdpo-distributional).
"""

from hf_align import DistributionalGDPOTrainer
from hf_align.scripts import run

# For the embedded tiny model only: it starts from random weights, so it needs a large learning rate; β = 0.5 makes
# the belief-conditioned preference learn within the few epochs this toy task gets.
EMBEDDED_DEFAULTS = dict(
    learning_rate=1e-3, beta=0.5, per_device_train_batch_size=8, num_train_epochs=6, logging_steps=10,
    eval_strategy="steps", eval_steps=50, save_strategy="no", report_to="none",
)

if __name__ == "__main__":
    run(DistributionalGDPOTrainer, "belief_preference", EMBEDDED_DEFAULTS)
