"""What the benchmarks share: the offline benchmark model and pairs, timing one training run inside its own process,
and running the contenders as alternating child processes (so each peak RSS is one run's) with their medians."""

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
    """A randomly initialised Llama with the embedded tokenizer's special tokens, saved with it to `path`."""
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


PAIRWISE_CHILD_FLAGS = ("steps", "warmup", "batch_size", "prompt_tokens", "max_length", "threads")


def add_pairwise_arguments(parser, *, rounds: int, steps: int, warmup: int, hidden_size: int, layers: int) -> None:
    """The flags every pairwise benchmark takes (the model's shape and the run's length differ between them)."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=48)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--hidden_size", type=int, default=hidden_size)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", help=argparse.SUPPRESS)


def pairwise_child_flags(args) -> list[str]:
    """What the parent passes on to each child run."""
    return [f"--model={args.model}", *(f"--{key}={getattr(args, key)}" for key in PAIRWISE_CHILD_FLAGS)]


def pairwise_settings(args) -> dict:
    """The Config fields every pairwise run shares: fp32, no gradient checkpointing, the same batch, length, learning
    rate and seed, `warmup + steps` steps, no logging, saving or progress bars."""
    return dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=1e-5, max_length=args.max_length, bf16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=10_000, seed=0, disable_tqdm=True, dataloader_pin_memory=False,
    )


def time_training(trainer, warmup: int, steps: int) -> dict:
    """Trains `trainer` (its `max_steps` = `warmup + steps`) and measures the `steps` after the warm-up: non-pad
    tokens per second of the collated batches, and the process's peak RSS so far."""
    from transformers import TrainerCallback

    batch_tokens, step_ends = [], []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        tokens = batch["attention_mask"].sum()
        if "segment_ids" in batch:  # prefix-shared pairs hold each prompt once for two sequences: count it twice
            tokens = tokens + (batch["segment_ids"] == 1).sum()
        batch_tokens.append(int(tokens))
        return batch

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())

    trainer.data_collator = counting_collator
    trainer.add_callback(StepTimer())
    trainer.train()
    seconds = step_ends[-1] - step_ends[warmup - 1]
    tokens = sum(batch_tokens[warmup : warmup + steps])
    return {
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds,
        "tokens": tokens,
    }


def run_alternating(script: str, flag: str, contenders, child_args: list[str], rounds: int) -> dict[str, dict]:
    """Runs `python script --{flag}=<contender> *child_args` for each contender in turn, `rounds` times; each child
    prints one `RESULT <json>` line. Returns each contender's median `tokens_per_s` and `peak_rss_mb` (and, from its
    last run, any other fields)."""
    results = {name: [] for name in contenders}
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    for round_index in range(rounds):
        for name in contenders:
            out = subprocess.run([sys.executable, script, f"--{flag}={name}", *child_args], capture_output=True,
                                 text=True, env=env)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.exit(f"{name} run failed:\n{out.stderr[-4000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            results[name].append(result)
            print(f"round {round_index + 1} {name:8s} {result['tokens_per_s']:9.0f} tokens/s "
                  f"{result['peak_rss_mb']:8.0f} MB peak RSS", flush=True)
    return {
        name: {**runs[-1], **{key: statistics.median(r[key] for r in runs) for key in ("tokens_per_s", "peak_rss_mb")}}
        for name, runs in results.items()
    }


def report_child(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)
