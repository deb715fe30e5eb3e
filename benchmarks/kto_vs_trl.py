"""KTO training throughput and peak memory, hf_align against TRL, side by side.

    python benchmarks/kto_vs_trl.py                        # defaults below; prints a table and the ratios
    python benchmarks/kto_vs_trl.py --rounds 3 --steps 30 --prompt_tokens 300

Both trainers get the same model (a Llama with a 32k vocabulary built offline by `harness.build_benchmark_model`),
the same unpaired rows (`prompt`/`completion`/`label`: each embedded pair, behind the shared context of about
`--prompt_tokens` tokens, gives its chosen completion labelled desirable and then its rejected one labelled
undesirable, so every batch holds both kinds), fp32, no gradient checkpointing, the same batch size, max_length and
learning rate, loss_type "kto" with its KL batch (each row's prompt with the previous row's completion, within each
batch; sequential sampling on both), and no `ref_model` (hf_align keeps an in-memory copy, TRL reloads one from
disk). Each run is its own process (peak RSS is the process's); runs alternate and the median of each side is
reported. Tokens/s counts the non-pad tokens of the rows of the timed steps (after `--warmup` steps), not those of
the KL rows, which repeat the same tokens for forward passes only. The last row is the model FLOP/s reached as a
fraction of the machine's fp32 matmul throughput (`harness.matmul_fraction`, counting the policy's forward and
backward over the rows and three forward-only passes: the reference over the rows, policy and reference over the KL
rows).
"""

from __future__ import annotations

import argparse

from harness import (add_pairwise_arguments, benchmark_dataset, compare_with_trl, contender, pairwise_child_flags,
                     pairwise_settings, print_comparison, time_training)


def unpaired_rows(prompt_tokens: int):
    """Two rows per benchmark pair, its chosen completion (desirable) then its rejected one (undesirable)."""
    from datasets import Dataset

    pairs = benchmark_dataset(prompt_tokens, 400)
    return Dataset.from_list([
        {"prompt": pair["prompt"], "completion": pair[key], "label": key == "chosen"}
        for pair in pairs for key in ("chosen", "rejected")
    ])


def run_one(args) -> dict:
    KTOConfig, KTOTrainer = contender(args, "KTO")
    config = KTOConfig(**pairwise_settings(args), loss_type="kto", train_sampling_strategy="sequential")
    trainer = KTOTrainer(model=args.model, args=config, train_dataset=unpaired_rows(args.prompt_tokens))
    return {"impl": args.impl, **time_training(trainer, args.warmup, args.steps)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pairwise_arguments(parser, rounds=2, steps=20, warmup=3, hidden_size=384, layers=4)
    parser.add_argument("--impl", choices=["hf_align", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    compared = compare_with_trl(__file__, args, run_one, pairwise_child_flags, forward_only_passes=3)
    if compared:
        print_comparison(f"KTO, prompt≈{args.prompt_tokens} tok, batch {args.batch_size} rows", compared[1])

if __name__ == "__main__":
    main()
