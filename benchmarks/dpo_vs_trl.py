"""DPO training throughput and peak memory, hf_align against TRL, side by side.

    python benchmarks/dpo_vs_trl.py                        # defaults below; prints a table and the ratios
    python benchmarks/dpo_vs_trl.py --rounds 3 --steps 30 --prompt_tokens 300

Both trainers get the same model (a Llama with a 32k vocabulary built offline, ~30M parameters), the same pairs,
fp32, no gradient checkpointing, the same batch size, max_length and learning rate, and no `ref_model` (hf_align
keeps an in-memory copy, TRL reloads one from disk). Each run is its own process (peak RSS is the process's); runs
alternate hf_align, TRL, hf_align, TRL... and the median of each side is reported. Tokens/s counts the non-pad
tokens of the chosen and rejected sequences of the timed steps (after `--warmup` steps). The last row is the model
FLOP/s reached as a fraction of the machine's fp32 matmul throughput (`harness.matmul_fraction`, counting the policy's
forward and backward and the reference's forward).
"""

from __future__ import annotations

import argparse

from harness import (add_pairwise_arguments, benchmark_dataset, compare_with_trl, contender, pairwise_child_flags,
                     pairwise_settings, print_comparison, time_training)


def run_one(args) -> dict:
    DPOConfig, DPOTrainer = contender(args, "DPO")
    config = DPOConfig(**pairwise_settings(args))
    if args.prefix_sharing and args.impl == "hf_align":
        config.prefix_sharing = True
    trainer = DPOTrainer(model=args.model, args=config, train_dataset=benchmark_dataset(args.prompt_tokens, 400))
    return {"impl": args.impl, **time_training(trainer, args.warmup, args.steps)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pairwise_arguments(parser, rounds=2, steps=20, warmup=3, hidden_size=384, layers=4)
    parser.add_argument("--prefix_sharing", action="store_true",
                        help="hf_align packs each pair as one row (tokens/s still counts the prompt for both sequences).")
    parser.add_argument("--impl", choices=["hf_align", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    def child_flags(args):
        return pairwise_child_flags(args) + (["--prefix_sharing"] if args.prefix_sharing else [])

    compared = compare_with_trl(__file__, args, run_one, child_flags, forward_only_passes=1)
    if compared:
        print_comparison(f"DPO, prompt≈{args.prompt_tokens} tok, batch {args.batch_size}"
                         + (", hf_align with prefix sharing" if args.prefix_sharing else ""), compared[1])

if __name__ == "__main__":
    main()
