"""SimPO on preference pairs: the length-normalised log-likelihood is the reward, chosen must beat rejected by a
margin γ, and no reference model is used.

    accelerate launch examples/simpo.py                    # embedded tiny chat model and pairs, offline
    accelerate launch examples/simpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --use_peft --learning_rate 1e-6 --beta 2.5 --simpo_gamma 1.4

Any `SimPOConfig` field is a flag (`--beta`, `--simpo_gamma`, `--label_smoothing`). Writes the model, its card and
training_metrics.png to --output_dir (default outputs/simpo).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align simpo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("simpo", argv)


if __name__ == "__main__":
    main()
