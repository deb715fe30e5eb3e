"""The `hf-align` command (hf_align.cli): every subcommand, TRL-style YAML config files, usage errors, resuming, the
console-script entry point, launching through accelerate, and the accelerate config files in
hf_align/accelerate_configs/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_align import cli
from hf_align.recipes import RECIPES

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = REPO / "hf_align" / "accelerate_configs"
FAST = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]


def saved_args(output_dir: Path):
    """The Config the trainer ran with (`Trainer.save_model` writes it as training_args.bin)."""
    return torch.load(output_dir / "training_args.bin", weights_only=False)


ALGORITHMS = sorted(RECIPES)


def test_every_algorithm_has_its_recipe_and_a_thin_example():
    assert set(RECIPES) == {
        "sft", "reward", "dpo", "ipo", "kto", "orpo", "simpo", "step_dpo", "distributional_gdpo", "spin", "grpo", "rloo", "remax",
        "reinforce", "reinforce_pp", "decoupled_gdpo", "online_dpo", "ppo", "trpo",
    }
    for algorithm in RECIPES:
        example = (REPO / "examples" / f"{algorithm}.py").read_text()
        assert f'run_recipe("{algorithm}", argv)' in example


def test_help_lists_algorithms_and_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*ALGORITHMS, "recommend", "env", "eval"]:
        assert f"\n  {name} " in out
    assert cli.main([]) == 0  # no arguments: the same help


def test_algorithm_help_lists_its_flags(capsys):
    assert cli.main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hf-align dpo")
    for flag in ("--model_name_or_path", "--dataset_name", "--use_peft", "--beta", "--loss_type", "--precision"):
        assert flag in out


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_answers_help_without_training(algorithm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([algorithm, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: hf-align {algorithm} ")
    assert not (tmp_path / "outputs").exists()  # no SFT warm start (spin, RLVR) before the help text


def test_unknown_algorithm_is_a_clear_error(capsys):
    assert cli.main(["dpoo", "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "Unknown algorithm or command 'dpoo'" in err
    assert "dpo, ipo, kto" in err and "recommend, env" in err


def test_env_reports_versions_device_and_precision(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    for package in ("hf_align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        assert lines[package].strip() not in ("", "not installed"), package
    assert lines["torch"].startswith(torch.__version__.split("+")[0])
    if torch.cuda.is_available():
        assert lines["device"].startswith("CUDA: ")
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    else:
        assert lines["device"].startswith("CPU")
        expected = "fp32"
    assert lines["precision"].startswith(expected)


def test_recommend_uses_the_advisor(capsys):
    assert cli.main(["recommend", "unpaired_preference"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Dataset: unpaired_preference")
    assert "1. KTOTrainer" in out


def test_eval_prints_the_metrics_as_json(capsys, tiny_model_path, tiny_seqcls_path):
    # No model and no dataset: the embedded tiny model on the embedded held-out pairs (their first 4 rows here).
    assert cli.main(["eval", "--max_samples", "4", "--max_new_tokens", "4"]) == 0
    embedded = json.loads(capsys.readouterr().out)
    assert set(embedded) == {"preference_accuracy", "reward_margin", "perplexity", "completion_length"}
    assert 0 <= embedded["preference_accuracy"] <= 1 and embedded["perplexity"] > 1
    assert 1 <= embedded["completion_length"] <= 4
    # The same model named by its path, against itself as the reference, with a reward model: zero margins, and
    # the same greedy completions from both (every prompt a tie).
    argv = ["eval", "--model_name_or_path", tiny_model_path, "--ref_model", tiny_model_path, "--reward_model",
            tiny_seqcls_path, "--max_samples", "4", "--max_new_tokens", "4"]
    assert cli.main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"preference_accuracy", "reward_margin", "perplexity", "completion_length", "reward_score",
                            "win_rate"}
    assert metrics["reward_margin"] == 0 and metrics["preference_accuracy"] == 0 and metrics["win_rate"] == 0.5
    assert metrics["perplexity"] == pytest.approx(embedded["perplexity"])  # the embedded default is that model


def test_eval_reports_bad_data_without_a_traceback(tmp_path, capsys):
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text(json.dumps({"prompt": "Hi", "chosen": " Hello."}) + "\n")
    assert cli.main(["eval", "--dataset_name", str(dataset), "--dataset_test_split", "train"]) == 2
    assert "no column ['rejected']" in capsys.readouterr().err


def test_dpo_with_no_model_or_dataset_trains_on_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "dpo"
    assert cli.main(["dpo", "--max_steps", "2", "--output_dir", str(out_dir), *FAST]) == 0
    assert (out_dir / "model.safetensors").is_file()
    assert "DPO" in (out_dir / "README.md").read_text()
    args = saved_args(out_dir)
    assert args.learning_rate == 5e-4 and args.per_device_train_batch_size == 8  # the dpo recipe's embedded defaults
    assert args.max_steps == 2 and args.precision == ("bf16" if torch.cuda.is_available() else "fp32")
    assert "Saved model, model card" in capsys.readouterr().out


def test_yaml_config_sets_fields_and_command_line_flags_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "from-yaml"
    config = tmp_path / "kto.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(out_dir), "beta": 0.3, "max_steps": 5, "learning_rate": 1e-4, "report_to": "none",
        "save_strategy": "no", "disable_tqdm": True, "dataset_test_split": None,
    }))
    assert cli.main(["kto", "--config", str(config), "--max_steps", "1", "--desirable_weight=1.2"]) == 0
    args = saved_args(out_dir)
    assert args.beta == 0.3 and args.learning_rate == 1e-4  # from the file (over the embedded defaults)
    assert args.max_steps == 1 and args.desirable_weight == 1.2  # the command line wins over the file


def test_missing_or_invalid_config_file_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["dpo", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    assert cli.main(["dpo", f"--config={bad}"]) == 2
    assert "must contain a YAML mapping" in capsys.readouterr().err


def test_unknown_flags_are_usage_errors_with_suggestions(tmp_path, monkeypatch):
    """Exit status 2, the closest valid flag, no traceback: through the console script, as a user sees it."""
    monkeypatch.chdir(tmp_path)
    result = subprocess.run([*console_script(), "dpo", "--bta", "0.1", "--lerning_rate=1e-3"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "--bta (did you mean --beta?)" in result.stderr
    assert "--lerning_rate (did you mean --learning_rate?)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "outputs").exists()
    config = tmp_path / "typo.yaml"
    config.write_text("num_train_epoch: 1\n")
    result = subprocess.run([*console_script(), "dpo", "--config", str(config)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"in {config}: --num_train_epoch (did you mean --num_train_epochs?)" in result.stderr


def test_online_algorithm_through_the_cli(tmp_path, monkeypatch, tiny_model_path):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "grpo"
    argv = ["grpo", "--model_name_or_path", tiny_model_path, "--max_steps", "1", "--per_device_train_batch_size", "4",
            "--num_generations", "4", "--max_completion_length", "4", "--output_dir", str(out_dir), *FAST]
    assert cli.main(argv) == 0
    assert (out_dir / "model.safetensors").is_file()
    trainer_args = saved_args(out_dir)
    assert trainer_args.num_generations == 4 and trainer_args.max_steps == 1
    assert not (tmp_path / "outputs" / "rlvr-sft-start").exists()  # a named model skips the embedded warm start


def console_script() -> list[str]:
    script = shutil.which("hf-align")
    return [script] if script else [sys.executable, "-m", "hf_align.cli"]


def test_console_script_entry_point():
    result = subprocess.run([*console_script(), "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hf-align <algorithm>") and "decoupled_gdpo" in result.stdout


@pytest.mark.parametrize("name, kind", [
    ("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"), ("deepspeed_zero2.yaml", "DEEPSPEED"),
    ("deepspeed_zero3.yaml", "DEEPSPEED"),
])
def test_accelerate_configs_parse(name, kind):
    text = (ACCELERATE_CONFIGS / name).read_text()
    config = yaml.safe_load(text)
    assert config["distributed_type"] == kind
    assert isinstance(config["num_processes"], int) and config["num_processes"] >= 2
    header = text.split("\ncompute_environment")[0]
    assert f"accelerate launch --config_file hf_align/accelerate_configs/{name}" in header
    if kind == "DEEPSPEED":  # run on the CPU by the tests
        assert "tests/test_deepspeed.py" in header
    else:
        assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in header
    if kind == "FSDP":
        assert "UNTESTED" in header
    if kind == "FSDP":
        assert config["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert config["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if kind == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] == int(name[-6])
    from accelerate.commands.config.config_args import ClusterConfig

    assert ClusterConfig.from_yaml_file(str(ACCELERATE_CONFIGS / name)).num_processes == config["num_processes"]


def test_resume_from_checkpoint_continues_where_the_run_stopped(tmp_path, monkeypatch):
    """A run resumed from its step-2 checkpoint trains steps 3 and 4 only and ends with the uninterrupted run's
    weights and losses."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    common = ["sft", "--max_steps", "4", "--lr_scheduler_type", "constant", "--logging_steps", "1",
              "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "steps",
              "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert cli.main([*common, "--output_dir", str(whole)]) == 0
    assert cli.main([*common, "--output_dir", str(resumed),
                     "--resume_from_checkpoint", str(whole / "checkpoint-2")]) == 0
    # Steps 1 and 2 were not trained again: a fresh run would have saved checkpoint-2 here.
    assert sorted(path.name for path in resumed.glob("checkpoint-*")) == ["checkpoint-4"]

    def losses(folder):
        state = json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())
        return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]

    assert [step for step, _ in losses(whole)] == [1, 2, 3, 4]
    assert losses(resumed) == pytest.approx(losses(whole))
    final, final_resumed = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name, weight in final.items():
        torch.testing.assert_close(final_resumed[name], weight)


@pytest.mark.parametrize("name, file", [("ddp", "ddp.yaml"), ("fsdp", "fsdp.yaml"), ("zero2", "deepspeed_zero2.yaml"),
                                        ("zero3", "deepspeed_zero3.yaml")])
def test_launch_command_uses_the_shipped_accelerate_config(name, file):
    launch, rest = cli.split_launch_flags(["--num_processes", "4", "--beta", "0.1", f"--accelerate_config={name}"])
    assert launch == {"num_processes": "4", "accelerate_config": name} and rest == ["--beta", "0.1"]
    command = cli.launch_command("dpo", launch, rest)
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / file)]
    assert command[5:] == ["--num_processes", "4", "-m", "hf_align.cli", "dpo", "--beta", "0.1"]


def test_bad_launch_flags_are_usage_errors(capsys):
    assert cli.main(["dpo", "--accelerate_config", "zero4"]) == 2
    assert "--accelerate_config must be one of ddp, fsdp, zero2, zero3" in capsys.readouterr().err
    assert cli.main(["dpo", "--num_processes", "two"]) == 2
    assert "--num_processes must be a positive integer" in capsys.readouterr().err


def test_two_processes_through_accelerate(tmp_path):
    """`hf-align dpo --num_processes 2 --accelerate_config ddp`: DDP over gloo on this CPU, the model saved once."""
    out = tmp_path / "ddp"
    result = subprocess.run(
        [*console_script(), "dpo", "--num_processes", "2", "--accelerate_config", "ddp", "--max_steps", "2",
         "--eval_strategy", "no", "--output_dir", str(out), *FAST],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    assert result.stdout.count("Saved model, model card") == 1  # rank 0 only


def test_ppo_checks_every_stage_flag_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({"beta": 0.1, "sft": {"learning_rate": 2e-5}, "reward": {"num_train_epoks": 1}}))
    assert cli.main(["ppo", "--config", str(config)]) == 2
    assert "--num_train_epoks (did you mean --num_train_epochs?)" in capsys.readouterr().err
    assert cli.main(["ppo", "--sft.lerning_rate=1e-5"]) == 2
    assert "--lerning_rate (did you mean --learning_rate?)" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()
