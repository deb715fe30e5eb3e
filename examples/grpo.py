"""GRPO (arXiv 2402.03300) with verifiable rewards (RLVR): sample a group of answers per prompt, check each with a
verifier, and push the policy towards the answers that beat their group's average.

    accelerate launch examples/grpo.py          # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_completion_length 1024

The reward is a verifier picked from the dataset's columns (`hf_align.scripts.verifier_rewards`): math answer
equivalence on `solution`, sandboxed test cases on `tests`, exact match on `answer`. Any `GRPOConfig` field is a flag
(`--loss_type dr_grpo --scale_rewards none` for Dr. GRPO, `--importance_sampling_level sequence` for GSPO,
`--epsilon_high 0.28 --mask_truncated_completions` for DAPO). On the embedded default the tiny model, which starts
from random weights, is first fine-tuned for a few epochs on the training questions (into
outputs/rlvr-sft-start, so that it answers with a number, right about a third of the time); the script prints its
accuracy on the held-out questions before and after GRPO. Writes the model, its card and training_metrics.png to --output_dir (default
outputs/grpo).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align grpo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("grpo", argv)


if __name__ == "__main__":
    main()
