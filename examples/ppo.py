"""The classic three-stage RLHF pipeline (InstructGPT, arXiv 2203.02155) in one script: supervised fine-tuning, a
reward model trained on preference pairs, then PPO (arXiv 1707.06347) of the SFT model against that reward model.

    python examples/ppo.py          # embedded tiny chat model, its SFT pairs and preference pairs, offline
    accelerate launch examples/ppo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --sft_dataset_name trl-lib/Capybara --dataset_name trl-lib/ultrafeedback_binarized \
        --prompt_dataset_name trl-lib/ultrafeedback-prompt --use_peft --learning_rate 1e-5 \
        --max_completion_length 256 --eval_strategy steps --eval_steps 500 --eval_on_start

Each stage writes a model (with its tokenizer, card and training_metrics.png) that the next one loads:

1. SFT of --model_name_or_path on --sft_dataset_name (default: the embedded "sft" pairs) into --sft_output_dir
   (default outputs/ppo-sft). --sft_model_name_or_path skips this stage and starts from that checkpoint.
2. A Bradley–Terry reward model (`RewardTrainer`) initialised from the SFT model, on the pairs of --dataset_name
   (default: the embedded "preference" pairs), into --reward_output_dir (default outputs/ppo-reward).
   --reward_model_name_or_path skips this stage and uses that reward model.
3. PPO from the SFT model on the prompts of --prompt_dataset_name (default: --dataset_name, which then needs a
   `prompt` column), scored by the reward model, into --output_dir (default outputs/ppo). The critic is a copy of the
   reward model, as in InstructGPT (--critic reward_model), or a value head on the policy (--critic value_head: with
   --use_peft the policy, its reference and the critic then share one copy of the base weights).

Every `PPOConfig` field is a flag (--beta, --adaptive_kl, --target_kl, --num_iterations, --vf_coef, ...), as are
--use_peft / --load_in_4bit and the LoRA settings: these apply to the PPO stage. The SFT and reward stages train every
weight; each of their Config fields is a flag with the stage's prefix, written with "=": --sft.learning_rate=2e-5,
--reward.num_train_epochs=1. --dataset_config / --dataset_train_split / --dataset_test_split apply to the preference
and prompt datasets. At the end the script prints the reward model's accuracy on held-out pairs and the mean reward of
the policy's completions to held-out prompts before and after PPO (PPO's evaluation at its first and last step: with
a Hub model, pass --eval_strategy steps --eval_steps N --eval_on_start as above to get them).
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_align import PPOConfig, PPOTrainer, RewardTrainer, SFTTrainer, defaults
from hf_align.scripts import ScriptArguments, run

CRITICS = ("reward_model", "value_head")

# While --model_name_or_path is the embedded tiny model (random weights): large learning rates, short runs.
SFT_EMBEDDED_DEFAULTS = dict(
    learning_rate=2e-3, per_device_train_batch_size=8, num_train_epochs=2, logging_steps=10, save_strategy="no",
    report_to="none",
)
REWARD_EMBEDDED_DEFAULTS = dict(
    learning_rate=5e-4, per_device_train_batch_size=8, num_train_epochs=1, logging_steps=10, eval_strategy="epoch",
    save_strategy="no", report_to="none",
)
PPO_EMBEDDED_DEFAULTS = dict(
    learning_rate=3e-4, max_steps=100, per_device_train_batch_size=16, max_completion_length=16, num_iterations=2,
    beta=0.05, logging_steps=10, eval_strategy="steps", eval_steps=100, eval_on_start=True, num_generations_eval=4,
    per_device_eval_batch_size=16, save_strategy="no", report_to="none",
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


def split_stage_flags(argv: list[str], stage: str) -> tuple[list[str], list[str]]:
    """(`--<stage>.<field>=<value>` flags as `--<field>=<value>`, every other flag)."""
    prefix = f"--{stage}."
    own = ["--" + arg[len(prefix):] for arg in argv if arg.startswith(prefix)]
    return own, [arg for arg in argv if not arg.startswith(prefix)]


def dataset_flags(script_args: ScriptArguments, dataset_name: str | None) -> list[str]:
    """The dataset flags for a stage reading `dataset_name` (None: the stage's embedded default)."""
    names = ("dataset_config", "dataset_train_split", "dataset_test_split")
    flags = [f"--{name}={getattr(script_args, name)}" for name in names if getattr(script_args, name) is not None]
    return flags + ([f"--dataset_name={dataset_name}"] if dataset_name else [])


def logged(trainer, name: str) -> list[float]:
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def supervised_fine_tuning(pipeline: PipelineArguments, script_args: ScriptArguments, sft_flags: list[str]) -> str:
    """Stage 1; returns the SFT model's folder."""
    if pipeline.sft_model_name_or_path:
        return pipeline.sft_model_name_or_path
    argv = ["--model_name_or_path", script_args.model_name_or_path, "--output_dir", pipeline.sft_output_dir,
            *([f"--dataset_name={pipeline.sft_dataset_name}"] if pipeline.sft_dataset_name else []), *sft_flags]
    trainer = run(SFTTrainer, "sft", SFT_EMBEDDED_DEFAULTS, argv)
    trainer.accelerator.wait_for_everyone()  # the next stage loads what the main process saved
    return pipeline.sft_output_dir


def reward_modelling(pipeline: PipelineArguments, script_args: ScriptArguments, reward_flags: list[str],
                     sft_model: str, embedded: bool):
    """Stage 2, from the SFT model; returns the reward model's folder and its held-out accuracy (None if unknown)."""
    if pipeline.reward_model_name_or_path:
        return pipeline.reward_model_name_or_path, None
    # The SFT folder is not the embedded default's name, so its defaults are passed as flags (given flags still win).
    argv = [*(as_flags(REWARD_EMBEDDED_DEFAULTS) if embedded else []), *dataset_flags(script_args,
            script_args.dataset_name), "--model_name_or_path", sft_model, "--output_dir", pipeline.reward_output_dir,
            *reward_flags]
    trainer = run(RewardTrainer, "preference", REWARD_EMBEDDED_DEFAULTS, argv)
    trainer.accelerator.wait_for_everyone()
    accuracies = logged(trainer, "eval_accuracy")
    return pipeline.reward_output_dir, accuracies[-1] if accuracies else None


def proximal_policy_optimization(pipeline, script_args, ppo_argv: list[str], sft_model: str, reward_model: str,
                                 embedded: bool):
    """Stage 3: PPO from the SFT model against the reward model; returns the trainer."""
    prompts = pipeline.prompt_dataset_name or script_args.dataset_name
    argv = [*(as_flags(PPO_EMBEDDED_DEFAULTS) if embedded else []), *ppo_argv, *dataset_flags(script_args, prompts),
            "--model_name_or_path", sft_model]
    critic = reward_model if pipeline.critic == "reward_model" else None
    return run(PPOTrainer, "preference", PPO_EMBEDDED_DEFAULTS, argv,
               trainer_kwargs=lambda _: {"reward_funcs": reward_model, "value_model": critic})


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


def main(argv: list[str] | None = None):
    """Runs the three stages; returns the PPO trainer."""
    argv = sys.argv[1:] if argv is None else argv
    sft_flags, argv = split_stage_flags(argv, "sft")
    reward_flags, argv = split_stage_flags(argv, "reward")
    # Every flag of the pipeline and of PPO is checked (and --help answered) before the first stage starts.
    HfArgumentParser((PipelineArguments, ScriptArguments, PPOConfig)).parse_args(argv)
    pipeline, ppo_argv = HfArgumentParser(PipelineArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    script_args, _ = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses(
        args=ppo_argv, return_remaining_strings=True)
    embedded = defaults.is_default_model_name(script_args.model_name_or_path)
    sft_model = supervised_fine_tuning(pipeline, script_args, sft_flags)
    reward_model, accuracy = reward_modelling(pipeline, script_args, reward_flags, sft_model, embedded)
    trainer = proximal_policy_optimization(pipeline, script_args, ppo_argv, sft_model, reward_model, embedded)
    if trainer.is_world_process_zero():
        print_summary(sft_model, reward_model, accuracy, trainer)
    return trainer


if __name__ == "__main__":
    main()
