"""Packaging: `import hf_align` is quiet and light (public names resolve on first use), one version number, and
setup.cfg's extras cover what the test suite imports."""

import ast
import configparser
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import hf_align

ROOT = Path(__file__).resolve().parent.parent
# Modules `import hf_align` must leave unimported: slow, optional, or printing on import.
HEAVY_MODULES = ("deepspeed", "bitsandbytes", "trl", "peft", "torch", "transformers", "hf_align.trainer",
                 "hf_align.trainers")
# Import names of the distributions that provide them, where the two differ.
DISTRIBUTION_OF_MODULE = {"yaml": "pyyaml", "math_verify": "math-verify", "latex2sympy2_extended": "math-verify"}


def _setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def _requirement_names(block: str) -> set[str]:
    """Distribution names of a setup.cfg requirement list (`name[extras]>=1,<2` -> `name`)."""
    names = set()
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower().replace("_", "-"))
    return names


def test_import_prints_nothing_and_imports_no_trainer_or_heavy_dependency():
    probe = f"import json, sys, hf_align; print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stderr == ""
    assert json.loads(result.stdout) == []


def test_cli_help_prints_only_its_usage_and_imports_no_trainer_or_heavy_dependency():
    probe = ("import json, sys, contextlib, io\nfrom hf_align import cli\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n    cli.main(['--help'])\n"
             f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stderr == ""
    assert json.loads(result.stdout) == []


def test_every_public_name_resolves_and_is_listed():
    for name in hf_align.__all__:
        assert getattr(hf_align, name) is not None, name
    assert set(hf_align.__all__) <= set(dir(hf_align))
    from hf_align import DPOTrainer  # the `from` form goes through the same module __getattr__

    assert DPOTrainer.__module__ == "hf_align.trainers.dpo"


def test_version_is_written_once_and_matches_the_installed_metadata():
    assert _setup_cfg()["metadata"]["version"] == "attr: hf_align.__version__"
    assert hf_align.__version__ == metadata.version("hf_align")


def test_extras_exist_and_dev_covers_what_the_tests_import():
    extras = _setup_cfg()["options.extras_require"]
    assert {"peft", "quantization", "deepspeed", "math", "plot", "docs", "dev"} <= set(extras)
    dev_extras = extras["dev"].split("hf_align[", 1)[1].split("]", 1)[0].split(",")
    covered = _requirement_names(_setup_cfg()["options"]["install_requires"]) | _requirement_names(extras["dev"])
    for extra in dev_extras:
        covered |= _requirement_names(extras[extra.strip()])
    # DeepSpeed is installed apart (it builds against the installed torch); its tests skip without it.
    covered |= _requirement_names(extras["deepspeed"])
    imported = set()
    for path in ROOT.glob("tests/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    local = {path.stem for path in ROOT.glob("tests/*.py")} | {"hf_align"}
    third_party = imported - set(sys.stdlib_module_names) - local
    # wandb and trackio are stood in for by fakes in the tests, never required.
    distributions = {DISTRIBUTION_OF_MODULE.get(module, module).replace("_", "-") for module in third_party}
    assert distributions - {"wandb", "trackio"} <= covered


def test_optional_dependency_missing_names_its_extra(monkeypatch):
    from hf_align.optional import import_optional

    monkeypatch.setitem(sys.modules, "math_verify", None)  # None in sys.modules makes the import fail
    with pytest.raises(ImportError, match=r'pip install "hf_align\[math\]"'):
        import_optional("math_verify", "math", "The math answer reward")
