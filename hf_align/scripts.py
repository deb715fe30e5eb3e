"""What every recipe does (hf_align.recipes: `hf-align <algorithm>` and the example scripts): parse the arguments
with TRL's conventions (`TrlParser` over TRL's `ScriptArguments`, the algorithm's Config, TRL's `ModelConfig` and
`DatasetMixtureConfig`: a YAML file written for `trl <algorithm>` works unchanged), load model and data (the embedded
default when none are named), train (resuming from a checkpoint when asked), save the model with its card and a plot
of the training metrics, and optionally push to the Hub."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass

import datasets
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_dataset

from . import defaults
from .optional import import_optional

logger = logging.getLogger(__name__)

PLOTTED_METRICS = (
    "loss", "rewards/margins", "rewards/accuracies", "accuracy", "mean_token_accuracy", "eval_loss", "reward",
)


@dataclass
class ParsedArguments:
    """A recipe's command line (and YAML config file), parsed."""

    script: ScriptArguments
    config: object  # the algorithm's Config
    model: ModelConfig
    dataset_mixture: DatasetMixtureConfig
    extra: tuple  # instances of the recipe's own dataclasses (e.g. the RLHF pipeline's), in the order given
    embedded: bool  # no model named: the embedded tiny model and the recipe's embedded defaults


def config_path(argv: list[str]) -> str | None:
    """The YAML file named by `--config FILE` / `--config=FILE` in `argv`, if any."""
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _with_separate_config_flag(argv: list[str]) -> list[str]:
    # TrlParser finds the config file only as two items, `--config FILE`.
    out = []
    for arg in argv:
        out += ["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg]
    return out


def argument_parser(config_class, output_dir: str, default_dataset: str, extra_dataclasses=(),
                    embedded_defaults: dict | None = None) -> TrlParser:
    """TRL's parser over TRL's `ScriptArguments`, `config_class`, `ModelConfig`, `DatasetMixtureConfig` and
    `extra_dataclasses`, with the defaults that will actually be used shown in `--help`: the embedded tiny model and
    dataset, the recipe's `output_dir` and, when given, `embedded_defaults` (the recipe's values for that model)."""
    parser = TrlParser((ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig, *extra_dataclasses))
    parser.set_defaults(model_name_or_path=defaults.DEFAULT_MODEL_NAME, output_dir=output_dir,
                        **(embedded_defaults or {}))
    helps = {
        "model_name_or_path": f"Hub id or local path of the model; {defaults.DEFAULT_MODEL_NAME} is the embedded "
                              "tiny chat model (built offline, random weights).",
        # argparse would add "(default: None)": say what None means.
        "dataset_name": "Hub id, or local .json/.jsonl/.parquet/.csv file, of the dataset; %(default)s: the embedded "
                        f"{default_dataset!r} dataset. A `datasets:` mixture in the config file takes precedence.",
    }
    for action in parser._actions:
        action.help = helps.get(action.dest, action.help)
    return parser


def _usage_error(parser: TrlParser, unknown: list[str], source: str) -> None:
    """Exits with status 2 naming the unknown flags in `unknown` (from `source`), each with its closest valid flag."""
    valid = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    named = []
    for item in unknown:
        if not item.startswith("-"):
            continue  # a value of an unknown flag
        flag = item.split("=", 1)[0]
        close = difflib.get_close_matches(flag, valid, n=1)
        named.append(flag + (f" (did you mean {close[0]}?)" if close else ""))
    parser.error(f"unrecognized arguments {source}: {', '.join(named or unknown)}")


def parse_arguments(config_class, argv: list[str], embedded_defaults: dict, output_dir: str, default_dataset: str,
                    *, extra_dataclasses=(), config_sections=()) -> ParsedArguments:
    """Parses `argv` (with its `--config FILE.yaml`, whose `env:` block is exported) as TRL's scripts do.
    `embedded_defaults` apply when no model is named (on the command line or in the file), below the file's values
    and the command line's. Unknown flags or file keys, and invalid values, exit with status 2 (argparse's usage
    error), the unknown ones with the closest valid flag. `config_sections`: top-level keys of the file that the
    caller reads itself (the RLHF pipeline's `sft:` / `reward:` stage settings)."""
    argv = _with_separate_config_flag(list(argv))
    # A first pass, without --help (which would exit): whether a model is named decides if the embedded defaults
    # apply, and they must be in place before --help prints the defaults.
    probe = argument_parser(config_class, output_dir, default_dataset, extra_dataclasses)
    probe_argv = [arg for arg in argv if arg not in ("-h", "--help")]
    try:
        probed = probe.parse_args_and_config(probe_argv, return_remaining_strings=True)
    except (OSError, ValueError) as error:
        probe.error(str(error))
    embedded = defaults.is_default_model_name(probed[2].model_name_or_path)
    parser = argument_parser(config_class, output_dir, default_dataset, extra_dataclasses,
                             embedded_defaults if embedded else None)
    try:
        *parsed, from_file, from_command_line = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    sections = {f"--{name}" for name in config_sections}
    from_file = [item for index, item in enumerate(from_file)
                 if item not in sections and not (index and from_file[index - 1] in sections)]
    if from_file:
        _usage_error(parser, from_file, f"in {config_path(argv)}")
    if from_command_line:
        _usage_error(parser, from_command_line, "on the command line")
    script, config, model, mixture, *extra = parsed
    return ParsedArguments(script, config, model, mixture, tuple(extra), embedded)


def load_data(script_args: ScriptArguments, default_dataset: str, dataset_mixture: DatasetMixtureConfig | None = None):
    """`(train, eval or None)`: the splits of the `datasets:` mixture (TRL's `get_dataset`) if one is given, else of
    the named dataset (a Hub id or a local .json/.jsonl/.parquet/.csv file), else the embedded default's train/test."""
    if dataset_mixture is not None and dataset_mixture.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: the `datasets` mixture is used.")
        loaded = get_dataset(dataset_mixture)
    elif script_args.dataset_name is None:
        return defaults.load_default_dataset(default_dataset, "train"), defaults.load_default_dataset(
            default_dataset, "test"
        )
    else:
        name = script_args.dataset_name
        extension = os.path.splitext(name)[1].lstrip(".")
        if os.path.isfile(name):
            loaded = datasets.load_dataset({"jsonl": "json"}.get(extension, extension), data_files=name)
        else:
            loaded = datasets.load_dataset(name, script_args.dataset_config,
                                           streaming=script_args.dataset_streaming)
    test_split = script_args.dataset_test_split
    return loaded[script_args.dataset_train_split], loaded[test_split] if test_split in loaded else None


def model_init_kwargs(model_args: ModelConfig) -> dict:
    """The `from_pretrained` arguments of `ModelConfig` that were set (TRL's defaults, e.g. dtype float32, are left
    out so that hf_align's own choices, such as its precision selection, stay in force)."""
    kwargs = {}
    if model_args.model_revision not in (None, "main"):
        kwargs["revision"] = model_args.model_revision
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.dtype not in (None, "float32"):
        kwargs["dtype"] = model_args.dtype
    return kwargs


def peft_arguments(model_args: ModelConfig) -> dict:
    """`peft_config` and `quantization_config` for the trainer from `ModelConfig`'s LoRA / QLoRA fields. LoRA targets
    every linear layer unless `lora_target_modules` / `lora_target_parameters` say otherwise."""
    out = {}
    if model_args.use_peft or model_args.load_in_4bit or model_args.load_in_8bit:
        from trl import get_peft_config

        peft_config = get_peft_config(dataclasses.replace(model_args, use_peft=True))  # QLoRA implies LoRA
        if model_args.lora_target_modules is None and model_args.lora_target_parameters is None:
            peft_config.target_modules = "all-linear"
        out["peft_config"] = peft_config
    if model_args.load_in_4bit or model_args.load_in_8bit:
        import torch
        from transformers import BitsAndBytesConfig

        if model_args.load_in_8bit:
            out["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            # The compute dtype follows the hardware unless a dtype is given: bf16 is ~27x slower than fp32 on a CPU.
            compute_dtype = model_args.dtype if model_args.dtype not in (None, "float32", "auto") else (
                torch.bfloat16 if torch.cuda.is_available() else torch.float32)
            out["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                bnb_4bit_compute_dtype=compute_dtype,
                bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
                bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
            )
    return out


def plot_metrics(log_history: list[dict], path: str) -> str | None:
    """Saves a PNG with one panel per logged metric among `PLOTTED_METRICS`; returns its path."""
    matplotlib = import_optional("matplotlib", "plot", "The training-curve plot")
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


def train(trainer_class, arguments: ParsedArguments, default_dataset: str, model: str | None = None,
          trainer_kwargs=None):
    """Trains `trainer_class` as `arguments` say, on `default_dataset` (an embedded dataset name) unless a dataset is
    named, from `model` if given (a warm start or an earlier stage's output) else the named model. Resumes from
    `--resume_from_checkpoint` (a checkpoint folder). `trainer_kwargs(train_dataset) -> dict`: further constructor
    arguments (e.g. the online trainers' `reward_funcs`, see `verifier_rewards`). Saves the model, its card and
    training_metrics.png to `output_dir`, pushes to the Hub if asked; returns the trained trainer."""
    script_args, config, model_args = arguments.script, arguments.config, arguments.model
    train_dataset, eval_dataset = load_data(script_args, default_dataset, arguments.dataset_mixture)
    if config.eval_strategy == "no":
        eval_dataset = None
    init_kwargs = model_init_kwargs(model_args)
    if init_kwargs:
        config.model_init_kwargs = {**init_kwargs, **(config.model_init_kwargs or {})}
    extra = trainer_kwargs(train_dataset) if trainer_kwargs is not None else {}
    trainer = trainer_class(
        model or model_args.model_name_or_path, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
        **peft_arguments(model_args), **extra,
    )
    if script_args.ignore_bias_buffers:
        import torch

        # DDP cannot broadcast boolean buffers (transformers issue 22482): leave them out of its synchronisation.
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        trainer.create_model_card(dataset_name=script_args.dataset_name)
        # The plot is optional (the `plot` extra): a run without matplotlib still saves its model.
        can_plot = importlib.util.find_spec("matplotlib") is not None
        plot = plot_metrics(trainer.state.log_history, os.path.join(config.output_dir, "training_metrics.png")) \
            if can_plot else None
        print(f"Saved model, model card{' and ' + plot if plot else ''} to {config.output_dir}")
        if not can_plot:
            print('No training_metrics.png: the plot needs matplotlib, pip install "hf_align[plot]"')
    if config.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def run(trainer_class, default_dataset: str, embedded_defaults: dict, argv: list[str] | None = None,
        trainer_kwargs=None, start_model=None):
    """Parses `argv` (`parse_arguments`) and trains (`train`). `embedded_defaults` are Config values for the embedded
    tiny model (a higher learning rate, a few hundred steps); they apply only when no model is named, below the
    config file's values and the command line's. `start_model() -> path`: with no model named, builds the model to
    train in place of the embedded tiny one (a warm start), after the arguments parse (so that --help or a bad flag
    answers at once). Returns the trained trainer."""
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(trainer_class.config_class, argv, embedded_defaults,
                                f"outputs/{trainer_class.algorithm.lower()}", default_dataset)
    model = start_model() if arguments.embedded and start_model is not None else None
    return train(trainer_class, arguments, default_dataset, model, trainer_kwargs)


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
    """Runs an online trainer with a verifier as the reward (`verifier_rewards`), followed by `extra_reward_funcs`
    (e.g. a format reward, for trainers that combine several). With no model named, on the embedded verifiable task:
    the tiny model, whose weights are random, is first fine-tuned on the training questions (`sft_warm_start`, kept
    in outputs/rlvr-sft-start), `embedded_defaults` apply, and the held-out accuracy before and after training is
    printed. Returns the trained trainer."""
    held_out = {}

    def warm_start() -> str:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = sft_warm_start(RLVR_DATASET, "outputs/rlvr-sft-start", learning_rate=2e-3, num_train_epochs=5)
        test = defaults.load_default_dataset(RLVR_DATASET, "test")
        verifier = verifier_rewards(test)["reward_funcs"][0]
        tokenizer = AutoTokenizer.from_pretrained(start)
        before = verifier_accuracy(AutoModelForCausalLM.from_pretrained(start), tokenizer, test, verifier)
        held_out.update(test=test, verifier=verifier, tokenizer=tokenizer, before=before)
        return start

    def rewards(dataset) -> dict:
        return {"reward_funcs": [*verifier_rewards(dataset)["reward_funcs"], *extra_reward_funcs]}

    trainer = run(trainer_class, RLVR_DATASET, embedded_defaults, argv, trainer_kwargs=rewards,
                  start_model=warm_start)
    if held_out and trainer.is_world_process_zero():
        after = verifier_accuracy(trainer.model, held_out["tokenizer"], held_out["test"], held_out["verifier"])
        print(f"Held-out accuracy (4 samples per question, temperature 1): {held_out['before']:.1%} before "
              f"{trainer.algorithm}, {after:.1%} after")
    return trainer
