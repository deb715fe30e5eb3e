"""What the benchmarks share: the offline benchmark model and data, timing one training run inside its own process,
running the contenders as alternating child processes (so each peak RSS is one run's) with their medians, the
machine's fp32 matmul throughput, and the side-by-side table."""

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


def peak_rss_mb() -> float:
    """The process's peak resident set so far (`ru_maxrss`, kB) in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_benchmark_model(path: str, vocab_size: int, hidden_size: int, layers: int) -> tuple[int, int]:
    """A randomly initialised Llama with the embedded tokenizer's special tokens, saved with it to `path`. Returns
    what `matmul_fraction` needs: the decoder's parameter count (all but the input embedding, a lookup, and the LM
    head) and the LM head's."""
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
    lm_head_params = model.get_output_embeddings().weight.numel()
    embedding_params = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding_params - lm_head_params, lm_head_params


def build_parent_model(args) -> tuple[int, int]:
    """In the parent run: the benchmark model of `args`' shape (`build_benchmark_model`) in a new temporary folder,
    whose path becomes `args.model` for the children. Returns its parameter counts."""
    args.model = os.path.join(tempfile.mkdtemp(prefix="hf_align_bench_"), "model")
    return build_benchmark_model(args.model, args.vocab_size, args.hidden_size, args.layers)


def benchmark_dataset(prompt_tokens: int, rows: int, name: str = "preference"):
    """The embedded dataset `name` (by default the pairs), with each prompt lengthened to about `prompt_tokens`
    tokens by a shared context."""
    from datasets import Dataset

    from hf_align.defaults import load_default_dataset

    base = load_default_dataset(name).select(range(min(rows, 400)))
    context = "Context: the user has asked many careful questions about everyday tasks before. " * max(
        1, prompt_tokens // 16
    )
    return Dataset.from_list([{**row, "prompt": context + row["prompt"]} for row in base])


def lengthened_prompts(tokenizer, prompts: list[str], tokens: int) -> list[str]:
    """Each prompt behind the same instruction preamble (the instructions RLVR prompts carry), cut to the tokens that
    bring the prompt to about `tokens` tokens; prompts already that long are left as they are."""
    preamble = ("Instructions: read the question carefully, compare the options one by one, check your reasoning "
                "twice, and answer with the exact value only. ") * (tokens // 8 + 1)
    preamble_ids = tokenizer(preamble, add_special_tokens=False).input_ids
    return [tokenizer.decode(preamble_ids[: max(0, tokens - len(tokenizer(prompt).input_ids))]) + prompt
            for prompt in prompts]


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


def batch_token_counts(batch) -> tuple[int, int]:
    """A collated batch's non-pad tokens as unpacked `prompt + completion` rows hold them (a prompt shared by packed
    completions counts once per completion), and its head tokens: the positions whose next-token prediction enters
    the loss (the tokens `labels` keeps, else the completion tokens), the only ones that need the LM head. A KTO
    batch's mismatched KL rows (`KL_*` keys) are not counted: they hold the same tokens as its rows, forward only."""
    from hf_align.packing import batch_token_count

    if "labels" in batch:  # language modelling (SFT); packed padding-free rows have no attention mask and no padding
        tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        # a row's first token is predicted by no position
        return int(tokens), int((batch["labels"][:, 1:] != -100).sum())
    if "completion_index" in batch:  # packed completions (`hf_align.packing`)
        return int(batch_token_count(batch)), int((batch["completion_index"] >= 0).sum())
    return int(batch_token_count(batch)), int(batch["completion_mask"].sum())


def time_training(trainer, warmup: int, steps: int) -> dict:
    """Trains `trainer` (its `max_steps` = `warmup + steps`) and measures the `steps` after the warm-up: non-pad
    tokens per second of the collated batches (`batch_token_counts`), and the process's peak RSS so far."""
    from transformers import TrainerCallback

    batch_counts, step_ends = [], []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        batch_counts.append(batch_token_counts(batch))
        return batch

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())

    trainer.data_collator = counting_collator
    trainer.add_callback(StepTimer())
    trainer.train()
    seconds = step_ends[-1] - step_ends[warmup - 1]
    tokens = sum(count for count, _ in batch_counts[warmup : warmup + steps])
    return {
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "seconds": seconds,
        "tokens": tokens,
        "head_tokens": sum(head for _, head in batch_counts[warmup : warmup + steps]),
    }


def run_alternating(script: str, flag: str, contenders, child_args: list[str], rounds: int,
                    keys: tuple[str, ...] = ("tokens_per_s", "peak_rss_mb")) -> dict[str, dict]:
    """Runs `python script --{flag}=<contender> *child_args` for each contender in turn, `rounds` times; each child
    prints one `RESULT <json>` line. Returns each contender's median of each of `keys` (and, from its last run, any
    other fields)."""
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
            print(f"round {round_index + 1} {name:8s} " + " ".join(f"{key} {result[key]:.5g}" for key in keys),
                  flush=True)
    return {name: {**runs[-1], **{key: statistics.median(r[key] for r in runs) for key in keys}}
            for name, runs in results.items()}


def report_child(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def machine_matmul_gflops(threads: int) -> float:
    """The machine's fp32 matmul throughput in GFLOP/s on `threads` threads (the runs' count): the best of 5 timed
    `torch.mm` of two 2048 x 2048 fp32 matrices, 2 * 2048^3 FLOPs each, after one untimed."""
    import torch

    torch.set_num_threads(threads)
    size = 2048
    left, right, product = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    torch.mm(left, right, out=product)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(left, right, out=product)
        best = min(best, time.perf_counter() - start)
    gflops = 2 * size**3 / best / 1e9
    print(f"fp32 matmul: {gflops:.0f} GFLOP/s ({size}x{size} torch.mm, {threads} thread(s), best of 5)", flush=True)
    return gflops


def matmul_fraction(result: dict, parameter_counts: tuple[int, int], machine_gflops: float,
                    forward_only_passes: int) -> float:
    """The model FLOP/s of a run at its `tokens_per_s`, as a fraction of `machine_gflops`.

    FLOPs per token = (6 + 2 * forward_only_passes) * (decoder_params + lm_head_params * head_tokens / tokens), with
    `parameter_counts` = (decoder_params, lm_head_params) from `build_benchmark_model`, and `tokens`, `head_tokens`
    as `batch_token_counts` counts them: 2 FLOPs per parameter and token forward and 4 backward for the trained
    model, 2 more for each forward-only pass over the same tokens (a reference model; KTO's KL rows). The LM head is
    counted at the head tokens only, the useful work, so both contenders are credited the same FLOPs for the same
    tokens: an implementation that projects more positions (TRL's fused head scores every position on a CPU) does
    that work uncredited, as in model-FLOPs utilisation. Not counted: generation, and attention's score and value
    products, per token about 6 * hidden * layers * row length with a causal mask, against the decoder's 72 * hidden^2
    * layers (a Llama with intermediate size 8/3 hidden): row length / (12 * hidden) more, 7% for 330-token rows at
    384 hidden."""
    decoder_params, lm_head_params = parameter_counts
    params_per_token = decoder_params + lm_head_params * result["head_tokens"] / result["tokens"]
    flops_per_token = (6 + 2 * forward_only_passes) * params_per_token
    return result["tokens_per_s"] * flops_per_token / (machine_gflops * 1e9)


def comparison_rows(median: dict[str, dict], parameter_counts: tuple[int, int], machine_gflops: float,
                    forward_only_passes: int) -> list[tuple[str, float, float, str]]:
    """The rows every table has, hf_align's and TRL's medians: tokens/s, peak RSS and `matmul_fraction`."""
    ours, theirs = median["hf_align"], median["trl"]
    fraction = [matmul_fraction(side, parameter_counts, machine_gflops, forward_only_passes) for side in (ours, theirs)]
    return [
        ("tokens/s", ours["tokens_per_s"], theirs["tokens_per_s"], ".0f"),
        ("peak RSS (MB)", ours["peak_rss_mb"], theirs["peak_rss_mb"], ".0f"),
        ("model FLOP/s / fp32 matmul throughput", *fraction, ".1%"),
    ]


def contender(args, name: str) -> tuple[type, type]:
    """In a child run: torch on `args.threads` threads, and the `{name}Config` / `{name}Trainer` classes of the
    contender `args.impl` ("hf_align" or "trl")."""
    import importlib

    import torch

    torch.set_num_threads(args.threads)
    module = importlib.import_module("hf_align" if args.impl == "hf_align" else "trl")
    return getattr(module, f"{name}Config"), getattr(module, f"{name}Trainer")


def compare_with_trl(script: str, args, run_one, child_flags, forward_only_passes: int):
    """A `*_vs_trl.py` run. In a child (`args.impl` set): `run_one(args)`, reported to the parent; returns None. In the
    parent: builds the model, measures the machine, runs hf_align and TRL alternating, each with `child_flags(args)`,
    and returns their medians and the rows of their table (`comparison_rows`)."""
    if args.impl:
        report_child(run_one(args))
        return None
    parameter_counts = build_parent_model(args)
    machine_gflops = machine_matmul_gflops(args.threads)
    median = run_alternating(script, "impl", ("hf_align", "trl"), child_flags(args), args.rounds)
    return median, comparison_rows(median, parameter_counts, machine_gflops, forward_only_passes)


def print_comparison(title: str, rows: list[tuple[str, float, float, str]]) -> None:
    """A markdown table: per (label, hf_align's value, TRL's value, format) row, both values and hf_align / TRL."""
    print()
    print(f"| {title} | hf_align | TRL | hf_align / TRL |")
    print("|---|---|---|---|")
    for label, ours, theirs, value_format in rows:
        print(f"| {label} | {ours:{value_format}} | {theirs:{value_format}} | {ours / theirs:.2f}x |")
