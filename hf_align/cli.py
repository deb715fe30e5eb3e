"""The `hf-align` command: every algorithm's recipe (hf_align.recipes) behind one entry point, with TRL's CLI
conventions (a YAML file written for `trl dpo` runs unchanged with `hf-align dpo`).

    hf-align dpo                                   # embedded tiny model and data, offline
    hf-align dpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized
    hf-align dpo --config my.yaml --beta 0.05      # TRL's YAML format (env:, datasets:); flags on the command line win
    hf-align dpo --num_processes 2 --accelerate_config zero2    # through `accelerate launch`
    hf-align recommend trl-lib/ultrafeedback_binarized
    hf-align eval --model_name_or_path outputs/dpo --ref_model hf-align/tiny-chat   # metrics as JSON
    hf-align env
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROG = "hf-align"

OTHER_COMMANDS = {
    "recommend": "which trainer fits a dataset (hf_align.advisor): hf-align recommend DATASET [--split S]",
    "env": "versions of hf_align and its dependencies, the device, and the precision precision=\"auto\" picks",
    "eval": "a model against its reference on held-out pairs, the metrics as JSON (hf_align.evaluate)",
}
ENV_PACKAGES = ("hf_align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")
# --accelerate_config NAME -> the accelerate config file shipped in hf_align/accelerate_configs/.
ACCELERATE_CONFIGS = {
    "ddp": "ddp.yaml", "fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml",
}
LAUNCH_FLAGS = ("--num_processes", "--accelerate_config")


class CLIError(Exception):
    """A usage error: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------------- the recipes


def algorithms() -> dict:
    """`hf_align.recipes.RECIPES`, imported only when needed: `hf-align env` / `--version` load no trainer."""
    from .recipes import RECIPES

    return RECIPES


def check_algorithm(algorithm: str) -> None:
    if algorithm not in algorithms():
        raise CLIError(f"Unknown algorithm or command {algorithm!r}. Valid algorithms: {', '.join(algorithms())}; "
                       f"other commands: {', '.join(OTHER_COMMANDS)}. See `{PROG} --help`.")


def run_algorithm(algorithm: str, argv: list[str]) -> int:
    """Runs the recipe of `algorithm` with `argv` as its command line; returns the exit status."""
    from .recipes import run_recipe

    check_algorithm(algorithm)
    # argparse names itself after sys.argv[0]: "hf-align dpo" in --help and in its errors.
    saved_argv = sys.argv
    sys.argv = [f"{PROG} {algorithm}", *argv]
    try:
        run_recipe(algorithm, argv)
    except SystemExit as stop:  # --help, or a usage error reported by the parser
        status = stop.code
        return status if isinstance(status, int) else (0 if status is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


# ------------------------------------------------------------------------------------------------ accelerate


def accelerate_config_path(name: str) -> Path:
    """The accelerate config file `name` stands for: a shipped one (`ACCELERATE_CONFIGS`) or a file path."""
    if name in ACCELERATE_CONFIGS:
        return Path(__file__).resolve().parent / "accelerate_configs" / ACCELERATE_CONFIGS[name]
    if Path(name).is_file():
        return Path(name)
    raise CLIError(f"--accelerate_config must be one of {', '.join(ACCELERATE_CONFIGS)} or an accelerate config "
                   f"file, got {name!r}.")


def split_launch_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """({"num_processes": N, "accelerate_config": NAME} as given, the other flags)."""
    launch, rest, index = {}, [], 0
    while index < len(argv):
        flag, _, value = argv[index].partition("=")
        if flag in LAUNCH_FLAGS:
            if not value:
                if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                    raise CLIError(f"{flag} needs a value.")
                value, index = argv[index + 1], index + 1
            launch[flag[2:]] = value
        else:
            rest.append(argv[index])
        index += 1
    return launch, rest


def launch_command(algorithm: str, launch: dict[str, str], argv: list[str]) -> list[str]:
    """`accelerate launch --config_file C [--num_processes N] -m hf_align.cli <algorithm> ARGS`. Without
    --accelerate_config, DDP."""
    config = accelerate_config_path(launch.get("accelerate_config", "ddp"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if "num_processes" in launch:
        if not launch["num_processes"].isdigit() or int(launch["num_processes"]) < 1:
            raise CLIError(f"--num_processes must be a positive integer, got {launch['num_processes']!r}.")
        command += ["--num_processes", launch["num_processes"]]
    return [*command, "-m", "hf_align.cli", algorithm, *argv]


def launch(algorithm: str, launch_flags: dict[str, str], argv: list[str]) -> int:
    """Runs `hf-align <algorithm> ARGS` in the processes accelerate starts; returns their exit status."""
    check_algorithm(algorithm)
    command = launch_command(algorithm, launch_flags, argv)
    import torch

    # With no GPU, the processes run on the CPU (DDP over gloo, DeepSpeed's CPU mode).
    env = os.environ if torch.cuda.is_available() else {**os.environ, "ACCELERATE_USE_CPU": "1"}
    return subprocess.call(command, env=env)


# ---------------------------------------------------------------------------------------------------- env


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def auto_precision() -> str:
    """The precision a Config with `precision="auto"` resolves to on this machine (built the way trainers build it)."""
    import tempfile
    import warnings

    from .config import AlignConfig

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AlignConfig(output_dir=folder, report_to="none").precision


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        bf16 = "bf16 supported" if torch.cuda.is_bf16_supported() else "no bf16"
        return f"CUDA: {len(names)} x {names[0]}" + (f" (+ {', '.join(names[1:])})" if len(set(names)) > 1 else "") \
            + f", {bf16}"
    return f"CPU ({os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads)"


def env_report() -> str:
    import platform

    width = max(map(len, ENV_PACKAGES)) + 1
    lines = [f"{'python':<{width}} {platform.python_version()}"]
    lines += [f"{package:<{width}} {_version(package)}" for package in ENV_PACKAGES]
    lines.append(f"{'device':<{width}} {device_description()}")
    lines.append(f"{'precision':<{width}} {auto_precision()} (what precision=\"auto\" picks here)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def usage() -> str:
    recipes = algorithms()
    width = max(map(len, [*recipes, *OTHER_COMMANDS])) + 2
    lines = [
        f"usage: {PROG} <algorithm> [--model_name_or_path M] [--dataset_name D] [--config FILE.yaml] [--<field> V ...]",
        f"                            [--num_processes N] [--accelerate_config {{{','.join(ACCELERATE_CONFIGS)}}}]",
        f"       {PROG} recommend DATASET [--split S] [--config NAME]",
        f"       {PROG} eval [--model_name_or_path M] [--ref_model R] [--dataset_name D] [--reward_model RM] [...]",
        f"       {PROG} env",
        "",
        "Trains an algorithm's recipe (hf_align.recipes; examples/<algorithm>.py runs the same). With no model and no",
        "dataset it trains the embedded tiny model on the embedded data. The flags are TRL's: ScriptArguments,",
        "ModelConfig and the algorithm's Config fields; --config reads them from a YAML file in TRL's format (env:,",
        "datasets:), and flags on the command line win. `hf-align <algorithm> --help` lists that algorithm's flags",
        "with the defaults it will use. --num_processes / --accelerate_config run it through `accelerate launch`",
        "with one of hf_align's accelerate config files (or your own file).",
        "",
        "algorithms:",
        *(f"  {name:<{width}}{recipe.summary}" for name, recipe in recipes.items()),
        "",
        "other commands:",
        *(f"  {name:<{width}}{text}" for name, text in OTHER_COMMANDS.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(usage())
            return 0
        if argv[0] == "--version":
            print(f"hf_align {_version('hf_align')}")
            return 0
        command, rest = argv[0], argv[1:]
        if command == "env":
            if rest and rest[0] in ("-h", "--help"):
                print(f"usage: {PROG} env\n\n{OTHER_COMMANDS['env']}")
                return 0
            if rest:
                raise CLIError(f"`{PROG} env` takes no arguments, got {' '.join(rest)}")
            print(env_report())
            return 0
        if command == "recommend":
            from .advisor import main as advise

            return advise(rest)
        if command == "eval":
            from .evaluate import main as evaluate

            return evaluate(rest)
        launch_flags, rest = split_launch_flags(rest)
        if launch_flags:
            return launch(command, launch_flags, rest)
        return run_algorithm(command, rest)
    except CLIError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
