"""DPO on preference pairs.

    accelerate launch examples/dpo.py                      # embedded tiny chat model and pairs, offline
    accelerate launch examples/dpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --use_peft --learning_rate 5e-6

Any `DPOConfig` field is a flag (`--beta 0.05 --loss_type ipo`). Writes the model, its card and
training_metrics.png to --output_dir (default outputs/dpo).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align dpo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("dpo", argv)


if __name__ == "__main__":
    main()
