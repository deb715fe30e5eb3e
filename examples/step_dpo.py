"""Step-DPO (arXiv 2406.18629) on step-level pairs: given a question and its verified reasoning steps, prefer the
correct next step over the first wrong one.

    accelerate launch examples/step_dpo.py      # embedded tiny chat model and arithmetic word problems, offline
    accelerate launch examples/step_dpo.py --model_name_or_path Qwen/Qwen2.5-Math-1.5B-Instruct \
        --dataset_name xinlai/Math-Step-DPO-10K --use_peft --learning_rate 5e-6

Rows need `prompt`, `initial_reason_steps`, `chosen`, `rejected` (see `hf_align.StepDPOTrainer`). Any
`StepDPOConfig` field is a flag (`--beta 0.4`). Writes the model, its card and training_metrics.png to
--output_dir (default outputs/step-dpo).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align step_dpo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("step_dpo", argv)


if __name__ == "__main__":
    main()
