"""KTO on examples labelled desirable or undesirable (no pairs needed).

    accelerate launch examples/kto.py                      # embedded tiny chat model and labelled examples, offline
    accelerate launch examples/kto.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/kto-mix-14k --use_peft --learning_rate 5e-6

Any `KTOConfig` field is a flag (`--beta 0.05 --desirable_weight 1.2`). A paired dataset (prompt/chosen/rejected) is
unpaired automatically. Writes the model, its card and training_metrics.png to --output_dir (default outputs/kto).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align kto` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("kto", argv)


if __name__ == "__main__":
    main()
