"""What every example script does: parse arguments, load model and data (the embedded default when none are
named), train, save the model with its card and a plot of the training metrics, and optionally push to the Hub."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
from transformers import HfArgumentParser

from . import defaults

logger = logging.getLogger(__name__)

PLOTTED_METRICS = (
    "loss", "rewards/margins", "rewards/accuracies", "accuracy", "mean_token_accuracy", "eval_loss", "reward",
)


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(
        default=defaults.DEFAULT_MODEL_NAME,
        metadata={"help": "Hub id or local path of the model; the default is the embedded tiny chat model."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, or a local .json/.jsonl/.parquet file; default: embedded."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default="test", metadata={"help": "Evaluation split, if it exists."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "LoRA target modules."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base model in 4-bit NF4."})


def load_data(script_args: ScriptArguments, default_dataset: str):
    """`(train, eval or None)`: the named dataset's splits, or the embedded default's train/test."""
    if script_args.dataset_name is None:
        return defaults.load_default_dataset(default_dataset, "train"), defaults.load_default_dataset(
            default_dataset, "test"
        )
    name = script_args.dataset_name
    extension = os.path.splitext(name)[1].lstrip(".")
    if os.path.isfile(name):
        loaded = datasets.load_dataset({"jsonl": "json"}.get(extension, extension), data_files=name)
    else:
        loaded = datasets.load_dataset(name, script_args.dataset_config)
    test_split = script_args.dataset_test_split
    return loaded[script_args.dataset_train_split], loaded[test_split] if test_split in loaded else None


def peft_arguments(script_args: ScriptArguments) -> dict:
    """`peft_config` and `quantization_config` for the trainer from the LoRA / QLoRA flags."""
    if not (script_args.use_peft or script_args.load_in_4bit):
        return {}
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    out = {
        "peft_config": LoraConfig(
            r=script_args.lora_r, lora_alpha=script_args.lora_alpha, lora_dropout=script_args.lora_dropout,
            target_modules=script_args.lora_target_modules or "all-linear", task_type="CAUSAL_LM",
        )
    }
    if script_args.load_in_4bit:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        out["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    return out


def plot_metrics(log_history: list[dict], path: str) -> str | None:
    """Saves a PNG with one panel per logged metric among `PLOTTED_METRICS`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name in PLOTTED_METRICS:
        points = [(entry["step"], entry[name]) for entry in log_history if name in entry]
        if points:
            series[name] = points
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for axis, (name, points) in zip(axes[0], series.items()):
        axis.plot(*zip(*points), marker=".")
        axis.set_title(name)
        axis.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(trainer_class, default_dataset: str, embedded_defaults: dict, argv: list[str] | None = None,
        trainer_kwargs=None):
    """Runs an example: `trainer_class` with its `config_class`, on `default_dataset` (an embedded dataset name)
    unless `--dataset_name` is given. `embedded_defaults` are Config values for the embedded tiny model (a higher
    learning rate, a few hundred steps); they apply only to that model and only to fields not given on the command
    line. `trainer_kwargs(train_dataset) -> dict`: further constructor arguments (e.g. the online trainers'
    `reward_funcs`, see `verifier_rewards`). Returns the trained trainer."""
    argv = sys.argv[1:] if argv is None else argv
    config_class = trainer_class.config_class
    parser = HfArgumentParser((ScriptArguments, config_class))
    parser.set_defaults(output_dir=f"outputs/{trainer_class.algorithm.lower()}")
    script_args, _ = parser.parse_args_into_dataclasses(args=argv)
    if defaults.is_default_model_name(script_args.model_name_or_path):
        parser.set_defaults(**embedded_defaults)  # flags given on the command line still win
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    train_dataset, eval_dataset = load_data(script_args, default_dataset)
    if config.eval_strategy == "no":
        eval_dataset = None
    extra = trainer_kwargs(train_dataset) if trainer_kwargs is not None else {}
    trainer = trainer_class(
        script_args.model_name_or_path, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
        **peft_arguments(script_args), **extra,
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        trainer.create_model_card(dataset_name=script_args.dataset_name)
        plot = plot_metrics(trainer.state.log_history, os.path.join(config.output_dir, "training_metrics.png"))
        print(f"Saved model, model card{' and ' + plot if plot else ''} to {config.output_dir}")
    if config.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def check_arguments(trainer_class, argv: list[str]) -> None:
    """Parses `argv` as `run` will, so that `--help` or a bad flag answers at once, before any preparatory training
    (the warm starts of the SPIN and RLVR examples)."""
    HfArgumentParser((ScriptArguments, trainer_class.config_class)).parse_args_into_dataclasses(args=argv)


def verifier_rewards(dataset) -> dict:
    """`{"reward_funcs": [...]}` for an online trainer on a dataset with a verifiable answer (RLVR): math answer
    equivalence on a `solution` column (TRL's convention), test cases run in a sandbox on a `tests` column, exact match
    of the final answer on an `answer` column. Raises when the dataset has none of them."""
    from . import verifiers

    columns = dataset.column_names
    if "solution" in columns:
        return {"reward_funcs": [verifiers.accuracy_reward]}
    if "tests" in columns:
        return {"reward_funcs": [verifiers.code_reward()]}
    if "answer" in columns:
        return {"reward_funcs": [verifiers.exact_match_reward()]}
    raise ValueError(
        f"The dataset's columns {columns} hold no verifiable answer: the example needs a 'solution' (math), 'tests' "
        "(code) or 'answer' (exact match) column. Rename yours, or pass your own reward functions in Python."
    )


def sft_warm_start(dataset_name: str, output_dir: str, **config) -> str:
    """The embedded tiny model (random weights) fine-tuned on the embedded dataset `dataset_name` (prompt / answer
    or prompt / completion rows), saved to `output_dir` once and reused: the starting point of the examples whose
    methods begin from an SFT model (SPIN, RLVR). `config`: `SFTConfig` fields. Returns `output_dir`."""
    from datasets import Dataset

    from .trainers.sft import SFTConfig, SFTTrainer

    if os.path.isfile(os.path.join(output_dir, "model.safetensors")):
        return output_dir
    rows = defaults.load_default_dataset(dataset_name)
    if "answer" in rows.column_names:
        rows = Dataset.from_dict({"prompt": rows["prompt"], "completion": [" " + a for a in rows["answer"]]})
    settings = dict(lr_scheduler_type="constant", per_device_train_batch_size=16, logging_steps=50,
                    save_strategy="no", report_to="none", seed=0)
    args = SFTConfig(output_dir=output_dir, **{**settings, **config})
    trainer = SFTTrainer(defaults.DEFAULT_MODEL_NAME, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(output_dir)
    trainer.processing_class.save_pretrained(output_dir)
    return output_dir


def verifier_accuracy(model, tokenizer, dataset, reward, *, samples_per_prompt: int = 4, max_new_tokens: int = 8,
                      temperature: float = 1.0, seed: int = 0) -> float:
    """The mean reward of `reward` (a verifier: 1 correct, 0 wrong) over `samples_per_prompt` completions sampled for
    each prompt of `dataset` (with its answer columns), reproducibly from `seed`: held-out accuracy for RLVR."""
    from .generation import SamplingConfig, generate_completions

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              num_generations=samples_per_prompt, batch_size=256, seed=seed)
    completions = generate_completions(model, tokenizer, dataset["prompt"], sampling)
    columns = {key: [value for value in dataset[key] for _ in range(samples_per_prompt)]
               for key in dataset.column_names if key != "prompt"}
    prompts = [prompt for prompt in dataset["prompt"] for _ in range(samples_per_prompt)]
    scores = reward(prompts=prompts, completions=completions.texts, completion_ids=None, **columns)
    return sum(scores) / len(scores)


RLVR_DATASET = "comparisons"


def run_rlvr(trainer_class, embedded_defaults: dict, argv: list[str] | None = None, extra_reward_funcs=()):
    """Runs an online trainer's example with a verifier as the reward (`verifier_rewards`), followed by
    `extra_reward_funcs` (e.g. a format reward, for trainers that combine several). With no
    `--model_name_or_path`, on the embedded verifiable task: the tiny model, whose weights are random, is first
    fine-tuned on the training questions (`sft_warm_start`, kept in outputs/rlvr-sft-start), `embedded_defaults` are
    applied, and the held-out accuracy before and after training is printed. Returns the trained trainer."""
    argv = sys.argv[1:] if argv is None else argv
    check_arguments(trainer_class, argv)  # before the warm start trains anything
    embedded = not any(arg.split("=")[0] == "--model_name_or_path" for arg in argv)
    if embedded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = sft_warm_start(RLVR_DATASET, "outputs/rlvr-sft-start", learning_rate=2e-3, num_train_epochs=5)
        tokenizer = AutoTokenizer.from_pretrained(start)
        test = defaults.load_default_dataset(RLVR_DATASET, "test")
        verifier = verifier_rewards(test)["reward_funcs"][0]
        before = verifier_accuracy(AutoModelForCausalLM.from_pretrained(start), tokenizer, test, verifier)
        # The embedded defaults, as flags: the warm-started model is a local folder, not the default's name.
        argv = ["--model_name_or_path", start, *[f"--{key}={value}" for key, value in embedded_defaults.items()],
                *argv]
    def rewards(dataset) -> dict:
        return {"reward_funcs": [*verifier_rewards(dataset)["reward_funcs"], *extra_reward_funcs]}

    trainer = run(trainer_class, RLVR_DATASET, embedded_defaults, argv, trainer_kwargs=rewards)
    if embedded and trainer.is_world_process_zero():
        after = verifier_accuracy(trainer.model, tokenizer, test, verifier)
        print(f"Held-out accuracy (4 samples per question, temperature 1): {before:.1%} before "
              f"{trainer.algorithm}, {after:.1%} after")
    return trainer

