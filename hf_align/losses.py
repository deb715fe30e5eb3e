"""Alignment objectives as pure functions of tensors.

Notation: `logp(y)` is the summed log-probability of completion `y` under the policy, `ref(y)` under the reference,
`yw`/`yl` the chosen/rejected completions, `σ` the sigmoid. Every function returns one loss per example (shape `[B]`)
so trainers choose the reduction; TRL reduces by the batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_logit(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> torch.Tensor:
    """`h = [logp(yw) - ref(yw)] - [logp(yl) - ref(yl)]`, each input `[B]`."""
    return chosen_logratios - rejected_logratios


def dpo_sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (arXiv 2305.18290, eq. 7): `-log σ(β h)`.

    With label smoothing ε > 0 this is conservative DPO (cDPO, Mitchell 2023): `-(1-ε) log σ(βh) - ε log σ(-βh)`,
    the expected loss when each label is flipped with probability ε. TRL 1.16 ignores `label_smoothing` for
    `loss_type="sigmoid"`; hf_align applies it, as older TRL releases and the cDPO note do.
    `h`: `[B]`; returns `[B]`."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def dpo_hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Hinge DPO (SLiC, arXiv 2305.10425, with β = 1/δ): `relu(1 - β h)`. `h`: `[B]`; returns `[B]`."""
    return torch.relu(1 - beta * h)


def dpo_robust_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (arXiv 2403.00409, eq. 7), unbiased under label flips with rate ε < 1/2:
    `[(1-ε)(-log σ(βh)) + ε log σ(-βh)] / (1 - 2ε)`. `h`: `[B]`; returns `[B]`."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def ipo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO (arXiv 2310.12036, eq. 17) with regulariser τ = `beta`: `(h̄ - 1/(2τ))²`, where `h̄` uses log-ratios
    divided by their completion's token count (TRL's form, confirmed with the IPO authors; OpenRLHF uses sums).
    Inputs `[B]`; returns `[B]`."""
    h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def dpo_loss(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss `[B]` of the DPO family member `loss_type` (one of `DPO_LOSS_TYPES`)."""
    h = dpo_logit(chosen_logratios, rejected_logratios)
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(h, beta, label_smoothing)
    if loss_type == "hinge":
        return dpo_hinge_loss(h, beta)
    if loss_type == "robust":
        return dpo_robust_loss(h, beta, label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta)
    raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}.")


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Reward-model loss (Bradley–Terry; InstructGPT arXiv 2203.02155 eq. 1; margin as in Llama 2, arXiv 2307.09288):
    `-log σ(r(yw) - r(yl) - m)`, plus `c · (r(yw) + r(yl))²` when centering with coefficient `c` (arXiv 2312.09244
    eq. 2, TRL's `center_rewards_coefficient`). The batch mean of this is TRL's loss,
    `mean(-log σ(rw - rl - m)) + c · mean((rw + rl)²)`. Inputs `[B]`; returns `[B]`."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return loss


def masked_nll(
    token_logps: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor | int | None = None
) -> torch.Tensor:
    """SFT loss: negative log-likelihood of the tokens where `mask` is 1, `-Σ mask · logp / N`. `N` is `mask.sum()`
    (the token mean over all rows together, as `CrossEntropyLoss` with ignored labels), or `num_tokens` when given:
    the count over a whole gradient-accumulation step on every process, so that the micro-batch losses add up to the
    token mean of the step (transformers' and TRL's normalisation). Inputs `[B, T]`; returns a scalar."""
    count = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=token_logps.device)
    return -(token_logps * mask).sum() / count.clamp(min=1)
