"""hf_align: LLM alignment trainers as `transformers.Trainer` subclasses, drop-in for TRL's."""

from .config import AlignConfig
from .data import DataError
from .trainer import AlignTrainer
from .preference import DataCollatorForPreference
from .trainers.dpo import DPOConfig, DPOTrainer
from .trainers.ipo import IPOConfig, IPOTrainer
from .trainers.reward import DataCollatorForRewardPairs, RewardConfig, RewardTrainer
from .trainers.sft import DataCollatorForLanguageModeling, SFTConfig, SFTTrainer

__version__ = "0.1.0"

__all__ = [
    "AlignConfig",
    "AlignTrainer",
    "DataCollatorForPreference",
    "DataError",
    "DPOConfig",
    "DPOTrainer",
    "IPOConfig",
    "IPOTrainer",
    "DataCollatorForRewardPairs", "RewardConfig", "RewardTrainer",
    "DataCollatorForLanguageModeling", "SFTConfig", "SFTTrainer",
]
