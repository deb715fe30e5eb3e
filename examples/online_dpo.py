"""Online DPO (arXiv 2402.04792) with verifiable rewards: sample two answers per prompt from the policy, check each
with a verifier, and train DPO on the pair, the better-scored answer as chosen.

    accelerate launch examples/online_dpo.py    # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/online_dpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_new_tokens 1024 --max_length 2048

The reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`). Any
`OnlineDPOConfig` field is a flag (`--beta 0.05 --loss_type ipo --missing_eos_penalty 1.0`); batch sizes count
completions, two per prompt. To rank pairs with an RLAIF judge instead, build the trainer in Python with
`judge=hf_align.verifiers.JudgeReward(judge_model, None, principles)`. Prints the held-out accuracy before and after
on the embedded default. Writes the model, its card and training_metrics.png to --output_dir (default
outputs/online-dpo).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align online_dpo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("online_dpo", argv)


if __name__ == "__main__":
    main()
