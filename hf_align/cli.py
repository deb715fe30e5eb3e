"""The `hf-align` command: every example script behind one entry point.

    hf-align dpo                                   # = python examples/dpo.py (embedded tiny model and data)
    hf-align dpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized
    hf-align dpo --config my.yaml --beta 0.05      # YAML keys are flags; flags on the command line win
    hf-align recommend trl-lib/ultrafeedback_binarized
    hf-align eval --model_name_or_path outputs/dpo --ref_model hf-align/tiny-chat   # metrics as JSON
    hf-align env

`hf-align <algorithm> ARGS` runs `examples/<algorithm>.py` exactly as `python examples/<algorithm>.py ARGS` would
(same `hf_align.scripts.run` / `run_rlvr` call, same embedded defaults, same bespoke logic: SPIN's warm start, the
three stages of PPO). The examples are read from the source checkout this package is installed from
(`pip install -e .`), or from `$HF_ALIGN_EXAMPLES`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import types
from pathlib import Path

PROG = "hf-align"

# Subcommand -> example script (examples/<script>.py).
ALGORITHMS = {
    "sft": "sft",
    "reward": "reward",
    "dpo": "dpo",
    "ipo": "ipo",
    "kto": "kto",
    "orpo": "orpo",
    "simpo": "simpo",
    "step_dpo": "step_dpo",
    "gdpo": "gdpo",
    "spin": "spin",
    "grpo": "grpo",
    "rloo": "rloo",
    "remax": "remax",
    "reinforce": "reinforce",
    "reinforce_pp": "reinforce_pp",
    "decoupled_gdpo": "decoupled_gdpo",
    "online_dpo": "online_dpo",
    "ppo": "ppo",
    "trpo": "trpo",
}
OTHER_COMMANDS = {
    "recommend": "which trainer fits a dataset (hf_align.advisor): hf-align recommend DATASET [--split S]",
    "env": "versions of hf_align and its dependencies, the device, and the precision precision=\"auto\" picks",
    "eval": "a model against its reference on held-out pairs, the metrics as JSON (hf_align.evaluate)",
}
# The PPO example's stage prefixes (`--sft.learning_rate=...`): a nested mapping under these keys in a YAML file.
PPO_STAGES = ("sft", "reward")
ENV_PACKAGES = ("hf_align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


class CLIError(Exception):
    """A usage error: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------------- the examples


def examples_dir() -> Path:
    """The folder of example scripts: `$HF_ALIGN_EXAMPLES`, else `examples/` next to the installed package."""
    override = os.environ.get("HF_ALIGN_EXAMPLES")
    folder = Path(override) if override else Path(__file__).resolve().parent.parent / "examples"
    if not folder.is_dir():
        raise CLIError(
            f"The example scripts were not found at {folder}. The CLI runs them: install hf_align from its source "
            "checkout (pip install -e .) or point $HF_ALIGN_EXAMPLES at the checkout's examples/ folder."
        )
    return folder


def example_path(algorithm: str) -> Path:
    if algorithm not in ALGORITHMS:
        raise CLIError(f"Unknown algorithm or command {algorithm!r}. Valid algorithms: {', '.join(ALGORITHMS)}; "
                       f"other commands: {', '.join(OTHER_COMMANDS)}. See `{PROG} --help`.")
    path = examples_dir() / f"{ALGORITHMS[algorithm]}.py"
    if not path.is_file():
        raise CLIError(f"The example script for {algorithm!r} is missing: {path}")
    return path


def summary(path: Path, limit: int = 90) -> str:
    """The first sentence of an example's docstring (read without running the script)."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):
        return ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.])\s", paragraph, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def run_example(algorithm: str, argv: list[str]) -> int:
    """Runs examples/<algorithm>.py as its `__main__` with `argv` as its command line; returns the exit status."""
    path = example_path(algorithm)
    source = path.read_text(encoding="utf-8")
    code = compile(source, str(path), "exec")
    # Like `runpy.run_path(path, run_name="__main__")`, but sys.argv[0] stays "hf-align <algorithm>": the example's
    # argument parser names itself after it in --help and in its errors.
    module = types.ModuleType("__main__", ast.get_docstring(ast.parse(source)))
    module.__file__ = str(path)
    saved_argv, saved_main = sys.argv, sys.modules.get("__main__")
    sys.argv = [f"{PROG} {algorithm}", *argv]
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)  # noqa: S102 - the project's own example script
    except SystemExit as stop:  # --help, or an argument error reported by the example's parser
        status = stop.code
        return status if isinstance(status, int) else (0 if status is None else 1)
    finally:
        sys.argv = saved_argv
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
    return 0


# ---------------------------------------------------------------------------------------------------- YAML files


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def yaml_flags(path: str, algorithm: str) -> list[str]:
    """The flags a YAML config file stands for: `key: value` -> `--key=value`, a list -> `--key a b`, a mapping ->
    JSON (e.g. `model_init_kwargs`), `null` -> left at its default. For ppo, a mapping under `sft:` / `reward:` holds
    that stage's fields (`--sft.learning_rate=...`)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            settings = yaml.safe_load(handle)
    except OSError as error:
        raise CLIError(f"Cannot read the config file {path!r}: {error}") from error
    except yaml.YAMLError as error:
        raise CLIError(f"The config file {path!r} is not valid YAML: {error}") from error
    if settings is None:
        return []
    if not isinstance(settings, dict):
        raise CLIError(f"The config file {path!r} must be a mapping of field names to values.")
    flags = []
    for key, value in settings.items():
        if value is None:
            continue
        if algorithm == "ppo" and key in PPO_STAGES and isinstance(value, dict):
            flags += [f"--{key}.{field}={_flag_value(item)}" for field, item in value.items() if item is not None]
        elif isinstance(value, (list, tuple)):
            flags += [f"--{key}", *(_flag_value(item) for item in value)]
        else:
            flags.append(f"--{key}={_flag_value(value)}")
    return flags


def expand_config(argv: list[str], algorithm: str) -> list[str]:
    """`argv` with `--config FILE` replaced by the file's flags, placed first so that command-line flags win."""
    rest, files = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--config":
            if index + 1 >= len(argv):
                raise CLIError("--config needs a YAML file.")
            files.append(argv[index + 1])
            index += 2
            continue
        if arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        index += 1
    from_files = [flag for path in files for flag in yaml_flags(path, algorithm)]
    return [*from_files, *rest]


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
    try:
        folder = examples_dir()
        described = {name: summary(folder / f"{script}.py") for name, script in ALGORITHMS.items()}
    except CLIError:
        described = dict.fromkeys(ALGORITHMS, "")
    width = max(map(len, [*ALGORITHMS, *OTHER_COMMANDS])) + 2
    lines = [
        f"usage: {PROG} <algorithm> [--model_name_or_path M] [--dataset_name D] [--config FILE.yaml] [--<field> V ...]",
        f"       {PROG} recommend DATASET [--split S] [--config NAME]",
        f"       {PROG} eval [--model_name_or_path M] [--ref_model R] [--dataset_name D] [--reward_model RM] [...]",
        f"       {PROG} env",
        "",
        "Trains with the same code as examples/<algorithm>.py. With no model and no dataset it trains the embedded tiny",
        "model on the embedded data. Every ScriptArguments and Config field is a flag; --config reads them from a YAML",
        "file (flags on the command line win). `hf-align <algorithm> --help` lists that algorithm's flags.",
        "",
        "algorithms:",
        *(f"  {name:<{width}}{text}" for name, text in described.items()),
        "",
        "other commands:",
        *(f"  {name:<{width}}{text}" for name, text in OTHER_COMMANDS.items()),
        "",
        "Multi-GPU: accelerate launch --config_file examples/accelerate_configs/ddp.yaml -m hf_align.cli dpo ...",
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
        return run_example(command, expand_config(rest, command))
    except CLIError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
