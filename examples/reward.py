"""Reward model on preference pairs (a one-output sequence classifier, Bradley–Terry loss).

    accelerate launch examples/reward.py                   # embedded tiny reward model and pairs, offline
    accelerate launch examples/reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --use_peft --learning_rate 1e-4

Any `RewardConfig` field is a flag (`--center_rewards_coefficient 0.01`). A causal-LM checkpoint gets a new
one-output head; with --use_peft the adapter is SEQ_CLS, so the head is trained too. Writes the model, its card and
training_metrics.png to --output_dir (default outputs/reward).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align reward` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("reward", argv)


if __name__ == "__main__":
    main()
