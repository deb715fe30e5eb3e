"""hf_align: LLM alignment trainers as `transformers.Trainer` subclasses, drop-in for TRL's."""

from .config import AlignConfig
from .data import DataError
from .evaluate import EvaluationCallback
from .trainer import AlignTrainer
from .preference import DataCollatorForPreference
from .trainers.dpo import DPOConfig, DPOTrainer
from .trainers.grpo import GRPOConfig, GRPOTrainer
from .trainers.rloo import RLOOConfig, RLOOTrainer
from .trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from .trainers.remax import ReMaxConfig, ReMaxTrainer
from .trainers.reinforce import ReinforceConfig, ReinforcePPConfig, ReinforcePPTrainer, ReinforceTrainer
from .trainers.decoupled_gdpo import GDPOConfig, GDPOTrainer
from .trainers.ppo import PPOConfig, PPOTrainer
from .trainers.trpo import TRPOConfig, TRPOTrainer
from .trainers.gdpo import DataCollatorForBeliefPreference, DistributionalGDPOConfig, DistributionalGDPOTrainer
from .trainers.ipo import IPOConfig, IPOTrainer
from .trainers.kto import DataCollatorForUnpairedPreference, KTOConfig, KTOTrainer
from .trainers.reward import DataCollatorForRewardPairs, RewardConfig, RewardTrainer
from .trainers.sft import DataCollatorForLanguageModeling, SFTConfig, SFTTrainer
from .trainers.cpo import CPOConfig, CPOTrainer
from .trainers.orpo import ORPOConfig, ORPOTrainer
from .trainers.simpo import SimPOConfig, SimPOTrainer
from .trainers.spin import SPINConfig, SPINTrainer
from .trainers.step_dpo import StepDPOConfig, StepDPOTrainer

__version__ = "0.1.0"

__all__ = [
    "AlignConfig",
    "Recommendation", "recommend",
    "AlignTrainer",
    "DataCollatorForPreference",
    "DataError",
    "EvaluationCallback",
    "DPOConfig",
    "DPOTrainer",
    "DataCollatorForBeliefPreference", "DistributionalGDPOConfig", "DistributionalGDPOTrainer",
    "GRPOConfig", "GRPOTrainer",
    "RLOOConfig", "RLOOTrainer",
    "OnlineDPOConfig", "OnlineDPOTrainer",
    "ReMaxConfig", "ReMaxTrainer",
    "ReinforceConfig", "ReinforceTrainer", "ReinforcePPConfig", "ReinforcePPTrainer",
    "GDPOConfig", "GDPOTrainer",
    "PPOConfig", "PPOTrainer",
    "TRPOConfig", "TRPOTrainer",
    "IPOConfig",
    "IPOTrainer",
    "DataCollatorForUnpairedPreference", "KTOConfig", "KTOTrainer",
    "DataCollatorForRewardPairs", "RewardConfig", "RewardTrainer",
    "DataCollatorForLanguageModeling", "SFTConfig", "SFTTrainer",
    "CPOConfig", "CPOTrainer",
    "ORPOConfig", "ORPOTrainer",
    "SimPOConfig", "SimPOTrainer",
    "SPINConfig", "SPINTrainer",
    "StepDPOConfig", "StepDPOTrainer",
]


def __getattr__(name: str):
    # The advisor is imported on first use, so that `python -m hf_align.advisor` runs it once (as __main__).
    if name in ("Recommendation", "recommend"):
        from . import advisor

        return getattr(advisor, name)
    raise AttributeError(f"module 'hf_align' has no attribute {name!r}")
