"""hf_align: LLM alignment trainers as `transformers.Trainer` subclasses, drop-in for TRL's.

The public names are imported on first access (PEP 562 `__getattr__`): `import hf_align` and `hf-align --help` stay
fast and print nothing, while `from hf_align import DPOTrainer` imports torch, transformers and the DPO trainer only
then. The advisor is lazy for a second reason: `python -m hf_align.advisor` must run it once (as __main__).
"""

from __future__ import annotations

import importlib

# The single source of the version: setup.cfg reads it (`version = attr: hf_align.__version__`) without importing
# the package, so this stays a literal.
__version__ = "0.1.0"

# Public name -> the submodule (relative to hf_align) that defines it.
_PUBLIC_NAMES = {
    "AlignConfig": ".config",
    "DataError": ".data",
    "EvaluationCallback": ".evaluate",
    "AlignTrainer": ".trainer",
    "DataCollatorForPreference": ".preference",
    "Recommendation": ".advisor",
    "recommend": ".advisor",
    "DPOConfig": ".trainers.dpo",
    "DPOTrainer": ".trainers.dpo",
    "GRPOConfig": ".trainers.grpo",
    "GRPOTrainer": ".trainers.grpo",
    "RLOOConfig": ".trainers.rloo",
    "RLOOTrainer": ".trainers.rloo",
    "OnlineDPOConfig": ".trainers.online_dpo",
    "OnlineDPOTrainer": ".trainers.online_dpo",
    "ReMaxConfig": ".trainers.remax",
    "ReMaxTrainer": ".trainers.remax",
    "ReinforceConfig": ".trainers.reinforce",
    "ReinforceTrainer": ".trainers.reinforce",
    "ReinforcePPConfig": ".trainers.reinforce",
    "ReinforcePPTrainer": ".trainers.reinforce",
    "GDPOConfig": ".trainers.decoupled_gdpo",
    "GDPOTrainer": ".trainers.decoupled_gdpo",
    "PPOConfig": ".trainers.ppo",
    "PPOTrainer": ".trainers.ppo",
    "TRPOConfig": ".trainers.trpo",
    "TRPOTrainer": ".trainers.trpo",
    "DataCollatorForBeliefPreference": ".trainers.distributional_gdpo",
    "DistributionalGDPOConfig": ".trainers.distributional_gdpo",
    "DistributionalGDPOTrainer": ".trainers.distributional_gdpo",
    "IPOConfig": ".trainers.ipo",
    "IPOTrainer": ".trainers.ipo",
    "DataCollatorForUnpairedPreference": ".trainers.kto",
    "KTOConfig": ".trainers.kto",
    "KTOTrainer": ".trainers.kto",
    "DataCollatorForRewardPairs": ".trainers.reward",
    "RewardConfig": ".trainers.reward",
    "RewardTrainer": ".trainers.reward",
    "DataCollatorForLanguageModeling": ".trainers.sft",
    "SFTConfig": ".trainers.sft",
    "SFTTrainer": ".trainers.sft",
    "CPOConfig": ".trainers.cpo",
    "CPOTrainer": ".trainers.cpo",
    "ORPOConfig": ".trainers.orpo",
    "ORPOTrainer": ".trainers.orpo",
    "SimPOConfig": ".trainers.simpo",
    "SimPOTrainer": ".trainers.simpo",
    "SPINConfig": ".trainers.spin",
    "SPINTrainer": ".trainers.spin",
    "StepDPOConfig": ".trainers.step_dpo",
    "StepDPOTrainer": ".trainers.step_dpo",
}

__all__ = list(_PUBLIC_NAMES)


def __getattr__(name: str):
    if name not in _PUBLIC_NAMES:
        raise AttributeError(f"module 'hf_align' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC_NAMES[name], __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC_NAMES))
