"""DPO training throughput and peak memory, hf_align against TRL, side by side.

    python benchmarks/dpo_vs_trl.py                        # defaults below; prints a table and the ratios
    python benchmarks/dpo_vs_trl.py --rounds 3 --steps 30 --prompt_tokens 300

Both trainers get the same model (a Llama with a 32k vocabulary built offline, ~30M parameters), the same pairs,
fp32, no gradient checkpointing, the same batch size, max_length and learning rate, and no `ref_model` (hf_align
keeps an in-memory copy, TRL reloads one from disk). Each run is its own process (peak RSS is the process's); runs
alternate hf_align, TRL, hf_align, TRL... and the median of each side is reported. Tokens/s counts the non-pad
tokens of the chosen and rejected sequences of the timed steps (after `--warmup` steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def build_benchmark_model(path: str, vocab_size: int, hidden_size: int, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_align.defaults import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64,
        max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"benchmark model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)


def benchmark_dataset(prompt_tokens: int, rows: int):
    """The embedded pairs, with each prompt lengthened to about `prompt_tokens` tokens by a shared context."""
    from datasets import Dataset

    from hf_align.defaults import load_default_dataset

    base = load_default_dataset("preference").select(range(min(rows, 400)))
    context = "Context: the user has asked many careful questions about everyday tasks before. " * max(
        1, prompt_tokens // 16
    )
    return Dataset.from_list(
        [{"prompt": context + row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]} for row in base]
    )


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import TrainerCallback

    if args.impl == "hf_align":
        from hf_align import DPOConfig, DPOTrainer
    else:
        from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=1e-5, max_length=args.max_length, bf16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=10_000, seed=0, disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = DPOTrainer(model=args.model, args=config, train_dataset=benchmark_dataset(args.prompt_tokens, 400))

    batch_tokens = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    step_ends = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())

    trainer.add_callback(StepTimer())
    trainer.train()
    seconds = step_ends[-1] - step_ends[args.warmup - 1]
    tokens = sum(batch_tokens[args.warmup : args.warmup + args.steps])
    return {
        "impl": args.impl,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds,
        "tokens": tokens,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=48)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--hidden_size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--impl", choices=["hf_align", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.impl:  # a child run
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    workdir = tempfile.mkdtemp(prefix="hf_align_bench_")
    model_path = os.path.join(workdir, "model")
    build_benchmark_model(model_path, args.vocab_size, args.hidden_size, args.layers)
    passthrough = [f"--{k}={getattr(args, k)}" for k in
                   ("steps", "warmup", "batch_size", "prompt_tokens", "max_length", "threads")]
    results = {"hf_align": [], "trl": []}
    for round_index in range(args.rounds):
        for impl in ("hf_align", "trl"):
            env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(
                [sys.executable, __file__, f"--impl={impl}", f"--model={model_path}", *passthrough],
                capture_output=True, text=True, env=env,
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.exit(f"{impl} run failed:\n{out.stderr[-4000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            results[impl].append(result)
            print(f"round {round_index + 1} {impl:8s} {result['tokens_per_s']:9.0f} tokens/s "
                  f"{result['peak_rss_mb']:8.0f} MB peak RSS", flush=True)

    median = {impl: {key: statistics.median(r[key] for r in runs) for key in ("tokens_per_s", "peak_rss_mb")}
              for impl, runs in results.items()}
    print()
    print(f"| DPO, prompt≈{args.prompt_tokens} tok, batch {args.batch_size} | hf_align | TRL | hf_align / TRL |")
    print("|---|---|---|---|")
    print(f"| tokens/s | {median['hf_align']['tokens_per_s']:.0f} | {median['trl']['tokens_per_s']:.0f} | "
          f"{median['hf_align']['tokens_per_s'] / median['trl']['tokens_per_s']:.2f}x |")
    print(f"| peak RSS (MB) | {median['hf_align']['peak_rss_mb']:.0f} | {median['trl']['peak_rss_mb']:.0f} | "
          f"{median['hf_align']['peak_rss_mb'] / median['trl']['peak_rss_mb']:.2f}x |")


if __name__ == "__main__":
    main()
