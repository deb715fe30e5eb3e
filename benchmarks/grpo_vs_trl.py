"""GRPO, hf_align against TRL, side by side: the generation phase and the training phase timed apart.

    python benchmarks/grpo_vs_trl.py                        # defaults below; prints a table and the ratios
    python benchmarks/grpo_vs_trl.py --rounds 3 --steps 10 --max_completion_length 64

Both trainers get the same model (a Llama with a 32k vocabulary built offline by `harness.build_benchmark_model`),
the same prompts (the embedded "comparisons" questions), the same reward function, fp32, no gradient checkpointing,
beta = 0, `num_generations` completions per prompt and the same batch size. Each run is its own process; runs
alternate and the median of each side is reported. Generation time is the time spent in each trainer's sampling call
(hf_align: `rollout.generate_completions`, TRL: `GRPOTrainer._generate_single_turn`); training time is the rest of
the timed steps (log-probs, loss, backward, optimizer). Tokens/s of the training phase counts prompt + completion
tokens of the sampled rows. The last row is the training phase's model FLOP/s as a fraction of the machine's fp32
matmul throughput (`harness.matmul_fraction`, counting the forward and backward; beta = 0 needs no reference).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from harness import compare_with_trl, contender, peak_rss_mb, print_comparison


def run_one(args) -> dict:
    from transformers import TrainerCallback

    import hf_align.rollout as sampling_module
    from hf_align.defaults import load_default_dataset
    from hf_align.verifiers import exact_match_reward

    GRPOConfig, GRPOTrainer = contender(args, "GRPO")

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, num_generations=args.generations,
        max_completion_length=args.max_completion_length, max_steps=args.warmup + args.steps, learning_rate=1e-6,
        beta=0.0, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=10_000, seed=0, disable_tqdm=True, dataloader_pin_memory=False,
    )
    if args.prefix_sharing and args.impl == "hf_align":
        config.prefix_sharing = True
    trainer = GRPOTrainer(args.model, exact_match_reward("answer", extract_answer=False), args=config,
                          train_dataset=load_default_dataset("comparisons"))

    generation_seconds, token_counts, step_ends = [], [], []

    def timed(generate, count_tokens):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            out = generate(*a, **kw)
            generation_seconds.append(time.perf_counter() - start)
            token_counts.append(count_tokens(a, kw, out))
            return out
        return wrapper

    # (prompt + completion tokens, completion tokens) of the sampled rows
    if args.impl == "hf_align":
        sampling_module.generate_completions = timed(
            sampling_module.generate_completions,
            lambda a, kw, out: (sum(map(len, out.prompt_ids)) + int(out.completion_mask.sum()),
                                int(out.completion_mask.sum())))
    else:
        trainer._generate_single_turn = timed(
            trainer._generate_single_turn,
            lambda a, kw, out: (sum(map(len, a[0])) + sum(map(len, out[0])), sum(map(len, out[0]))))

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())

    trainer.add_callback(StepTimer())
    trainer.train()
    # One generation per optimizer step (steps_per_generation = gradient_accumulation_steps = 1).
    total = step_ends[-1] - step_ends[args.warmup - 1]
    generating = sum(generation_seconds[args.warmup : args.warmup + args.steps])
    trained_tokens = sum(count for count, _ in token_counts[args.warmup : args.warmup + args.steps])
    return {
        "impl": args.impl,
        "generation_s": generating,
        "training_s": total - generating,
        "tokens_per_s": trained_tokens / (total - generating),
        "peak_rss_mb": peak_rss_mb(),
        "tokens": trained_tokens,
        "head_tokens": sum(head for _, head in token_counts[args.warmup : args.warmup + args.steps]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=32)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--hidden_size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prefix_sharing", action="store_true",
                        help="hf_align runs each prompt once for its group's completions (tokens/s still counts it "
                        "once per completion).")
    parser.add_argument("--impl", choices=["hf_align", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    def child_flags(args):
        flags = [f"--{key}={getattr(args, key)}" for key in
                 ("model", "steps", "warmup", "batch_size", "generations", "max_completion_length", "threads")]
        return flags + (["--prefix_sharing"] if args.prefix_sharing else [])

    compared = compare_with_trl(__file__, args, run_one, child_flags, forward_only_passes=0)
    if compared:
        median, rows = compared
        rows.insert(1, (f"generation seconds ({args.steps} steps, last round; lower is better)",
                        median["hf_align"]["generation_s"], median["trl"]["generation_s"], ".1f"))
        print_comparison(f"GRPO, G={args.generations}, batch {args.batch_size}, ≤{args.max_completion_length} new "
                         "tokens (tokens/s, matmul: training phase)"
                         + (", hf_align with prefix sharing" if args.prefix_sharing else ""), rows)

if __name__ == "__main__":
    main()
