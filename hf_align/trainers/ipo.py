"""IPO: Identity Preference Optimisation (Azar et al., arXiv 2310.12036) — DPO's data, collator and reference
handling with the squared loss `(h̄ - 1/(2τ))²` on length-normalised log-ratios (see `losses.ipo_loss`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .dpo import DPOConfig, DPOTrainer

IPO_CITATION = """@inproceedings{azar2024general,
    title     = {{A General Theoretical Paradigm to Understand Learning from Human Preferences}},
    author    = {Mohammad Gheshlaghi Azar and Zhaohan Daniel Guo and Bilal Piot and R{\\'e}mi Munos and Mark Rowland and Michal Valko and Daniele Calandriello},
    year      = 2024,
    booktitle = {International Conference on Artificial Intelligence and Statistics},
}"""


@dataclass
class IPOConfig(DPOConfig):
    """`DPOConfig` with IPO's defaults: `loss_type="ipo"` and τ = `beta` = 0.5, a target margin of one nat per
    token between chosen and rejected (DPO's β = 0.1 would ask for five)."""

    beta: float = field(default=0.5, metadata={"help": "τ, IPO's regulariser; the target margin is 1/(2τ)."})
    loss_type: list[str] = field(default_factory=lambda: ["ipo"], metadata={"help": "IPO loss."})


class IPOTrainer(DPOTrainer):
    """`DPOTrainer` with `IPOConfig` defaults."""

    config_class = IPOConfig
    algorithm = "IPO"
    paper = {"title": "A General Theoretical Paradigm to Understand Learning from Human Preferences",
             "id": "2310.12036", "citation": IPO_CITATION}
