"""SFT on prompt-completion pairs (or `text` / `messages` datasets).

    accelerate launch examples/sft.py                      # embedded tiny chat model and pairs, offline
    accelerate launch examples/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B \
        --dataset_name trl-lib/Capybara --use_peft --learning_rate 2e-4

Any `SFTConfig` field is a flag (`--packing --max_length 512`). Writes the model, its card and
training_metrics.png to --output_dir (default outputs/sft).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align sft` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("sft", argv)


if __name__ == "__main__":
    main()
