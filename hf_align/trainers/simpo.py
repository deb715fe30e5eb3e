"""SimPO: Simple Preference Optimization with a Reference-Free Reward (Meng et al., arXiv 2405.14734). The implicit
reward is the length-normalised log-likelihood `β · mean token log-prob`, pushed apart by a target margin γ; no
reference model is copied, loaded or kept beside the policy. TRL has no SimPO trainer of its own: this is `CPOTrainer`
(`trl.experimental.cpo.CPOTrainer`) with `loss_type="simpo"`, `cpo_alpha=0` and SimPO's β, same constructor, dataset
formats, token ids, loss and logged metric names."""

from __future__ import annotations

from dataclasses import dataclass, field

from .cpo import LOSS_TYPE_CHOICES, CPOConfig, CPOTrainer

SIMPO_CITATION = """@inproceedings{meng2024simpo,
    title     = {{SimPO: Simple Preference Optimization with a Reference-Free Reward}},
    author    = {Yu Meng and Mengzhou Xia and Danqi Chen},
    year      = 2024,
    booktitle = {Advances in Neural Information Processing Systems 37},
}"""


@dataclass
class SimPOConfig(CPOConfig):
    """`CPOConfig` with SimPO's defaults: `loss_type="simpo"`, `cpo_alpha=0` (no NLL term), β = 2.0 and γ = 0.5, values
    on SimPO's scale (the paper tunes both per model). TRL's CPOConfig defaults to β = 0.1, CPO's value, far below
    what length-normalised rewards need; its γ default is 0.5 as here. Every CPO field still applies (e.g. `alpha` for
    AlphaPO's reward shape)."""

    beta: float = field(default=2.0, metadata={"help": "β: scale of the reward β · mean token log-prob."})
    loss_type: str = field(
        default="simpo",
        metadata={"help": "simpo (SimPO), or CPO's sigmoid, hinge, ipo, alphapo.",
                  "choices": LOSS_TYPE_CHOICES},
    )
    cpo_alpha: float = field(default=0.0, metadata={"help": "Weight of an NLL term on the chosen completions (CPO's)."})


class SimPOTrainer(CPOTrainer):
    """Trains `model` on preference pairs with `-log σ(β·ℓ(yw) - β·ℓ(yl) - γ)`, `ℓ` the mean token log-prob of a
    completion (see `losses.simpo_loss`): `CPOTrainer` with `SimPOConfig`'s defaults."""

    config_class = SimPOConfig
    algorithm = "SimPO"
    paper = {"title": "SimPO: Simple Preference Optimization with a Reference-Free Reward", "id": "2405.14734",
             "citation": SIMPO_CITATION}
