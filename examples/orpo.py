"""ORPO on preference pairs: supervised fine-tuning on the chosen answers plus an odds-ratio penalty on the rejected
ones, with no reference model.

    accelerate launch examples/orpo.py                     # embedded tiny chat model and pairs, offline
    accelerate launch examples/orpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --use_peft --learning_rate 8e-6

Any `ORPOConfig` field is a flag (`--beta 0.2` sets λ). Writes the model, its card and training_metrics.png to
--output_dir (default outputs/orpo).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align orpo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("orpo", argv)


if __name__ == "__main__":
    main()
