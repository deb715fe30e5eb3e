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


def belief_log_distribution(belief_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's belief distribution in distributional GDPO (arXiv 2412.20299): over each row's candidate beliefs
    `b_1..b_K`, `log q(b_k|x) = log π(b_k|x) - log Σ_j π(b_j|x)`, where `log π(b_k|x)` is the summed log-prob of the
    belief's tokens after the prompt. `belief_logps` `[B, K]`; `mask` `[B, K]` bool, False past a row's own K
    candidates (rows may have different counts). Returns `[B, K]`, `-inf` where `mask` is False."""
    return torch.log_softmax(belief_logps.masked_fill(~mask, float("-inf")), dim=-1)


def belief_calibration_kl(belief_logps: torch.Tensor, group_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Distributional GDPO's belief calibration term (arXiv 2412.20299): the KL divergence from the group's belief
    distribution `p*(·|x)` to the model's, `KL(p* ‖ q) = Σ_k p*_k (log p*_k - log q(b_k|x))` with `q` from
    `belief_log_distribution` and `0 · log 0 = 0`.

    The authors' code scores single-token option ids under the full-vocabulary softmax and does not renormalise over
    the options (its term is this KL minus `log Σ_k π(b_k|x)`). Here a belief is a string of any length, `q` is
    normalised over the candidates, and the probability mass outside them is the job of the chosen belief's NLL
    (`sequence_mean_nll`). `belief_logps`, `group_probs` (rows sum to 1, 0 past a row's K) and `mask` are
    `[B, K]`; returns `[B]`."""
    log_q = belief_log_distribution(belief_logps, mask).masked_fill(~mask, 0.0)
    group_probs = group_probs.masked_fill(~mask, 0.0)
    return (torch.xlogy(group_probs, group_probs) - group_probs * log_q).sum(-1)


def sequence_mean_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean negative log-likelihood, `-Σ_t mask · logp / Σ_t mask`: distributional GDPO's NLL of the
    chosen belief (arXiv 2412.20299; the authors' code averages over the belief's tokens). Inputs `[B, T]`; returns
    `[B]`."""
    return -(token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)


LN2 = 0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - e^x)` for `x <= 0`, without cancellation (Mächler 2012): `log(-expm1(x))` for `x > -ln 2`,
    `log1p(-exp(x))` otherwise. Each branch only ever sees inputs from its own side of `-ln 2`, so neither yields an
    inf that would turn the other's gradient into NaN (`torch.where` backpropagates through both). `x = 0` gives
    `-inf`. Any shape; returns the same shape."""
    near_zero = x > -LN2
    return torch.where(
        near_zero, torch.log(-torch.expm1(x.clamp(min=-LN2))), torch.log1p(-torch.exp(x.clamp(max=-LN2)))
    )


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's log-odds of a completion (arXiv 2403.07691, eq. 4): `log(P / (1 - P)) = ℓ - log(1 - e^ℓ)` with
    `P = e^ℓ` and `ℓ` the completion's mean token log-prob. `ℓ` is capped just below 0 (at `-finfo.tiny`): an
    exactly certain completion (ℓ = 0, reachable in float32) has infinite odds, for which TRL returns inf or NaN;
    the cap keeps the value finite (≈ 87 in float32) and passes no gradient there. `avg_logps`: `[B]`; returns `[B]`."""
    ell = avg_logps.clamp(max=-torch.finfo(avg_logps.dtype).tiny)
    return ell - log1mexp(ell)


def orpo_odds_ratio_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's odds-ratio term (arXiv 2403.07691, eq. 7): `-log σ(logodds(yw) - logodds(yl))`, with `logodds` from
    mean token log-probs (`log_odds`). Inputs `[B]`; returns `[B]`."""
    return -F.logsigmoid(log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps))


def orpo_loss(
    chosen_nll: torch.Tensor, chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, lam: float
) -> torch.Tensor:
    """ORPO (arXiv 2403.07691, eq. 6): `NLL(yw) + λ · mean_B[-log σ(logodds(yw) - logodds(yl))]`.

    `chosen_nll` is a scalar: TRL's (and the authors' default) token mean of the NLL over every non-pad token of the
    chosen sequences of the batch, prompt included (`masked_nll`). `chosen_avg_logps`, `rejected_avg_logps`: `[B]`
    mean log-probs over completion tokens. Returns a scalar (the batch is already reduced by the NLL)."""
    return chosen_nll + lam * orpo_odds_ratio_loss(chosen_avg_logps, rejected_avg_logps).mean()


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO (arXiv 2405.14734, eq. 6): `-log σ(β·ℓ(yw) - β·ℓ(yl) - γ)`, `ℓ` the mean token log-prob of the completion
    (no reference model). Written as TRL's CPO (`loss_type="simpo"`) computes it: `h = ℓ(yw) - ℓ(yl) - γ/β`, loss
    `-log σ(βh)`, the same number. With label smoothing ε: `-(1-ε) log σ(βh) - ε log σ(-βh)` (TRL's CPO and the
    SimPO authors' code). Inputs `[B]`; returns `[B]`."""
    h = chosen_avg_logps - rejected_avg_logps - gamma / beta
    return dpo_sigmoid_loss(h, beta, label_smoothing)


def kto_loss(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Kahneman–Tversky Optimization, Ethayarajh et al., arXiv 2402.01306, eq. 7): with `r = logp(y|x) - ref(y|x)`
    (`logratios`, `[B]`) and the reference point `z0` (a detached scalar; the trainer estimates it as
    `max(0, mean logp(y'|x) - ref(y'|x))` over mismatched pairs), a desirable example (`desirable` `[B]` bool) costs
    `λD (1 - σ(β (r - z0)))` and an undesirable one `λU (1 - σ(β (z0 - r)))`. With `z0 = 0` this is APO-zero's
    unpaired loss (arXiv 2408.06266, TRL's `apo_zero_unpaired`). Returns `[B]` in the input order; TRL's loss is
    their plain mean over the batch (weights are not renormalised), which stays finite when a batch holds only one
    kind of example."""
    z = beta * (logratios - reference_point)
    return torch.where(
        desirable, desirable_weight * (1 - torch.sigmoid(z)), undesirable_weight * (1 - torch.sigmoid(-z))
    )
