"""A YAML config written for `trl <algorithm> --config FILE` runs unchanged with `hf-align <algorithm> --config FILE`:
TRL's field names (ScriptArguments, ModelConfig, the Config), its `env:` block and its `datasets:` mixtures. TRL's
installed package ships no such configs (only accelerate ones), so these follow TRL's documented format, pointed at
the embedded tiny model and data written to local files so that they run offline."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from hf_align import cli, defaults
from hf_align.recipes import run_recipe

# The embedded dataset each algorithm's rows come from (written to a local JSONL file, as a user's data would be).
DATASETS = {
    "sft": "sft", "reward": "preference", "dpo": "preference", "kto": "unpaired_preference", "grpo": "comparisons",
    "rloo": "comparisons",
}
ONLINE = {"num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 4}


def write_jsonl(path, name: str, rows: int) -> str:
    data = defaults.load_default_dataset(name).select(range(rows))
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return str(path)


def trl_config(tmp_path, algorithm: str, model: str) -> dict:
    """A config in the format of TRL's documentation (`trl dpo --config dpo.yaml`)."""
    return {
        "model_name_or_path": model,
        "model_revision": "main",
        "dtype": "float32",
        "attn_implementation": "eager",
        "dataset_name": write_jsonl(tmp_path / "train.jsonl", DATASETS[algorithm], 8),
        "dataset_test_split": "test",  # absent from a one-file dataset: no evaluation
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_task_type": "SEQ_CLS" if algorithm == "reward" else "CAUSAL_LM",
        "use_rslora": True,
        "learning_rate": 1e-3,
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "output_dir": str(tmp_path / "out"),
        "env": {"HF_ALIGN_TEST_FROM_YAML": algorithm},
        **(ONLINE if algorithm in ("grpo", "rloo") else {}),
    }


@pytest.mark.parametrize("algorithm", sorted(DATASETS))
def test_trl_yaml_runs_unchanged(algorithm, tmp_path, monkeypatch, tiny_model_path, tiny_seqcls_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_ALIGN_TEST_FROM_YAML", raising=False)
    model = tiny_seqcls_path if algorithm == "reward" else tiny_model_path
    config = tmp_path / f"{algorithm}.yaml"
    config.write_text(yaml.safe_dump(trl_config(tmp_path, algorithm, model)))

    assert cli.main([algorithm, "--config", str(config)]) == 0

    assert os.environ["HF_ALIGN_TEST_FROM_YAML"] == algorithm  # the env: block is exported
    out = tmp_path / "out"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["use_rslora"] and adapter["task_type"] == (
        "SEQ_CLS" if algorithm == "reward" else "CAUSAL_LM")
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.max_steps == 1 and args.learning_rate == 1e-3
    assert args.model_init_kwargs["attn_implementation"] == "eager"


def test_datasets_mixture_and_command_line_override(tmp_path, monkeypatch, tiny_model_path):
    """TRL's `datasets:` list (loaded by TRL's `get_dataset`) takes precedence over `dataset_name`; a flag beats the
    file."""
    monkeypatch.chdir(tmp_path)
    first = write_jsonl(tmp_path / "a.jsonl", "preference", 6)
    second = write_jsonl(tmp_path / "b.jsonl", "preference", 4)
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": tiny_model_path,
        "dataset_name": "ignored/when-datasets-are-given",
        "datasets": [{"path": "json", "data_files": first}, {"path": "json", "data_files": second}],
        "max_steps": 5, "per_device_train_batch_size": 2, "report_to": "none", "save_strategy": "no",
        "eval_strategy": "no", "output_dir": str(tmp_path / "out"),
    }))
    trainer = run_recipe("dpo", ["--config", str(config), "--max_steps", "1"])
    assert len(trainer.train_dataset) == 10 and trainer.state.global_step == 1


def test_embedded_defaults_yield_to_the_file(tmp_path, monkeypatch):
    """With the embedded model, the recipe's values stand in for TRL's defaults, but the file's values win."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"learning_rate": 3e-3, "max_steps": 1, "report_to": "none",
                                      "save_strategy": "no", "eval_strategy": "no",
                                      "output_dir": str(tmp_path / "out")}))
    trainer = run_recipe("sft", ["--config", str(config)])
    assert trainer.args.learning_rate == 3e-3  # the file's (the sft recipe's embedded value is 2e-3)
    assert trainer.args.per_device_train_batch_size == 8  # the recipe's embedded value (TRL's default is 8 too)
    assert trainer.args.logging_steps == 10  # the recipe's embedded value, not TrainingArguments' 500
