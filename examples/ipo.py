"""IPO on preference pairs (DPO's data; squared loss on length-normalised log-ratios).

    accelerate launch examples/ipo.py                      # embedded tiny chat model and pairs, offline
    accelerate launch examples/ipo.py --model_name_or_path <hub id> --dataset_name <hub dataset> --use_peft

Any `IPOConfig` field is a flag. Writes the model, its card and training_metrics.png to --output_dir.
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align ipo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("ipo", argv)


if __name__ == "__main__":
    main()
