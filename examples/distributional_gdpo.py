"""Distributional GDPO (arXiv 2412.20299) on belief-conditioned preference pairs: calibrate the model's beliefs to a
group's belief distribution, and prefer responses consistent with the belief they follow.

    accelerate launch examples/distributional_gdpo.py          # embedded tiny chat model and the toy town survey, offline
    accelerate launch examples/distributional_gdpo.py --model_name_or_path Qwen/Qwen2.5-0.5B \
        --dataset_name my_beliefs.jsonl --use_peft --learning_rate 5e-6

Rows need `prompt`, `beliefs`, `belief_distribution`, `belief`, `chosen`, `rejected` (see
`hf_align.DistributionalGDPOTrainer`). Any `DistributionalGDPOConfig` field is a flag (`--beta 0.1
--calibration_weight 2`). Writes the model, its card and training_metrics.png to --output_dir (default
outputs/gdpo-distributional).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align distributional_gdpo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("distributional_gdpo", argv)


if __name__ == "__main__":
    main()
