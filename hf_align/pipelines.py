"""The recipes with more than one training stage (hf_align.recipes): SPIN from an SFT warm start, and the classic
three-stage RLHF pipeline (InstructGPT, arXiv 2203.02155) of supervised fine-tuning, a reward model trained on
preference pairs, then PPO (arXiv 1707.06347) of the SFT model against that reward model."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import scripts
from .trainers.ppo import PPOConfig, PPOTrainer
from .trainers.reward import RewardTrainer
from .trainers.sft import SFTTrainer

# ------------------------------------------------------------------------------------------------------------ SPIN


def print_rounds(round_history: list[dict]) -> None:
    print("\nround | gap, train prompts | gap, held-out prompts | gap after the round | train loss")
    for row in round_history:
        held_out = row.get("eval_gap_start", float("nan"))
        print(f"{row['round']:>5} | {row['gap_start']:>18.2f} | {held_out:>21.2f} | {row['gap_end']:>19.2f} | "
              f"{row['train_loss']:.4f}")


def self_play(recipe, argv: list[str]):
    """SPIN: with no model named, the embedded tiny model is first fine-tuned on the same SFT data for a few epochs
    (into outputs/spin-sft-start), since SPIN starts from an SFT model. Prints, for each round, the log-likelihood gap
    between the ground truth and the model's own responses. Returns the trainer."""
    def warm_start() -> str:
        return scripts.sft_warm_start(recipe.default_dataset, "outputs/spin-sft-start", learning_rate=1e-3,
                                      num_train_epochs=6)

    trainer = scripts.run(recipe.trainer_class, recipe.default_dataset, recipe.embedded_defaults, argv,
                          start_model=warm_start)
    if trainer.is_world_process_zero():
        print_rounds(trainer.round_history)
    return trainer


# ------------------------------------------------------------------------------------------------------------ RLHF

CRITICS = ("reward_model", "value_head")
# The prefixes of the SFT and reward stages' own flags (`--sft.learning_rate=2e-5`), and their sections in a YAML
# config file (`sft: {learning_rate: 2e-5}`).
STAGES = ("sft", "reward")

# While --model_name_or_path is the embedded tiny model (random weights): large learning rates, short runs.
SFT_EMBEDDED_DEFAULTS = dict(
    learning_rate=2e-3, per_device_train_batch_size=8, num_train_epochs=2, logging_steps=10, save_strategy="no",
    report_to="none",
)
REWARD_EMBEDDED_DEFAULTS = dict(
    learning_rate=5e-4, per_device_train_batch_size=8, num_train_epochs=1, logging_steps=10, eval_strategy="epoch",
    save_strategy="no", report_to="none",
)


@dataclass
class PipelineArguments:
    sft_dataset_name: str | None = field(
        default=None, metadata={"help": "SFT data (Hub id or local file); default: the embedded 'sft' pairs."}
    )
    sft_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this SFT checkpoint instead of running stage 1."}
    )
    sft_output_dir: str = field(default="outputs/ppo-sft", metadata={"help": "Where stage 1 writes the SFT model."})
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Use this reward model instead of training one in stage 2."}
    )
    reward_output_dir: str = field(
        default="outputs/ppo-reward", metadata={"help": "Where stage 2 writes the reward model."}
    )
    prompt_dataset_name: str | None = field(
        default=None, metadata={"help": "Prompts for PPO (a `prompt` column); default: --dataset_name."}
    )
    critic: str = field(
        default="reward_model", metadata={"help": "reward_model (a copy of it, trained) or value_head (on the policy)."}
    )

    def __post_init__(self):
        if self.critic not in CRITICS:
            raise ValueError(f"--critic must be one of {CRITICS}, got {self.critic!r}.")


def as_flags(settings: dict) -> list[str]:
    return [f"--{key}={value}" for key, value in settings.items()]


def stage_flags(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """({stage: its flags without the prefix}, the other flags). A stage's section in the `--config` file comes first,
    so that its flags on the command line win."""
    sections = {}
    path = scripts.config_path(argv)
    if path is not None:
        import yaml

        try:
            with open(path, encoding="utf-8") as handle:
                settings = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError):
            settings = {}  # the PPO stage's parser reports it
        sections = {stage: settings.get(stage) or {} for stage in STAGES} if isinstance(settings, dict) else {}
    flags, rest = {}, list(argv)
    for stage in STAGES:
        prefix = f"--{stage}."
        from_file = as_flags({key: value for key, value in sections.get(stage, {}).items() if value is not None})
        flags[stage] = from_file + ["--" + arg[len(prefix):] for arg in rest if arg.startswith(prefix)]
        rest = [arg for arg in rest if not arg.startswith(prefix)]
    return flags, rest


def dataset_flags(script_args, dataset_name: str | None) -> list[str]:
    """The dataset flags for a stage reading `dataset_name` (None: the stage's embedded default)."""
    names = ("dataset_config", "dataset_train_split", "dataset_test_split")
    flags = [f"--{name}={getattr(script_args, name)}" for name in names if getattr(script_args, name) is not None]
    return flags + ([f"--dataset_name={dataset_name}"] if dataset_name else [])


def logged(trainer, name: str) -> list[float]:
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def supervised_fine_tuning(pipeline: PipelineArguments, arguments: scripts.ParsedArguments,
                           sft_flags: list[str]) -> str:
    """Stage 1; returns the SFT model's folder."""
    if pipeline.sft_model_name_or_path:
        return pipeline.sft_model_name_or_path
    argv = ["--model_name_or_path", arguments.model.model_name_or_path, "--output_dir", pipeline.sft_output_dir,
            *([f"--dataset_name={pipeline.sft_dataset_name}"] if pipeline.sft_dataset_name else []), *sft_flags]
    trainer = scripts.run(SFTTrainer, "sft", SFT_EMBEDDED_DEFAULTS, argv)
    trainer.accelerator.wait_for_everyone()  # the next stage loads what the main process saved
    return pipeline.sft_output_dir


def reward_modelling(pipeline: PipelineArguments, arguments: scripts.ParsedArguments, reward_flags: list[str],
                     sft_model: str):
    """Stage 2, from the SFT model; returns the reward model's folder and its held-out accuracy (None if unknown)."""
    if pipeline.reward_model_name_or_path:
        return pipeline.reward_model_name_or_path, None
    # The SFT folder is not the embedded default's name, so its defaults are passed as flags (given flags still win).
    argv = [*(as_flags(REWARD_EMBEDDED_DEFAULTS) if arguments.embedded else []),
            *dataset_flags(arguments.script, arguments.script.dataset_name), "--model_name_or_path", sft_model,
            "--output_dir", pipeline.reward_output_dir, *reward_flags]
    trainer = scripts.run(RewardTrainer, "preference", REWARD_EMBEDDED_DEFAULTS, argv)
    trainer.accelerator.wait_for_everyone()
    accuracies = logged(trainer, "eval_accuracy")
    return pipeline.reward_output_dir, accuracies[-1] if accuracies else None


def print_summary(sft_model: str, reward_model: str, accuracy: float | None, trainer) -> None:
    held_out = logged(trainer, "eval_reward")
    print("\nRLHF pipeline")
    print(f"  1. SFT model:    {sft_model}")
    print(f"  2. reward model: {reward_model}" + (f" (accuracy on held-out pairs: {accuracy:.1%})" if accuracy is
                                                   not None else ""))
    print(f"  3. PPO policy:   {trainer.args.output_dir}")
    if len(held_out) >= 2:
        print(f"  mean reward of completions to held-out prompts: {held_out[0]:.3f} before PPO, {held_out[-1]:.3f} "
              "after")


def rlhf(recipe, argv: list[str]):
    """The three stages, each writing a model (with its tokenizer, card and training_metrics.png) that the next one
    loads:

    1. SFT of --model_name_or_path on --sft_dataset_name (default: the embedded "sft" pairs) into --sft_output_dir.
       --sft_model_name_or_path skips it.
    2. A Bradley–Terry reward model from the SFT model on the pairs of --dataset_name (default: the embedded
       "preference" pairs) into --reward_output_dir. --reward_model_name_or_path skips it.
    3. PPO from the SFT model on the prompts of --prompt_dataset_name (default: --dataset_name), scored by the reward
       model, into --output_dir; the critic is a copy of the reward model (--critic reward_model) or a value head on
       the policy (--critic value_head).

    Every other flag (and key of the `--config` file) is the PPO stage's; the SFT and reward stages' Config fields
    are flags with the stage's prefix (`--sft.learning_rate=2e-5`) or keys of an `sft:` / `reward:` section of the
    file. Every flag is checked before the first stage starts. Returns the PPO trainer."""
    flags, ppo_argv = stage_flags(argv)
    arguments = scripts.parse_arguments(PPOConfig, ppo_argv, recipe.embedded_defaults, "outputs/ppo",
                                        recipe.default_dataset, extra_dataclasses=(PipelineArguments,),
                                        config_sections=STAGES)
    (pipeline,) = arguments.extra
    # The stages' own flags are checked too before anything trains (the stages parse them again when they start).
    scripts.parse_arguments(SFTTrainer.config_class, flags["sft"], SFT_EMBEDDED_DEFAULTS, pipeline.sft_output_dir,
                            "sft")
    scripts.parse_arguments(RewardTrainer.config_class, flags["reward"], REWARD_EMBEDDED_DEFAULTS,
                            pipeline.reward_output_dir, "preference")
    sft_model = supervised_fine_tuning(pipeline, arguments, flags["sft"])
    reward_model, accuracy = reward_modelling(pipeline, arguments, flags["reward"], sft_model)
    prompts = pipeline.prompt_dataset_name or arguments.script.dataset_name
    arguments.script.dataset_name = prompts
    critic = reward_model if pipeline.critic == "reward_model" else None
    trainer = scripts.train(PPOTrainer, arguments, recipe.default_dataset, model=sft_model,
                            trainer_kwargs=lambda _: {"reward_funcs": reward_model, "value_model": critic})
    if trainer.is_world_process_zero():
        print_summary(sft_model, reward_model, accuracy, trainer)
    return trainer
