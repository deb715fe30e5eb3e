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

PLOTTED_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "accuracy", "mean_token_accuracy", "eval_loss")


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


def run(trainer_class, default_dataset: str, embedded_defaults: dict, argv: list[str] | None = None):
    """Runs an example: `trainer_class` with its `config_class`, on `default_dataset` (an embedded dataset name)
    unless `--dataset_name` is given. `embedded_defaults` are Config values for the embedded tiny model (a higher
    learning rate, a few hundred steps); they apply only to that model and only to fields not given on the command
    line. Returns the trained trainer."""
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
    trainer = trainer_class(
        script_args.model_name_or_path, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
        **peft_arguments(script_args),
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
