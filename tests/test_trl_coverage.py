"""Every field of TRL's Configs and every argument of TRL's trainer constructors exists in hf_align, read from the
installed TRL at test time: a TRL upgrade that adds one fails here, naming it.

Defaults equal TRL's except the deliberate differences in `DELIBERATE_DEFAULTS` (each in docs/migration.md's "Where hf_align
deliberately differs from TRL" list). Constructors take TRL's arguments in TRL's order; hf_align's own extra
arguments (e.g. `quantization_config`, `judge`) come after TRL's."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

import hf_align

trl = pytest.importorskip("trl")

# TRL's (module, Config, Trainer) -> hf_align's (Config, Trainer)
PAIRS = {
    ("trl", "SFTConfig", "SFTTrainer"): ("SFTConfig", "SFTTrainer"),
    ("trl", "RewardConfig", "RewardTrainer"): ("RewardConfig", "RewardTrainer"),
    ("trl", "DPOConfig", "DPOTrainer"): ("DPOConfig", "DPOTrainer"),
    ("trl", "KTOConfig", "KTOTrainer"): ("KTOConfig", "KTOTrainer"),
    ("trl", "GRPOConfig", "GRPOTrainer"): ("GRPOConfig", "GRPOTrainer"),
    ("trl", "RLOOConfig", "RLOOTrainer"): ("RLOOConfig", "RLOOTrainer"),
    ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"): ("CPOConfig", "CPOTrainer"),
    ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"): ("ORPOConfig", "ORPOTrainer"),
    ("trl.experimental.online_dpo", "OnlineDPOConfig", "OnlineDPOTrainer"): ("OnlineDPOConfig", "OnlineDPOTrainer"),
}
IDS = [trl_names[1] for trl_names in PAIRS]

# (TRL Config or "*", field) -> why hf_align's default differs
DELIBERATE_DEFAULTS = {
    ("*", "bf16"): "precision='auto' picks fp32 on a CPU, bf16 on a CUDA device that supports it",
    ("*", "gradient_checkpointing"): "transformers' default (off): TRL's on costs ~20% speed a small run does not need",
    ("*", "remove_unused_columns"): "the trainer keeps the columns its collator reads",
    ("GRPOConfig", "disable_dropout"): "dropout would make old, new and reference log-probs differ by noise",
    ("RLOOConfig", "disable_dropout"): "as GRPO",
    ("OnlineDPOConfig", "per_device_train_batch_size"): "counts completions (two per prompt), TRL's 8 prompts",
    ("OnlineDPOConfig", "per_device_eval_batch_size"): "as per_device_train_batch_size",
}


def _trl_classes(trl_names):
    module = importlib.import_module(trl_names[0])
    return getattr(module, trl_names[1]), getattr(module, trl_names[2])


def _ours(names):
    return getattr(hf_align, names[0], None), getattr(hf_align, names[1], None)


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize("trl_names, names", PAIRS.items(), ids=IDS)
def test_every_trl_config_field_exists_with_trls_default(trl_names, names):
    trl_config, _ = _trl_classes(trl_names)
    config, _ = _ours(names)
    assert config is not None, f"hf_align has no {names[0]}"
    ours = {field.name: field for field in dataclasses.fields(config)}
    missing = [field.name for field in dataclasses.fields(trl_config) if field.name not in ours]
    assert not missing, f"{names[0]} lacks TRL's {trl_names[1]} fields {missing}"
    differing = [
        (field.name, _default(field), _default(ours[field.name]))
        for field in dataclasses.fields(trl_config)
        if _default(field) != _default(ours[field.name])
        and ("*", field.name) not in DELIBERATE_DEFAULTS and (trl_names[1], field.name) not in DELIBERATE_DEFAULTS
    ]
    assert not differing, f"{names[0]} defaults differ from TRL's (field, TRL, ours): {differing}"


@pytest.mark.parametrize("trl_names, names", PAIRS.items(), ids=IDS)
def test_every_trl_constructor_argument_exists_in_trls_order(trl_names, names):
    _, trl_trainer = _trl_classes(trl_names)
    _, trainer = _ours(names)
    assert trainer is not None, f"hf_align has no {names[1]}"
    theirs = list(inspect.signature(trl_trainer.__init__).parameters)[1:]
    ours = list(inspect.signature(trainer.__init__).parameters)[1:]
    missing = [name for name in theirs if name not in ours]
    assert not missing, f"{names[1]} lacks TRL's constructor arguments {missing}"
    assert ours[: len(theirs)] == theirs, f"{names[1]}'s arguments are not in TRL's order: {ours} vs TRL's {theirs}"


def test_deliberate_default_differences_are_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "docs" / "migration.md").read_text()
    section = readme.split("Where hf_align deliberately differs from TRL")[1]
    for _, name in DELIBERATE_DEFAULTS:
        assert f"`{name}" in section, f"README does not explain the default of `{name}`"
