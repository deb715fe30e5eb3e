"""GRPO or RLOO, hf_align against TRL, the whole optimizer step timed: sampling, scoring, log-probs, loss, backward
and optimizer, as completions per second, with the generation phase's share of it.

    python benchmarks/grpo_step_vs_trl.py                                   # GRPO, G = 8, the embedded prompts
    python benchmarks/grpo_step_vs_trl.py --algorithm rloo
    python benchmarks/grpo_step_vs_trl.py --prompt_tokens 300 --generations 16 --rounds 3

Both trainers get the same model (a Llama with a 32k vocabulary built offline by `harness.build_benchmark_model`),
the same prompts (the embedded "comparisons" questions; with `--prompt_tokens N` each behind the same instruction
preamble, `harness.lengthened_prompts`, to about N tokens), the same exact-answer reward, fp32, no gradient
checkpointing, beta = 0, `--generations` completions per prompt, `--batch_size` completions per step (one generation
per step) and the same seed. Each run is its own process; runs alternate and the median of each side is reported.
A step's time runs from the end of the step before to the end of this one; generation time is the time spent in
each trainer's sampling call (hf_align: `rollout.generate_completions`, TRL: `_generate_single_turn`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from harness import (build_parent_model, contender, lengthened_prompts, peak_rss_mb, print_comparison, report_child,
                     run_alternating)

REPORTED = ("completions_per_s", "generation_s_per_step", "training_s_per_step", "generation_share", "peak_rss_mb")
CHILD_FLAGS = ("model", "algorithm", "steps", "warmup", "batch_size", "generations", "max_completion_length",
               "prompt_tokens", "threads")


def benchmark_prompts(args):
    """The embedded "comparisons" questions, lengthened to about `args.prompt_tokens` tokens when that is set."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hf_align.defaults import load_default_dataset

    dataset = load_default_dataset("comparisons")
    if not args.prompt_tokens:
        return dataset
    prompts = lengthened_prompts(AutoTokenizer.from_pretrained(args.model), dataset["prompt"], args.prompt_tokens)
    return Dataset.from_list([{**row, "prompt": prompt} for row, prompt in zip(dataset, prompts)])


def timed_generation(trainer, impl: str, seconds: list[float], completions: list[int]) -> None:
    """Wraps the trainer's sampling call so that each call appends its seconds and its number of completions."""
    import hf_align.rollout

    def timed(generate, count):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = generate(*args, **kwargs)
            seconds.append(time.perf_counter() - start)
            completions.append(count(out))
            return out
        return wrapper

    if impl == "hf_align":
        hf_align.rollout.generate_completions = timed(hf_align.rollout.generate_completions,
                                                      lambda out: out.completion_ids.size(0))
    else:  # TRL's GRPO returns (ids, sampling log-probs), its RLOO the ids alone
        trainer._generate_single_turn = timed(trainer._generate_single_turn,
                                              lambda out: len(out[0] if isinstance(out, tuple) else out))


def run_one(args) -> dict:
    from transformers import TrainerCallback

    Config, Trainer = contender(args, args.algorithm.upper() if args.algorithm == "rloo" else "GRPO")
    from hf_align.verifiers import exact_match_reward
    config = Config(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, num_generations=args.generations,
        max_completion_length=args.max_completion_length, max_steps=args.warmup + args.steps, learning_rate=1e-6,
        beta=0.0, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=10_000, seed=0, disable_tqdm=True, dataloader_pin_memory=False,
    )
    reward = exact_match_reward("answer", extract_answer=False)
    trainer = Trainer(args.model, reward, args=config, train_dataset=benchmark_prompts(args))
    generation_seconds, completions, step_ends = [], [], []
    timed_generation(trainer, args.impl, generation_seconds, completions)

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())

    trainer.add_callback(StepTimer())
    trainer.train()
    timed = slice(args.warmup, args.warmup + args.steps)  # one generation per optimizer step
    total = step_ends[-1] - step_ends[args.warmup - 1]
    generating = sum(generation_seconds[timed])
    return {
        "impl": args.impl,
        "completions_per_s": sum(completions[timed]) / total,
        "generation_s_per_step": generating / args.steps,
        "training_s_per_step": (total - generating) / args.steps,
        "generation_share": generating / total,
        "peak_rss_mb": peak_rss_mb(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=["grpo", "rloo"], default="grpo")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=16, help="Completions per step.")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=32)
    parser.add_argument("--prompt_tokens", type=int, default=0,
                        help="Lengthen every prompt to about this many tokens (0: the embedded prompts, ~20 tokens).")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--hidden_size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--impl", choices=["hf_align", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        report_child(run_one(args))
        return
    build_parent_model(args)
    median = run_alternating(__file__, "impl", ("hf_align", "trl"),
                             [f"--{key}={getattr(args, key)}" for key in CHILD_FLAGS], args.rounds, REPORTED)
    ours, theirs = median["hf_align"], median["trl"]
    print_comparison(
        f"{args.algorithm.upper()} whole step, G={args.generations}, {args.batch_size} completions per step, "
        f"prompts ≈{args.prompt_tokens or 20} tokens, ≤{args.max_completion_length} new tokens, median of "
        f"{args.rounds} round(s)",
        [("completions/s (whole step)", ours["completions_per_s"], theirs["completions_per_s"], ".2f"),
         ("generation s per step (lower is better)", ours["generation_s_per_step"], theirs["generation_s_per_step"],
          ".2f"),
         ("training s per step (lower is better)", ours["training_s_per_step"], theirs["training_s_per_step"], ".2f"),
         ("generation share of the step", ours["generation_share"], theirs["generation_share"], ".0%"),
         ("peak RSS (MB)", ours["peak_rss_mb"], theirs["peak_rss_mb"], ".0f")],
    )
    print(f"\ngeneration speed-up (TRL's seconds / hf_align's): "
          f"{theirs['generation_s_per_step'] / ours['generation_s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
