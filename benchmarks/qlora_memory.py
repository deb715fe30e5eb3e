"""Peak memory of QLoRA DPO and QLoRA GRPO on a 1.1B-parameter Llama, hf_align against TRL 1.16, side by side.

    python benchmarks/qlora_memory.py                                   # DPO and GRPO at 512 tokens, GC off and on
    python benchmarks/qlora_memory.py --algos dpo --lengths 512 1024 --gradient_checkpointing on
    python benchmarks/qlora_memory.py --activation_offloading           # what each trainer does with it on this CPU
    python benchmarks/qlora_memory.py --prefix_sharing                  # hf_align with its prompt run once per group

The model has TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 KV heads, intermediate 5632, 32k
vocabulary; 1.1B parameters) with random weights, built once offline (`LlamaConfig` + `save_pretrained`, bf16 on disk)
into `--model_dir`. Every run loads it with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_compute_dtype=torch.float32)`, `device_map="cpu"`, `dtype=torch.float32` (the unquantized embedding, norms
and LM head in fp32), and both trainers get that model object, the same tokenizer, data, LoRA config (r = 16,
alpha = 32, no dropout, on q/k/v/o/gate/up/down), batch, lengths, beta, learning rate and seed, fp32 (`bf16=False`).
What each trainer then does with the model is its own: TRL 1.16 casts the LoRA weights of a quantized model to bf16
(its QLoRA recipe), hf_align keeps them in fp32; under peft both use the base with the adapter disabled as the DPO
reference (no second copy).

Sequence length (`--lengths`) is prompt + completion tokens: DPO rows are a prompt lengthened by a shared context to
`length - 14` tokens plus the embedded chosen / rejected answers (≈ 4 to 14 tokens), `--batch_size` pairs per step;
GRPO rows are a prompt of `length - max_completion_length` tokens and `--generations` sampled completions of
`--max_completion_length` new tokens (random weights rarely sample EOS, so all run to the limit: the KV cache of
generation is at its largest), one prompt per step.

Each run is its own process, runs alternate hf_align, TRL, hf_align, ... and `--warmup + --steps` optimizer steps
are trained (the AdamW states exist from the first step's end, so the second step's peak holds everything). Two peaks
are reported per run, both from the kernel's high-water mark of the process's resident set (VmHWM): the
whole process (loading the model included: the same code for both), and the training peak, the high-water mark
reset (`/proc/self/clear_refs`) once the model is loaded and the heap loading freed is returned (`malloc_trim(0)`:
without it the loaded RSS varied by up to 1 GB over identical loading code), so it holds what the trainer builds and
trains; the table gives that peak and the same minus the RSS right after loading ("above the loaded model"), each
with hf_align / TRL. Prints one markdown row per (algorithm, length,
gradient checkpointing). glibc's allocator keeps freed blocks below its dynamic mmap threshold, and the RSS peaks
hold them: `MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/qlora_memory.py ...` measures with every block of 64 KiB
or more mapped and returned when freed (closer to the live tensors). `--activation_offloading` reports each
trainer's error on a CPU instead of a peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SHAPE = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
             intermediate_size=5632, vocab_size=32000)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DPO_COMPLETION_TOKENS = 14  # the longest embedded chosen answer, in the embedded tokenizer's tokens


def build_model(path: str) -> None:
    """The 1.1B Llama (`SHAPE`), random weights, with the embedded tokenizer, saved in bf16 (2.2 GB) to `path`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_align.defaults import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, max_position_embeddings=32768, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters into {path}", flush=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def status_mb(field: str) -> float:
    """A memory field of `/proc/self/status` (kB there) in MB."""
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def peak_mb() -> float:
    """The resident-set high-water mark of the process's memory (VmHWM), which `reset_peak` resets. Not `ru_maxrss`:
    that also keeps the high-water mark each exited thread saw (the loading threads'), so it never fell below the
    loading peak."""
    return status_mb("VmHWM")


def reset_peak() -> None:
    """Resets the process's resident-set high-water mark (VmHWM) to its current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_freed_heap() -> None:
    """Returns the heap that loading freed but glibc kept (`malloc_trim(0)`), so that both trainers start from the
    same loaded model: without it the loaded RSS varied between 1.6 and 2.7 GB over identical loading code."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def prompts_of_length(tokenizer, prompts: list[str], tokens: int) -> list[str]:
    """Each prompt behind a shared context, lengthened to about `tokens` tokens."""
    sentence = "Context: the user has asked many careful questions about everyday tasks before. "
    per_sentence = len(tokenizer(sentence, add_special_tokens=False).input_ids)
    out = []
    for prompt in prompts:
        own = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        out.append(sentence * max(0, (tokens - own) // per_sentence) + prompt)
    return out


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import importlib

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback

    from hf_align.defaults import load_default_dataset
    from hf_align.verifiers import exact_match_reward

    module = importlib.import_module("hf_align" if args.impl == "hf_align" else "trl")
    name = args.algo.upper()
    Config, Trainer = getattr(module, f"{name}Config"), getattr(module, f"{name}Trainer")

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    load_seconds = time.perf_counter() - start
    load_peak = peak_mb()
    release_freed_heap()
    loaded_rss = status_mb("VmRSS")
    reset_peak()

    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             task_type="CAUSAL_LM")
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=1e-5, bf16=False,
        gradient_checkpointing=args.gradient_checkpointing == "on", report_to="none", save_strategy="no",
        logging_steps=10_000, seed=0, disable_tqdm=True, dataloader_pin_memory=False,
    )
    if args.activation_offloading:
        common["activation_offloading"] = True
    if args.prefix_sharing and args.impl == "hf_align":
        common["prefix_sharing"] = True
    result = {"impl": args.impl, "algo": args.algo, "length": args.length, "gc": args.gradient_checkpointing,
              "prefix_sharing": bool(common.get("prefix_sharing")),
              "load_s": load_seconds, "load_peak_mb": load_peak, "loaded_rss_mb": loaded_rss}
    try:
        if args.algo == "dpo":
            base = load_default_dataset("preference").select(range(64))
            prompts = prompts_of_length(tokenizer, base["prompt"], args.length - DPO_COMPLETION_TOKENS)
            dataset = Dataset.from_dict({"prompt": prompts, "chosen": base["chosen"], "rejected": base["rejected"]})
            config = Config(**common, beta=args.beta, max_length=args.length + 64)
            trainer = Trainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft_config)
        else:
            base = load_default_dataset("comparisons").select(range(64))
            prompts = prompts_of_length(tokenizer, base["prompt"], args.length - args.max_completion_length)
            dataset = Dataset.from_dict({"prompt": prompts, "answer": base["answer"]})
            config = Config(**common, beta=args.grpo_beta, num_generations=args.generations,
                            max_completion_length=args.max_completion_length)
            trainer = Trainer(model, exact_match_reward("answer", extract_answer=False), args=config,
                              train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft_config)
    except Exception as error:  # noqa: BLE001 -- reported, e.g. activation offloading on a CPU
        return {**result, "error": f"{type(error).__name__}: {error}"[:400]}

    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in trainable)
    result["trainable_dtypes"] = sorted({str(p.dtype) for p in trainable})

    lengths, step_ends, step_peaks = [], [], []
    if args.algo == "dpo":
        collate = trainer.data_collator

        def recording_collator(examples):
            batch = collate(examples)
            for key in ("attention_mask", "chosen_attention_mask"):
                if key in batch:
                    lengths.append(int(batch[key].sum(-1).max()))
            if "input_ids" in batch and not lengths:
                lengths.append(int(batch["input_ids"].shape[-1]))
            return batch

        trainer.data_collator = recording_collator

    class StepRecorder(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())
            step_peaks.append(peak_mb())

    trainer.add_callback(StepRecorder())
    start = time.perf_counter()
    try:
        trainer.train()
    except Exception as error:  # noqa: BLE001
        return {**result, "error": f"{type(error).__name__}: {error}"[:400]}
    if args.algo == "grpo":  # prompt + completion tokens of the sampled rows (`patch_grpo_length_recorder`)
        lengths = getattr(trainer, "_bench_lengths", [])
    return {
        **result,
        "train_peak_mb": peak_mb(),
        "process_peak_mb": max(load_peak, peak_mb()),
        "step_peaks_mb": step_peaks,
        "step_seconds": [b - a for a, b in zip([start, *step_ends[:-1]], step_ends)],
        "row_tokens": max(lengths) if lengths else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", choices=["dpo", "grpo"], default=["dpo", "grpo"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512])
    parser.add_argument("--gradient_checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--impls", nargs="+", choices=["hf_align", "trl"], default=["hf_align", "trl"])
    parser.add_argument("--activation_offloading", action="store_true",
                        help="Set `activation_offloading=True` in both Configs and report what each trainer does.")
    parser.add_argument("--prefix_sharing", action="store_true",
                        help="hf_align only: each DPO pair, or each GRPO group, runs its prompt through the model once.")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Pairs (DPO; default 1) or sampled rows (GRPO; default --generations) per step.")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta.")
    parser.add_argument("--grpo_beta", type=float, default=0.0,
                        help="GRPO's KL coefficient (TRL's default 0.0: no reference forward).")
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--max_completion_length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model_dir", default=os.path.expanduser("~/.cache/hf_align_bench/llama-1.1b-tinyllama-shape"))
    parser.add_argument("--json", help="Append every run's result to this JSON-lines file.")
    # child-only
    parser.add_argument("--impl", choices=["hf_align", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--algo", choices=["dpo", "grpo"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.impl:  # a child run
        if args.batch_size is None:
            args.batch_size = 1 if args.algo == "dpo" else args.generations
        if args.algo == "grpo":
            patch_grpo_length_recorder(args.impl)
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        build_model(args.model_dir)
    settings = ["off", "on"] if args.gradient_checkpointing == "both" else [args.gradient_checkpointing]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    for algo in args.algos:
        for length in args.lengths:
            for gc in settings:
                runs = {impl: [] for impl in args.impls}
                for round_index in range(args.rounds):
                    for impl in args.impls:
                        command = [sys.executable, __file__, f"--impl={impl}", f"--algo={algo}", f"--length={length}",
                                   f"--gradient_checkpointing={gc}", f"--steps={args.steps}",
                                   f"--warmup={args.warmup}", f"--beta={args.beta}", f"--grpo_beta={args.grpo_beta}",
                                   f"--generations={args.generations}",
                                   f"--max_completion_length={args.max_completion_length}",
                                   f"--threads={args.threads}", f"--model_dir={args.model_dir}"]
                        if args.batch_size is not None:
                            command.append(f"--batch_size={args.batch_size}")
                        if args.activation_offloading:
                            command.append("--activation_offloading")
                        if args.prefix_sharing:
                            command.append("--prefix_sharing")
                        out = subprocess.run(command, capture_output=True, text=True, env=env)
                        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                        if not lines:
                            result = {"impl": impl, "algo": algo, "length": length, "gc": gc,
                                      "error": f"exit {out.returncode}: {out.stderr[-600:]}"}
                        else:
                            result = json.loads(lines[-1][len("RESULT "):])
                        runs[impl].append(result)
                        if args.json:
                            with open(args.json, "a") as f:
                                f.write(json.dumps(result) + "\n")
                        if "error" in result:
                            print(f"{algo} L={length} gc={gc} {impl:8s} ERROR {result['error']}", flush=True)
                        else:
                            print(f"{algo} L={length} gc={gc} {impl:8s} train peak {result['train_peak_mb']:7.0f} MB"
                                  f" (process {result['process_peak_mb']:.0f} MB, after load "
                                  f"{result['loaded_rss_mb']:.0f} MB), rows ≤ {result['row_tokens']} tokens, steps "
                                  + ", ".join(f"{s:.0f}" for s in result["step_seconds"]) + " s, trainable "
                                  f"{result['trainable_params'] / 1e6:.1f}M {'/'.join(result['trainable_dtypes'])}",
                                  flush=True)
                rows.append((algo, length, gc, runs))
    print()
    print("| algorithm | length | grad. ckpt | training peak hf_align / TRL | ratio | above the loaded model "
          "hf_align / TRL | ratio |")
    print("|---|---|---|---|---|---|---|")
    import statistics

    for algo, length, gc, runs in rows:
        ok = {impl: [r for r in rs if "error" not in r] for impl, rs in runs.items()}
        if not all(ok.get(impl) for impl in ("hf_align", "trl")):
            errors = {impl: rs[-1].get("error", "") for impl, rs in runs.items()}
            print(f"| {algo.upper()} | {length} | {gc} | " + " | ".join(
                f"{impl}: {err[:160]}" for impl, err in errors.items()) + " |")
            continue
        ours, theirs = (statistics.median(r["train_peak_mb"] for r in ok[impl]) for impl in ("hf_align", "trl"))
        above = [statistics.median(r["train_peak_mb"] - r["loaded_rss_mb"] for r in ok[impl])
                 for impl in ("hf_align", "trl")]
        print(f"| {algo.upper()} | {length} | {gc} | {ours:.0f} / {theirs:.0f} MB | {ours / theirs:.2f}× | "
              f"{above[0]:.0f} / {above[1]:.0f} MB | {above[0] / above[1]:.2f}× |")


def patch_grpo_length_recorder(impl: str) -> None:
    """Records the longest prompt + completion row each GRPO trainer samples (on the trainer, `_bench_lengths`)."""
    if impl == "hf_align":
        import hf_align.rollout as rollout

        generate = rollout.generate_completions

        def recorded(*a, **kw):
            out = generate(*a, **kw)
            completion = out.completion_mask.sum(-1)
            recorded.lengths.append(int(max(len(p) + int(c) for p, c in zip(out.prompt_ids, completion))))
            return out

        recorded.lengths = []
        rollout.generate_completions = recorded
        import hf_align.trainers.grpo as grpo_module

        original_train = grpo_module.GRPOTrainer.train

        def train(self, *a, **kw):
            out = original_train(self, *a, **kw)
            self._bench_lengths = recorded.lengths
            return out

        grpo_module.GRPOTrainer.train = train
    else:
        from trl import GRPOTrainer

        generate = GRPOTrainer._generate_single_turn

        def recorded(self, prompts, *a, **kw):
            out = generate(self, prompts, *a, **kw)
            self._bench_lengths = [*getattr(self, "_bench_lengths", []),
                                   max(len(p) + len(c) for p, c in zip(prompts, out[0]))]
            return out

        GRPOTrainer._generate_single_turn = recorded


if __name__ == "__main__":
    main()
