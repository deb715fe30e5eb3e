"""Peak memory and throughput of hf_align's DPO against the reference-free ORPO and SimPO, side by side.

    python benchmarks/reference_free_memory.py             # defaults below; prints a table
    python benchmarks/reference_free_memory.py --rounds 3 --steps 30 --prompt_tokens 300

The model and pairs are built by `benchmarks/harness.py`: a Llama built offline with a 32k
vocabulary, and the embedded pairs behind a shared context of about `--prompt_tokens` tokens. The default model is
wider and deeper than dpo_vs_trl's (768 hidden, 8 layers: 106M parameters, 46% of them the embedding and LM head,
against 32M and 78%): dropping the reference saves one copy of the weights, and on a model that is mostly vocabulary
that saving is no bigger than ORPO's extra LM-head work (its NLL scores the prompt tokens too) or than the run-to-run
noise of the allocator. Every trainer gets fp32, no gradient checkpointing, the same batch size, max_length and
learning rate, and no `ref_model`: DPO keeps a frozen in-memory copy of the policy as its reference, ORPO and SimPO
keep none. Each run is its own process (peak RSS is the process's); runs alternate DPO, ORPO, SimPO, ... and the
median of each is reported.
Tokens/s counts the non-pad tokens of the chosen and rejected sequences of the timed steps (after `--warmup` steps).
Exits with status 1 unless ORPO's and SimPO's peak RSS are below DPO's.
"""

from __future__ import annotations

import argparse
import sys

from harness import (add_pairwise_arguments, benchmark_dataset, build_parent_model, pairwise_child_flags,
                     pairwise_settings, report_child, run_alternating, time_training)

ALGORITHMS = ("dpo", "orpo", "simpo")


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import hf_align

    trainer_cls = {"dpo": hf_align.DPOTrainer, "orpo": hf_align.ORPOTrainer, "simpo": hf_align.SimPOTrainer}[args.algo]
    config = trainer_cls.config_class(**pairwise_settings(args))
    trainer = trainer_cls(model=args.model, args=config, train_dataset=benchmark_dataset(args.prompt_tokens, 400))
    return {"algo": args.algo, **time_training(trainer, args.warmup, args.steps),
            "has_reference": getattr(trainer, "ref_model", None) is not None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pairwise_arguments(parser, rounds=1, steps=10, warmup=2, hidden_size=768, layers=8)
    parser.add_argument("--algo", choices=ALGORITHMS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.algo:  # a child run
        report_child(run_one(args))
        return

    build_parent_model(args)
    passthrough = pairwise_child_flags(args)
    median = run_alternating(__file__, "algo", ALGORITHMS, passthrough, args.rounds)
    print("reference model kept:", {algo: median[algo]["has_reference"] for algo in ALGORITHMS})
    dpo = median["dpo"]
    print()
    print(f"| prompt≈{args.prompt_tokens} tok, batch {args.batch_size}, {args.threads} thread(s) | tokens/s | "
          "peak RSS (MB) | peak RSS / DPO's |")
    print("|---|---|---|---|")
    for algo in ALGORITHMS:
        row = median[algo]
        print(f"| {algo.upper() if algo != 'simpo' else 'SimPO'} | {row['tokens_per_s']:.0f} | "
              f"{row['peak_rss_mb']:.0f} | {row['peak_rss_mb'] / dpo['peak_rss_mb']:.2f}x |")
    above = [algo for algo in ("orpo", "simpo") if median[algo]["peak_rss_mb"] >= dpo["peak_rss_mb"]]
    if above:
        sys.exit(f"peak RSS not below DPO's for: {', '.join(above)}")


if __name__ == "__main__":
    main()
