"""SPIN (arXiv 2401.01335): self-play fine-tuning from SFT data alone. Each round samples the model's own response to
every prompt and trains it to prefer the ground truth over that response, against itself as it was.

    accelerate launch examples/spin.py          # embedded tiny chat model (after a short SFT) and SFT data, offline
    accelerate launch examples/spin.py --model_name_or_path alignment-handbook/zephyr-7b-sft-full \
        --dataset_name HuggingFaceH4/ultrachat_200k --dataset_train_split train_sft --dataset_test_split test_sft \
        --use_peft --num_rounds 3

Rows are SFT rows: `prompt`/`completion` or `messages` ending with the assistant's turn. Any `SPINConfig` field is a
flag (`--num_rounds 4 --temperature 0`). SPIN starts from an SFT model; the embedded tiny model starts from random
weights, so it is first fine-tuned on the same data for a few epochs (into outputs/spin-sft-start). At the end a
table shows, for each round, the mean log-likelihood gap logp(ground truth) - logp(own response) under the policy
at the round's start, on the training prompts and on held-out ones: SPIN closes it from below, as the model's own
responses stop being more likely to it than the data. Writes the model, its card and training_metrics.png to
--output_dir (default outputs/spin).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align spin` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("spin", argv)


if __name__ == "__main__":
    main()
