"""SFT training throughput and peak memory, hf_align against TRL, side by side.

    python benchmarks/sft_vs_trl.py                        # defaults below; prints a table and the ratios
    python benchmarks/sft_vs_trl.py --rounds 3 --steps 30 --prompt_tokens 300
    python benchmarks/sft_vs_trl.py --packing --max_length 512

Both trainers get the same model (a Llama with a 32k vocabulary built offline by `harness.build_benchmark_model`),
the same prompt-completion rows (the embedded "sft" dataset behind the shared context of about `--prompt_tokens`
tokens; the loss is on the completion tokens, both trainers' default for such rows), fp32, no gradient
checkpointing, the same batch size, max_length and learning rate, and packing off on both, or on on both with
`--packing` (rows packed into `--max_length`-token rows). Each run is its own process (peak RSS is the process's);
runs alternate and the median of each side is reported. Tokens/s counts the non-pad tokens (prompt and completion)
of the timed steps' batches (after `--warmup` steps). The last row is the model FLOP/s reached as a fraction of the
machine's fp32 matmul throughput (`harness.matmul_fraction`, counting the forward and backward).
"""

from __future__ import annotations

import argparse

from harness import (add_pairwise_arguments, benchmark_dataset, compare_with_trl, contender, pairwise_child_flags,
                     pairwise_settings, print_comparison, time_training)


def run_one(args) -> dict:
    SFTConfig, SFTTrainer = contender(args, "SFT")
    config = SFTConfig(**pairwise_settings(args), packing=args.packing)
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=benchmark_dataset(args.prompt_tokens, 400, "sft"))
    return {"impl": args.impl, **time_training(trainer, args.warmup, args.steps)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pairwise_arguments(parser, rounds=2, steps=20, warmup=3, hidden_size=384, layers=4)
    parser.add_argument("--packing", action="store_true", help="Both trainers pack rows into max_length-token rows.")
    parser.add_argument("--impl", choices=["hf_align", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    def child_flags(args):
        return pairwise_child_flags(args) + (["--packing"] if args.packing else [])

    compared = compare_with_trl(__file__, args, run_one, child_flags, forward_only_passes=0)
    if compared:
        print_comparison(f"SFT, prompt≈{args.prompt_tokens} tok, batch {args.batch_size}"
                         + (f", packed into {args.max_length}-token rows" if args.packing else ""), compared[1])

if __name__ == "__main__":
    main()
