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

import sys

from hf_align import SPINTrainer
from hf_align.scripts import check_arguments, run, sft_warm_start

# For the embedded tiny model only (after its SFT warm-up): greedy responses, one epoch a round at a small learning
# rate, so that each round moves the model a little (larger steps overshoot on this tiny model).
EMBEDDED_DEFAULTS = dict(
    num_rounds=3, max_new_tokens=32, temperature=0.0, learning_rate=1e-5, warmup_steps=0.0, num_train_epochs=1,
    per_device_train_batch_size=8, logging_steps=10, eval_strategy="epoch", save_strategy="no", report_to="none",
)


def print_rounds(round_history: list[dict]) -> None:
    print("\nround | gap, train prompts | gap, held-out prompts | gap after the round | train loss")
    for row in round_history:
        held_out = row.get("eval_gap_start", float("nan"))
        print(f"{row['round']:>5} | {row['gap_start']:>18.2f} | {held_out:>21.2f} | {row['gap_end']:>19.2f} | "
              f"{row['train_loss']:.4f}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    check_arguments(SPINTrainer, argv)
    if not any(arg.split("=")[0] == "--model_name_or_path" for arg in argv):
        # The embedded defaults, as flags: the SFT'd tiny model is a local folder, not the default's name.
        flags = [f"--{key}={value}" for key, value in EMBEDDED_DEFAULTS.items()]
        argv = ["--model_name_or_path", sft_warm_start("sft", "outputs/spin-sft-start", learning_rate=1e-3,
                                                          num_train_epochs=6), *flags, *argv]
    trainer = run(SPINTrainer, "sft", EMBEDDED_DEFAULTS, argv)
    if trainer.is_world_process_zero():
        print_rounds(trainer.round_history)
