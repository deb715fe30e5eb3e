"""Alignment objectives as pure functions of tensors.

Notation: `logp(y)` is the summed log-probability of completion `y` under the policy, `ref(y)` under the reference,
`yw`/`yl` the chosen/rejected completions, `σ` the sigmoid. Every function returns one loss per example (shape `[B]`)
so trainers choose the reduction; TRL reduces by the batch mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dpo_logit(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> torch.Tensor:
    """`h = [logp(yw) - ref(yw)] - [logp(yl) - ref(yl)]`, each input `[B]`."""
    return chosen_logratios - rejected_logratios


F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(
    logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5
) -> torch.Tensor:
    """f-DPO (arXiv 2309.16240, Theorem 1): with the regulariser `β D_f(π ‖ π_ref)` in place of DPO's reverse KL, the
    implicit reward of `y` is `β f'(u)`, `u = π(y)/π_ref(y) = e^r`, `r` = `logratios`. Returns `f'(u) - f'(1)` (0 where
    the policy is the reference; the constant cancels in `h` but not once IPO divides by lengths), as TRL 1.16:

    - `reverse_kl` (DPO), `f(u) = u log u`: `r`;
    - `forward_kl`, `f(u) = -log u`: `1 - e^-r`;
    - `js_divergence` (Jensen–Shannon): `log 2 + log σ(r)`;
    - `alpha_divergence`: `(e^((a-1) r) - 1) / (a - 1)`, `a` = `alpha` (TRL's `f_alpha_divergence_coef`; it is the
      paper's α-divergence with α = 1 - a, the same at the default a = 0.5), `r` when `|a - 1| < 1e-6` (its limit).
      `(a-1) r` is capped at 80 so that the exponential stays finite in float32.

    Feed `chosen - rejected` of these scores to the DPO losses in place of `h`. `logratios`: any shape; returns the
    same shape."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return LN2 + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        exponent = ((alpha - 1.0) * logratios).to(torch.promote_types(logratios.dtype, torch.float32))
        return (torch.expm1(exponent.clamp(max=80.0)) / (alpha - 1.0)).to(logratios.dtype)
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}.")


def length_normalized_logit(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """`h̄ = s(yw)/|yw| - s(yl)/|yl|`: the DPO logit with each completion's score (log-ratio) divided by its token
    count (at least 1). Inputs `[B]`; returns `[B]`."""
    return chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)


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
    divided by their completion's token count (`length_normalized_logit`; TRL's form, confirmed with the IPO authors;
    OpenRLHF uses sums). Inputs `[B]`; returns `[B]`."""
    h = length_normalized_logit(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths)
    return (h - 1 / (2 * beta)) ** 2


def exo_pair_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO for pairs (arXiv 2402.00856, eq. 16): the reverse KL from the policy's preference distribution over the
    pair, `q = softmax(β r) = [σ(βh), σ(-βh)]`, to the smoothed labels `p = [1-ε, ε]`:
    `σ(βh) [log σ(βh) - log(1-ε)] + σ(-βh) [log σ(-βh) - log ε]`, 0 < ε < 1 (the paper suggests ε = 1e-3).
    `h`: `[B]`; returns `[B]`."""
    log_q_chosen, log_q_rejected = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
    return (torch.exp(log_q_chosen) * (log_q_chosen - math.log1p(-label_smoothing))
            + torch.exp(log_q_rejected) * (log_q_rejected - math.log(label_smoothing)))


def nca_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA for pairs (arXiv 2402.05369, the NCA loss with K = 2 responses): with rewards `r = β · logratio`,
    `-log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l)`: it raises the chosen reward in absolute terms, not only relative to
    the rejected one. Inputs `[B]`; returns `[B]`."""
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def bco_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """BCO for pairs (arXiv 2404.04656): a binary classifier on the implicit rewards `r = β · logratio`, chosen
    labelled 1 and rejected 0: `-log σ(r_w) - log σ(-r_l)`. The paper shifts the rewards by δ, a running mean of the
    rewards; TRL 1.16's `bco_pair` has no shift (nor any state), and neither has this. Inputs `[B]`; returns `[B]`."""
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard preference probabilities (arXiv 2405.00675, eq. 4.7 with P(yw ≻ π) = 1, P(yl ≻ π) = 0, η = 1/β):
    `(r_w - 1/(2β))² + (r_l + 1/(2β))²`, `r` the log-ratios. Inputs `[B]`; returns `[B]`."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def aot_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, alignment via optimal transport (arXiv 2406.05882): first-order stochastic dominance of one distribution
    over another, enforced by the cDPO loss (`dpo_sigmoid_loss`) on their sorted samples, `Δ = sort(chosen) -
    sort(rejected)` over the batch. Paired AOT (`aot`): `chosen` the policy's margins `logp(yw) - logp(yl)`,
    `rejected` the reference's `ref(yw) - ref(yl)`; unpaired (`aot_unpaired`): the chosen and the rejected
    log-ratios. Inputs `[B]`; returns `[B]`, one loss per rank (not per input pair)."""
    delta = torch.sort(chosen).values - torch.sort(rejected).values
    return dpo_sigmoid_loss(delta, beta, label_smoothing)


def apo_zero_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero (anchored preference optimisation, arXiv 2408.06266, eq. 7), for chosen completions better than the
    policy's own: `[1 - σ(β r_w)] + σ(β r_l)` raises the chosen likelihood and lowers the rejected one, each against
    the reference. Inputs `[B]`; returns `[B]`."""
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down (arXiv 2408.06266, eq. 8), for chosen completions worse than the policy's own:
    `σ(β r_w) + [1 - σ(β (r_w - r_l))]` lowers both likelihoods, the rejected one more. Inputs `[B]`; returns `[B]`."""
    return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))


def discopop_loss(h: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP, the log-ratio modulated loss (arXiv 2406.08414, eq. 5): with `z = β h` and `m = σ(z/τ)`,
    `(1 - m) (-log σ(z)) + m e^-z`, a blend of the logistic (DPO) and exponential losses. `m e^-z` is computed as
    `exp(log σ(z/τ) - z)`: a very negative `z` gives 0 there, not 0 · inf = NaN as the product form (TRL's) does.
    `h`: `[B]`; returns `[B]`."""
    z = beta * h
    modulation = torch.sigmoid(z / tau)
    return -(1 - modulation) * F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)


def length_desensitized_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's completion log-probs (length desensitisation, arXiv 2409.06411): the first `min(|yw|, |yl|)` completion tokens of a
    pair count fully, the longer completion's remaining ("verbose") ones with weight α:
    `logp(y) = Σ_{k ≤ min} logp(y_k) + α Σ_{k > min} logp(y_k)` (α = 1: the plain sum). Apply it to the policy and
    the reference alike. Token log-probs and masks (1 on completion tokens, in order) `[B, T]`; returns
    `(chosen, rejected)`, each `[B]`."""
    shared = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)

    def weighted_sum(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        position = mask.cumsum(-1)  # 1 on a completion's first token
        weight = torch.where(position <= shared, 1.0, alpha) * mask
        return (token_logps * weight).sum(-1)

    return weighted_sum(chosen_token_logps, chosen_mask), weighted_sum(rejected_token_logps, rejected_mask)


def wpo_weights(token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's weight of a completion (arXiv 2406.11827, eq. 2), its length-normalised probability under the policy
    with each token's probability divided by `Σ_v π(v|·)²` (the "aligned" sampling probability):
    `w(y) = exp(Σ_t mask · [logp(y_t) - log Σ_v π(v|·)²] / max(Σ_t mask, 1))`. A pair's loss is weighted by
    `w(yw) · w(yl)`, treated as a constant (pass detached inputs). `token_logps`, `log_sum_sq_probs`, `mask` `[N, T]`;
    returns `[N]`."""
    aligned = ((token_logps - log_sum_sq_probs) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return torch.exp(aligned)


DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# The losses of the chosen-minus-rejected score `h`, where f-DPO's partition term cancels: the only ones a non-default
# `f_divergence_type` generalises (TRL 1.16's list).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def dpo_loss(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    reference_margins: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """Per-pair loss `[B]` of the DPO family member `loss_type` (one of `DPO_LOSS_TYPES`), from the log-ratios `[B]`.

    The losses of `h` (`F_DIVERGENCE_LOSS_TYPES`) take it from the f-divergence scores (`f_divergence_scores`);
    `ipo` and `sigmoid_norm` (length-normalised DPO, as Tülu 3 trains, arXiv 2411.15124; cDPO with `label_smoothing`
    as `sigmoid`) need `chosen_lengths` / `rejected_lengths` `[B]` (completion token counts), `aot` the reference's
    margins `ref(yw) - ref(yl)` `[B]` (the policy's are `h` plus them), and `sft` the NLL of the chosen completions
    (a scalar, e.g. `masked_nll`; every pair gets it). `label_smoothing` is ε of cDPO (`sigmoid`, `sigmoid_norm`,
    `aot`, `aot_unpaired`), robust DPO and EXO."""

    def needed(value, name):
        if value is None:
            raise ValueError(f"DPO loss_type={loss_type!r} needs `{name}`.")
        return value

    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} has no f-divergence form: f_divergence_type must be 'reverse_kl'.")
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    h = dpo_logit(chosen_scores, rejected_scores)
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(h, beta, label_smoothing)
    if loss_type == "hinge":
        return dpo_hinge_loss(h, beta)
    if loss_type == "ipo":
        lengths = needed(chosen_lengths, "chosen_lengths"), needed(rejected_lengths, "rejected_lengths")
        return ipo_loss(chosen_scores, rejected_scores, *lengths, beta)
    if loss_type == "exo_pair":
        return exo_pair_loss(h, beta, label_smoothing)
    if loss_type == "nca_pair":
        return nca_pair_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "robust":
        return dpo_robust_loss(h, beta, label_smoothing)
    if loss_type == "bco_pair":
        return bco_pair_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "aot":
        reference = needed(reference_margins, "reference_margins")
        return aot_loss(h + reference, reference, beta, label_smoothing)
    if loss_type == "aot_unpaired":
        return aot_loss(chosen_logratios, rejected_logratios, beta, label_smoothing)
    if loss_type == "apo_zero":
        return apo_zero_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "apo_down":
        return apo_down_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "discopop":
        return discopop_loss(h, beta, discopop_tau)
    if loss_type == "sft":
        return needed(chosen_nll, "chosen_nll").expand_as(chosen_logratios)
    if loss_type == "sigmoid_norm":
        lengths = needed(chosen_lengths, "chosen_lengths"), needed(rejected_lengths, "rejected_lengths")
        return dpo_sigmoid_loss(length_normalized_logit(chosen_scores, rejected_scores, *lengths), beta,
                                label_smoothing)
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


def dft_loss(
    token_logps: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Dynamic Fine-Tuning (Wu et al., arXiv 2508.05629): each token's NLL weighted by its probability under the
    model, the weight held constant (no gradient through it): `-Σ mask · sg(p) · logp / N`, `p = exp(logp)`, `N` as in
    `masked_nll`. Inputs `[B, T]`; returns a scalar."""
    return masked_nll(token_logps * token_logps.detach().exp(), mask, num_tokens)


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


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
# The CPO loss types scored by each completion's mean token log-prob; the others take the sum (TRL's CPOTrainer).
CPO_MEAN_LOGP_LOSS_TYPES = ("ipo", "simpo")
# Only the logistic losses have a label-smoothed (conservative) form.
CPO_LABEL_SMOOTHING_LOSS_TYPES = ("sigmoid", "simpo")


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape (arXiv 2501.03884): `(1 - p^-α) / α` with `p = e^ℓ`, `ℓ` a completion's log-prob (the
    sum, or the token mean, as the loss type scores it); α = 0 is its limit, `ℓ` itself (SimPO's and CPO's reward).
    Computed as `-expm1(-α ℓ) / α`: TRL's CPOTrainer raises `e^ℓ` to `-α`, and `e^ℓ` underflows to 0 (the reward to
    -inf for α > 0) once a summed log-prob falls below about -103 in float32; the numbers agree where TRL's are
    finite. `logps`: any shape; returns the same shape."""
    if alpha == 0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def cpo_loss(
    loss_type: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> torch.Tensor:
    """The preference term of CPO (Contrastive Preference Optimization, arXiv 2401.08417, eq. 3 without its NLL term)
    and of the other loss types of TRL's CPOTrainer, reference-free: with `r = alphapo_reward(ℓ, alpha)` (`r = ℓ` at
    α = 0) and `h = r(yw) - r(yl)`,

    - `sigmoid` (CPO): `-(1-ε) log σ(βh) - ε log σ(-βh)`, ε = `label_smoothing` (cDPO);
    - `hinge` (SLiC, arXiv 2305.10425): `relu(1 - βh)`;
    - `ipo` (arXiv 2310.12036, eq. 17, β = τ): `(h - 1/(2β))²`;
    - `simpo` (arXiv 2405.14734, eq. 6; AlphaPO with α ≠ 0): `simpo_loss` on the rewards, margin γ = `simpo_gamma`.

    `ℓ` is each completion's summed log-prob for `sigmoid` and `hinge`, its mean token log-prob for the loss types in
    `CPO_MEAN_LOGP_LOSS_TYPES`, as TRL scores them. CPO's full objective adds `cpo_alpha · NLL(yw)` to the batch mean
    of this (`masked_nll` over the chosen completions' tokens). Label smoothing exists only for the logistic losses
    (`CPO_LABEL_SMOOTHING_LOSS_TYPES`; TRL ignores it for the others with a warning, here it is an error).
    `chosen_logps`, `rejected_logps`: `[B]`; returns `[B]`."""
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"Unknown CPO loss_type {loss_type!r}; expected one of {CPO_LOSS_TYPES}.")
    if label_smoothing and loss_type not in CPO_LABEL_SMOOTHING_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} has no label-smoothed form: label_smoothing must be 0.")
    chosen_rewards, rejected_rewards = alphapo_reward(chosen_logps, alpha), alphapo_reward(rejected_logps, alpha)
    if loss_type == "simpo":
        return simpo_loss(chosen_rewards, rejected_rewards, beta, simpo_gamma, label_smoothing)
    h = dpo_logit(chosen_rewards, rejected_rewards)
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(h, beta, label_smoothing)
    if loss_type == "hinge":
        return dpo_hinge_loss(h, beta)
    return (h - 1 / (2 * beta)) ** 2


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


# ======================================================================================================================
# Online policy-gradient family: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, ReMax, REINFORCE / REINFORCE++, reward-decoupled GDPO
# ======================================================================================================================
#
# Shapes: `N` completions = num_prompts · G, prompt-major (row `i·G + g` is completion `g` of prompt `i`); `T` completion
# length; `mask` `[N, T]` (bool or float) is 1 on the completion tokens that count. Values at masked positions must be
# finite: they are multiplied by 0, as TRL does. A reward of NaN means "unscorable" (every reward function returned
# None for that sample): it is left out of the group and batch statistics and its advantage is 0, as in TRL 1.16.

ADVANTAGE_EPS = 1e-4  # TRL 1.16 adds this to every reward / advantage standard deviation it divides by.
PG_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16's `loss_type`s
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_sum")
REWARD_SCALES = ("group", "batch", "none")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`Σ mask · values / max(Σ mask, 1)` over all elements (`dim=None`, a scalar) or along `dim`. A row with no
    masked-in element gives 0 (the `clamp(min=1)` TRL uses in its losses). `values`, `mask` broadcastable."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of the masked-in elements of `values` (all of them together; a scalar): `Σ mask (v - μ)² / n`, or
    `/ (n - 1)` with `unbiased=True` (0 when `n ≤ 1`), `μ = masked_mean(values, mask)`, `n = Σ mask`."""
    mask = mask.to(values.dtype)
    centred = (values - masked_mean(values, mask)) * mask
    count = mask.sum()
    denominator = (count - 1).clamp(min=1.0) if unbiased else count.clamp(min=1.0)
    return (centred**2).sum() / denominator


def masked_std(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """`sqrt(masked_var(values, mask, unbiased))`, a scalar."""
    return masked_var(values, mask, unbiased).sqrt()


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++'s advantage normalisation (arXiv 2501.03262, §3): whiten over the whole batch (every masked-in
    token of every row together, not per group), `(v - μ) / sqrt(σ² + eps)`; with `shift_mean=False` the mean is
    added back, `(v - μ) / sqrt(σ² + eps) + μ`. The variance is the biased (population) one by default, as
    OpenRLHF's REINFORCE++ uses (`unbiased=True` for Bessel's correction). Returns `[N, T]`, 0 at masked-out
    positions."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask, unbiased) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def nan_std(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (`/ (n - 1)`, `n` the count of non-NaN values);
    NaN where `n ≤ 1`. The same estimator as `trl.trainer.utils.nanstd`, which TRL 1.16 uses for every reward std."""
    if dim is None:
        std = nan_std(values.reshape(-1), dim=0)
        return std.reshape([1] * values.dim()) if keepdim else std
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    squares = torch.nansum((values - torch.nanmean(values, dim=dim, keepdim=True)) ** 2, dim=dim, keepdim=True)
    variance = torch.where(count > 1, squares / (count - 1).clamp(min=1), torch.full_like(squares, float("nan")))
    std = variance.sqrt()
    return std if keepdim else std.squeeze(dim)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[N]` → `[N / G, G]`, checking that `N` is a multiple of `G`."""
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"Expected a 1-D tensor of rewards whose length is a multiple of group_size={group_size}, got shape "
            f"{tuple(rewards.shape)}."
        )
    return rewards.view(-1, group_size)


def weighted_reward_sum(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reward of each completion with K reward functions (TRL's `sum_then_normalize` input):
    `r = Σ_k w_k r_k`, skipping functions that returned None (NaN) for that sample; NaN when all K did.
    `rewards_per_func` `[N, K]`, `weights` `[K]`; returns `[N]`."""
    rewards = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def _reward_std(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """The std TRL's GRPO divides by (`scale="group"` or `"batch"`) or checks for zero (`"none"`: the group std),
    broadcast to `[N]`."""
    grouped = _grouped(rewards, group_size)
    if scale in ("group", "none"):
        if group_size == 1:
            return torch.zeros_like(rewards)
        return nan_std(grouped, dim=1).repeat_interleave(group_size)
    if scale == "batch":
        return nan_std(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    raise ValueError(f"Unknown reward scale {scale!r}; expected one of {REWARD_SCALES}.")


def group_relative_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """GRPO's advantages (arXiv 2402.03300, §4.1.2): `A = (r - mean_g) / (σ + eps)`, `mean_g` the mean reward of the
    completion's group of `group_size` completions of the same prompt. `σ` is
    `scale="group"`: the group's std (GRPO); `"batch"`: the std of all N rewards while the mean stays per group
    (TRL's `scale_rewards="batch"`, PPO-Lite arXiv 2508.08221); `"none"`: no division, `A = r - mean_g`
    (Dr. GRPO, arXiv 2503.20783).

    TRL 1.16's arithmetic exactly: std with Bessel's correction (`/ (G - 1)`, `nan_std`), `eps = 1e-4` added to the
    std (not under a square root); a group whose rewards all tie gets `A = 0 / 1e-4 = 0`; G = 1 gives 0. NaN rewards
    are left out of the means and stds and get `A = 0` (so does a group with a single scorable completion, whose std
    is undefined). `rewards` `[N]`; returns `[N]`."""
    mean = torch.nanmean(_grouped(rewards, group_size), dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (_reward_std(rewards, group_size, scale) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def reward_std_is_zero(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """For TRL's `frac_reward_zero_std` metric (its mean): whether the std `group_relative_advantages` uses is 0
    (`torch.isclose` to 0), per completion, `[N]` bool. With `scale="group"` or `"none"` that is the group std, so the
    mean is the fraction of groups whose rewards all tie; with `scale="batch"` TRL checks the batch std (all True or
    all False). G = 1 counts as zero; an undefined std (a group with ≤ 1 scorable completion) does not. For RLOO use
    `scale="group"`; for reward-decoupled GDPO pass `decoupled_group_rewards(...)` with `scale="batch"`."""
    std = _reward_std(rewards, group_size, scale)
    return torch.isclose(std, torch.zeros_like(std))


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, buffer_length: int,
                          penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to each completion's reward: with
    `L_max = max_length`, `L_cache = buffer_length`, a completion of `|y|` tokens gets
    `0` if `|y| <= L_max - L_cache`; `((L_max - L_cache) - |y|) / L_cache` if `L_max - L_cache < |y| <= L_max`
    (from 0 down to -1 across the buffer); `-1` beyond `L_max`; all times `penalty_factor`. `lengths` `[N]` (any
    numeric dtype); returns `[N]` float."""
    lengths = lengths.float()
    expected = max_length - buffer_length
    penalty = ((expected - lengths) / buffer_length).clamp(min=-1.0, max=0.0)
    return penalty * penalty_factor


def leave_one_out_advantages(
    rewards: torch.Tensor, group_size: int, normalize: bool = False, eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """RLOO (arXiv 2402.14740, eq. 7; Kool et al. 2019): `A_i = r_i - (1/(G-1)) Σ_{j≠i} r_j` within each group.
    TRL 1.16's `RLOOTrainer` folds the KL penalty into `r` before this (`sequence_kl_penalised_rewards`). NaN
    rewards are left out of their siblings' baselines (the divisor is the group's scorable count - 1) and get A = 0,
    as does the only scorable completion of a group. `normalize=True` is TRL's `normalize_advantages`: then
    `(A - mean) / (std + eps)` over the whole batch, Bessel-corrected std, `eps = 1e-4`. `group_size` must be ≥ 2
    (TRL returns zeros for G = 1, which only its evaluation can reach). `rewards` `[N]`; returns `[N]`."""
    if group_size < 2:
        raise ValueError(f"Leave-one-out advantages need group_size >= 2 completions per prompt, got {group_size}.")
    grouped = _grouped(rewards, group_size)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
    advantages = rewards - baselines.reshape(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nan_std(advantages) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def sequence_kl_penalised_rewards(
    rewards: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """RLOO's KL-in-the-reward (arXiv 2402.14740, §2; TRL 1.16's `RLOOTrainer`): `r - β Σ_t mask (logp_t - ref_t)`,
    the sequence's summed first-order log-ratio (k1; it can be negative, unlike `k3_kl`), taken with the sampling
    policy's log-probs (TRL's `old_per_token_logps`). `rewards` `[N]`, `logps`/`ref_logps`/`mask` `[N, T]`;
    returns `[N]`."""
    return rewards - beta * ((logps - ref_logps) * mask.to(logps.dtype)).sum(-1)


def greedy_baseline_advantages(
    sample_rewards: torch.Tensor, greedy_rewards: torch.Tensor, group_size: int
) -> torch.Tensor:
    """ReMax (arXiv 2310.10505, Algorithm 1): `A = r(x, y_sampled) - r(x, y_greedy)`, the greedy decode of the same
    prompt as baseline. `sample_rewards` `[N]` (`group_size` samples per prompt, prompt-major), `greedy_rewards`
    `[N / group_size]`; returns `[N]` (0 where either reward is NaN)."""
    grouped = _grouped(sample_rewards, group_size)
    if greedy_rewards.shape != (grouped.shape[0],):
        raise ValueError(
            f"Expected one greedy reward per prompt, shape ({grouped.shape[0]},), got {tuple(greedy_rewards.shape)}."
        )
    return torch.nan_to_num(sample_rewards - greedy_rewards.repeat_interleave(group_size), nan=0.0)


def group_mean_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++-baseline (arXiv 2501.03262, §3.2): `r - mean_g`, the score minus the mean score of its prompt's
    group (NaN-aware, no division by the std; 0 for NaN scores). `scores` `[N]`; returns `[N]`."""
    mean = torch.nanmean(_grouped(scores, group_size), dim=1).repeat_interleave(group_size)
    return torch.nan_to_num(scores - mean, nan=0.0)


def kl_penalised_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    clip: float | tuple[float, float] | None = None,
) -> torch.Tensor:
    """REINFORCE++'s per-token reward (arXiv 2501.03262, eq. 1; as PPO-RLHF, arXiv 2203.02155): `r_t = -β KL_t` on
    every completion token, plus the sequence's score on its last completion token (the last position where `mask`
    is 1, i.e. EOS or the truncation point). `clip` bounds the score first: a float `c` clamps to `[-c, c]`, a pair
    to `[lo, hi]`. `scores` `[N]`, `kl` (any per-token estimate, e.g. `k3_kl` or `logp - ref`) and `mask` `[N, T]`;
    returns `[N, T]`, 0 at masked-out positions. A row with no completion token gets no score."""
    mask = mask.to(kl.dtype)
    if clip is not None:
        low, high = (-clip, clip) if isinstance(clip, (int, float)) else clip
        scores = scores.clamp(min=low, max=high)
    rewards = -beta * kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * (mask > 0)).argmax(dim=1, keepdim=True)
    has_tokens = (mask > 0).any(dim=1, keepdim=True)
    return rewards.scatter_add(1, last, scores.to(kl.dtype).unsqueeze(1) * has_tokens)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Returns-to-go `G_t = Σ_{s ≥ t} γ^(s-t) mask_s r_s` (REINFORCE, Williams 1992; REINFORCE++ arXiv 2501.03262,
    eq. 2), computed backwards `G_t = mask_t r_t + γ G_{t+1}`; `s - t` counts positions. `token_rewards`, `mask`
    `[N, T]`; returns `[N, T]`, 0 at masked-out positions."""
    mask = mask.to(token_rewards.dtype)
    rewards = token_rewards * mask
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def decoupled_group_rewards(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int, eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """The first step of reward-decoupled GDPO (arXiv 2601.05242, eq. 4–5; TRL 1.16's
    `multi_objective_aggregation="normalize_then_sum"`): each reward function normalised within its group,
    `Â_k = (r_k - μ_{g,k}) / (σ_{g,k} + eps)`, then `Σ_k w_k Â_k`.

    TRL's arithmetic: NaN-aware group mean and Bessel-corrected std per function (`nan_std`), `eps = 1e-4`; a
    function whose group ties gives 0; one with fewer than two scorable values in a group, or G = 1 (std 0), drops
    out of those samples' sums (NaN skipped); a sample for which all K functions are NaN is NaN (unscorable).
    `rewards_per_func` `[N, K]`, `weights` `[K]`; returns `[N]`."""
    num_completions, num_funcs = rewards_per_func.shape
    if group_size < 1 or num_completions % group_size:
        raise ValueError(f"{num_completions} completions is not a multiple of group_size={group_size}.")
    grouped = rewards_per_func.reshape(-1, group_size, num_funcs)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nan_std(grouped, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    normalised = ((grouped - mean) / (std + eps)).reshape(-1, num_funcs)
    summed = (normalised * weights.to(normalised).unsqueeze(0)).nansum(dim=1)
    return summed.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def decoupled_group_advantages(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int, eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """Reward-decoupled GDPO's advantages (arXiv 2601.05242, eq. 6): `decoupled_group_rewards` whitened over the
    whole batch, `(s - mean) / (std + eps)` (NaN-aware, Bessel-corrected, `eps = 1e-4`; std 0 when N = 1), as TRL
    1.16's `normalize_then_sum`. Unscorable samples (all K rewards NaN) get 0. `rewards_per_func` `[N, K]`,
    `weights` `[K]`; returns `[N]`."""
    summed = decoupled_group_rewards(rewards_per_func, weights, group_size, eps)
    std = nan_std(summed) if summed.numel() > 1 else torch.zeros((), dtype=summed.dtype, device=summed.device)
    return torch.nan_to_num((summed - torch.nanmean(summed)) / (std + eps), nan=0.0)


def log_importance_weights(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """`log ρ`, the log importance ratio of the current policy to the sampling one, at TRL 1.16's
    `importance_sampling_level`:
    `"token"`: `logp_t - old_t`, `[N, T]` (PPO / GRPO; not masked, the loss's aggregation masks it);
    `"sequence"`: GSPO (arXiv 2507.18071, eq. 7), `log (π/π_old)^(1/|y|) = Σ_t mask (logp_t - old_t) / max(|y|, 1)`,
    the per-sequence mean, `[N, 1]`;
    `"sequence_sum"`: the whole sequence's ratio `Σ_t mask (logp_t - old_t)`, `[N, 1]` (TRL's `RLOOTrainer`, which
    clips the sequence-level ratio π(y)/π_old(y)).
    Inputs `[N, T]`."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    mask = mask.to(log_ratio.dtype)
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if level == "sequence_sum":
        return (log_ratio * mask).sum(-1, keepdim=True)
    raise ValueError(f"Unknown importance sampling level {level!r}; expected one of {IMPORTANCE_SAMPLING_LEVELS}.")


def _as_column(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[N]` advantages → `[N, 1]` when the ratios are 2-D (TRL's conditional `unsqueeze(1)`)."""
    return advantages.unsqueeze(1) if advantages.dim() == 1 and like.dim() == 2 else advantages


def clipped_surrogate_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> torch.Tensor:
    """PPO's clipped surrogate (arXiv 1707.06347, eq. 7) as GRPO uses it per token (arXiv 2402.03300, eq. 3), with
    DAPO's decoupled clip range (arXiv 2503.14476, eq. 10): `-min(ρA, clip(ρ, 1 - ε_low, 1 + ε_high) A)`,
    `ρ = exp(log_ratio)`. `delta` (TRL's, INTELLECT-2 arXiv 2505.07291) additionally caps the unclipped `ρ` at
    `delta`. `log_ratio` `[N, T]` (token level) or `[N, 1]` (sequence level, `log_importance_weights`);
    `advantages` `[N]` (made `[N, 1]`) or `[N, T]`. Returns the broadcast shape, e.g. `[N, T]`; aggregate with
    `aggregate_token_loss`."""
    advantages = _as_column(advantages, log_ratio)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages)


def clip_fractions(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> dict[str, torch.Tensor]:
    """What TRL 1.16 logs as `clip_ratio/*`: a token is low-clipped when `ρ < 1 - ε_low` and `A < 0`, high-clipped
    when `ρ > 1 + ε_high` and `A > 0` (the clip is active in the min), region-clipped when either.
    Returns `low_mean`, `high_mean`, `region_mean` (scalars: fractions over the masked-in tokens; over the N
    sequences when `log_ratio` is `[N, 1]`, as TRL) and `low_per_seq`, `high_per_seq` (`[N]`: each sequence's
    fraction, NaN for a row with no tokens; TRL logs the min of the first and the max of the second over all
    processes). Across processes TRL sums numerators and counts before dividing; these are one process's values."""
    advantages = _as_column(advantages, log_ratio)
    ratio = torch.exp(log_ratio)
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(ratio.dtype)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(ratio.dtype)
    region = torch.maximum(low, high)
    if low.dim() == 2 and low.shape[1] == 1:
        out = {"low_mean": low.mean(), "high_mean": high.mean(), "region_mean": region.mean()}
        out.update(low_per_seq=low.squeeze(1), high_per_seq=high.squeeze(1))
        return out
    mask = mask.to(ratio.dtype)
    out = {name: masked_mean(x, mask) for name, x in (("low_mean", low), ("high_mean", high), ("region_mean", region))}
    out["low_per_seq"] = (low * mask).sum(-1) / mask.sum(-1)
    out["high_per_seq"] = (high * mask).sum(-1) / mask.sum(-1)
    return out


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate of KL(π ‖ π_ref) (Schulman 2020, "k3"; GRPO arXiv 2402.03300, eq. 4, as TRL):
    `exp(ref - logp) - (ref - logp) - 1` ≥ 0, unbiased for samples from π. Any shape; returns the same shape."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def sapo_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float, temperature_neg: float
) -> torch.Tensor:
    """SAPO, Soft Adaptive Policy Optimization (arXiv 2511.20347): PPO's hard clip replaced by a smooth gate,
    `-f(ρ) A` with `f(ρ) = σ(τ (ρ - 1)) · 4 / τ`, `ρ = exp(log_ratio)`, `τ = temperature_pos` where `A > 0` and
    `temperature_neg` elsewhere. `f(1) = 2/τ` and `f'(1) = 1`: on-policy the gradient is the plain policy gradient; far
    off-policy it fades smoothly instead of dropping to 0. `log_ratio` `[N, T]` or `[N, 1]`, `advantages` `[N]` or
    `[N, T]`; returns the broadcast shape (TRL aggregates it as `"grpo"`)."""
    advantages = _as_column(advantages, log_ratio)
    temperature = torch.where(advantages > 0, temperature_pos, temperature_neg)
    return -torch.sigmoid(temperature * (torch.exp(log_ratio) - 1)) * 4 / temperature * advantages


def weighted_reinforce_loss(token_logps: torch.Tensor, weights: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The policy gradient with a stop-gradient importance weight per token or per sequence,
    `-sg(w) · A · log π(y_t)`, whose gradient is `w · A · ∇log π`: the surrogate of CISPO (`cispo_weights`) and
    VESPO (`vespo_weights`), which reshape the weight instead of clipping the ratio's gradient away. `token_logps` `[N, T]`, `weights` `[N, T]` or
    `[N, 1]`, `advantages` `[N]` or `[N, T]`; returns `[N, T]`."""
    return -weights.detach() * _as_column(advantages, token_logps) * token_logps


def cispo_weights(log_ratio: torch.Tensor, epsilon_max: float) -> torch.Tensor:
    """CISPO's importance weight (MiniMax-M1, arXiv 2506.13585, eq. 4–5): `sg(min(ρ, ε_max))`, the ratio truncated
    from above only, so every token keeps a gradient (PPO's clip zeroes it outside the trust region). TRL reads
    `ε_max` from `epsilon_high`; ScaleRL (arXiv 2510.13786) uses 5. `log_ratio` `[N, T]` or `[N, 1]`; returns the
    same shape, detached."""
    return torch.exp(log_ratio).clamp(max=epsilon_max).detach()


VESPO_LOG_WEIGHT_RANGE = (math.log(1e-8), 20.0)  # TRL 1.16's (and the authors') clamp of the sequence's log-ratio


def vespo_weights(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> torch.Tensor:
    """VESPO's sequence weight (Variational sEquence-level Soft Policy Optimization, arXiv 2602.10693): the Gamma-shaped
    kernel `φ(w) = e^λ · w^k · e^(-λ w)` (so `φ(1) = 1`) of the whole sequence's importance ratio
    `w = π(y)/π_old(y)`, with `(k, λ) = (k_pos, λ_pos)` where `A ≥ 0` and `(k_neg, λ_neg)` where `A < 0`: `k`
    sets how fast weights fall for `w < 1`, `λ` for `w > 1`. Computed in log space as TRL 1.16 does: each token's
    log-ratio clamped to [-20, 20], their masked sum clamped to `[log 1e-8, 20]`, `λ` at least 1e-4, and a
    non-finite φ set to 0. `log_ratio` (`logp - old`), `mask` `[N, T]`, `advantages` `[N]`; returns `[N, 1]`,
    detached (it only scales the gradient, `weighted_reinforce_loss`)."""
    with torch.no_grad():
        log_w = (log_ratio.clamp(-20.0, 20.0) * mask.to(log_ratio.dtype)).sum(-1, keepdim=True)
        log_w = log_w.clamp(*VESPO_LOG_WEIGHT_RANGE)
        non_negative = _as_column(advantages, log_ratio) >= 0
        k = torch.where(non_negative, k_pos, k_neg)
        lam = torch.where(non_negative, lambda_pos, lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_sequence_mask(
    advantages: torch.Tensor, logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence masking (arXiv 2512.02556, eq. 9): a sequence is left out of the policy loss
    when its advantage is negative *and* the sampling policy has drifted from the current one by more than `threshold`
    in mean token KL, `(1/|y|) Σ_t (old_t - logp_t) > threshold` (the k1 estimate of KL(π_old ‖ π) on π_old's
    samples). Learning from one's own mistakes only helps while they are still one's own. `advantages` `[N]`,
    `logps` (taken without gradient), `old_logps`, `mask` `[N, T]`; returns `[N, 1]`: 1 keep, 0 drop (in `mask`'s
    float dtype). As TRL, a NaN log-prob difference counts as 0."""
    mask = mask.to(logps.dtype)
    drift = torch.nan_to_num(old_logps - logps.detach(), nan=0.0)
    mean_kl = (drift * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((_as_column(advantages, logps) >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def high_entropy_mask(
    entropy: torch.Tensor, mask: torch.Tensor, quantile: float, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """"Beyond the 80/20 Rule" (arXiv 2506.01939): the policy gradient only through the top-`quantile` fraction of
    tokens by entropy (the "forking" tokens). A token is kept when it is in `mask` and its entropy is at least the
    `(1 - quantile)` quantile (linear interpolation, `torch.quantile`) of `pool`, the entropies it is ranked among:
    by default this batch's masked-in ones; TRL 1.16 ranks among every process's. `quantile=1` keeps every token,
    `0` only the highest. `entropy`, `mask` `[N, T]`; returns `[N, T]` bool (all False when `pool` is empty)."""
    pool = entropy[mask.bool()] if pool is None else pool
    if pool.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(pool.float(), 1.0 - quantile)
    return (entropy >= threshold) & mask.bool()


def adaptive_entropy_coef(
    coef: float, entropy: float, target: float, step: float, coef_min: float, coef_max: float
) -> float:
    """Skywork-OR1's adaptive entropy control (arXiv 2505.22312, §3.2.4): after each optimizer step the entropy bonus's
    coefficient moves by `step` towards keeping the policy's mean token entropy at `target`: up (to at most `coef_max`)
    when `entropy ≤ target`, down (to at least `coef_min`) otherwise. Returns the new coefficient."""
    if entropy <= target:
        return min(coef + step, coef_max)
    return max(coef - step, coef_min)


def aggregate_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    gradient_accumulation_steps: int = 1,
    num_processes: int = 1,
    steps_per_generation: int | None = None,
) -> torch.Tensor:
    """Reduces `per_token_loss` (`[N, T]`, or `[N, 1]` broadcast over the mask) over this micro-batch to the scalar
    TRL 1.16's `GRPOTrainer._compute_loss` returns for its `loss_type`, with `S = Σ mask · loss` and `n = Σ mask`:

    - `"grpo"` (arXiv 2402.03300, eq. 3): `mean_i [Σ_t mask loss / max(|y_i|, 1)] / GA` (a row with no token counts
      as 0 and still counts in the mean);
    - `"bnpo"`: `S / max(n, 1) / GA` (this micro-batch's tokens only);
    - `"dr_grpo"` (arXiv 2503.20783): `S / (N · max_completion_length) / GA`, `N` the micro-batch's rows;
    - `"dapo"` (arXiv 2503.14476, eq. 8): `S / [max(num_items_in_batch, 1) / num_processes · GA / spg]`, where
      `num_items_in_batch` is the completion-token count of the whole generation batch summed over every process
      (TRL gathers it when generating), `spg` = `steps_per_generation` (default: GA);
    - `"luspo"` (arXiv 2602.05261): `mean_i [Σ_t mask loss] / GA`, each sequence's loss summed, not averaged, over its
      tokens (GSPO's sequence loss scaled by its length);
    - the other loss types aggregate as TRL's: `"sapo"` as `"grpo"`, `"cispo"` and `"vespo"` as `"dapo"`.

    `GA` = `gradient_accumulation_steps`: in training pass TRL's `current_gradient_accumulation_steps` (the loss is
    returned already scaled for accumulation, TRL's `loss_is_scaled_for_ga = True`); in evaluation pass 1 (and
    `steps_per_generation=1`). With the default 1 the un-scaled loss (TRL's logged `policy_loss`) comes back. For
    `"dapo"` the micro-batch losses of one optimizer step, summed over accumulation and averaged over processes (as
    DDP does with gradients), add up to `Σ_{all tokens} loss / num_items_in_batch` when spg = GA: the token mean over
    the whole generation batch."""
    mask = mask.to(per_token_loss.dtype)
    total = (per_token_loss * mask).sum()
    loss_type = {"sapo": "grpo", "cispo": "dapo", "vespo": "dapo"}.get(loss_type, loss_type)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = total / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError('loss_type="dr_grpo" needs max_completion_length.')
        loss = total / (per_token_loss.shape[0] * max_completion_length)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    elif loss_type == "dapo":
        if num_items_in_batch is None:
            raise ValueError('loss_type="dapo" needs num_items_in_batch (the generation batch\'s token count).')
        count = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype, device=per_token_loss.device)
        spg = gradient_accumulation_steps if steps_per_generation is None else steps_per_generation
        return total / (count.clamp(min=1.0) / num_processes * gradient_accumulation_steps / spg)
    else:
        raise ValueError(f"Unknown policy-gradient loss_type {loss_type!r}; expected one of {PG_LOSS_TYPES}.")
    return loss / gradient_accumulation_steps


def reinforce_loss(token_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992, "Simple statistical gradient-following algorithms for connectionist
    reinforcement learning"): `mean_i [-Σ_t mask_i,t A_i,t log π(a_i,t)]`, `A_i,t = G_i,t - b_i`, whose
    gradient is the policy-gradient estimate averaged over the N sequences (summed over each sequence's tokens).
    There is no importance ratio: valid only on the samples of the current policy. `token_logps`, `mask` `[N, T]`;
    `advantages` `[N, T]` (per token) or `[N]` (one per sequence); returns a scalar."""
    advantages = _as_column(advantages, token_logps)
    return -(advantages * token_logps * mask.to(token_logps.dtype)).sum(-1).mean()


# ======================================================================================================================
# PPO (actor–critic): GAE, the clipped value loss, explained variance, KL-coefficient controllers
# ======================================================================================================================
#
# PPO (arXiv 1707.06347) as used for RLHF (arXiv 1909.08593, 2203.02155). Shapes as in the section above: `N`
# completions, `T` completion tokens, `mask` `[N, T]` (bool or float) 1 on the tokens that count. `values[:, t]` is
# the critic's estimate for the state *before* token t is emitted (`hf_align.value`'s alignment), the per-token
# reward `r_t` is e.g. `kl_penalised_token_rewards` (`-β KL_t`, plus the score on the last token), and the policy
# loss is `clipped_surrogate_loss` on the advantages below. Advantages and returns are targets: compute them from the
# rollout's old values under `torch.no_grad()`.


def generalized_advantage_estimation(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ, λ) (arXiv 1506.02438, eqs. 10–16): `δ_t = r_t + γ V_{t+1} - V_t`, `A_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l}`,
    computed backwards `A_t = δ_t + γλ A_{t+1}`; returns (the value targets) `R_t = A_t + V_t`.

    The time steps of a row are its masked-in tokens, in order: the value after a row's last masked-in token is 0
    (the episode ends at EOS or at the truncation point), so ragged lengths and completions starting at any column
    (e.g. 0) need no special handling, and a masked-out position inside a row is skipped (its successor is the next
    masked-in token; `γ` counts tokens, where `discounted_returns` counts positions: the same for contiguous masks).
    Special cases: `λ = 1` gives `A_t = G_t - V_t` with `G_t` the γ-discounted reward-to-go; `λ = 0` gives
    `A_t = δ_t`. `token_rewards`, `values`, `mask` `[N, T]` (masked-out entries must be finite, they are ignored);
    returns `(advantages, returns)`, each `[N, T]` in `values`' dtype, 0 at masked-out positions."""
    mask = mask.to(values.dtype)
    keep = mask > 0
    rewards = token_rewards.to(values.dtype) * mask
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(keep[:, t], advantage, torch.zeros_like(advantage))
        next_advantage = torch.where(keep[:, t], advantage, next_advantage)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
    return advantages, (advantages + values) * mask


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (the PPO2 baselines' form, used for RLHF in arXiv 2203.02155):
    `0.5 · mean_mask max((V - R)², (clip(V, V_old - ε_v, V_old + ε_v) - R)²)`, the token mean over the masked-in
    tokens of the whole batch. The clip keeps the critic from moving a value more than `ε_v = clip_range` away from
    the one it had when the rollout was made (in the max, only in the direction that would lower the loss); with
    `clip_range=None` this is the plain `0.5 · mean_mask (V - R)²`.

    Also returns the clip fraction: the share of masked-in tokens where the clipped term is strictly the larger,
    i.e. where the clip is active and the token gives no gradient (TRL's `vf_clipfrac`). `values` `[N, T]` (with
    gradient), `old_values`, `returns` (`generalized_advantage_estimation`'s), `mask` `[N, T]`; returns
    `(loss, clip_fraction)`, two scalars (0 and 0 when no token is masked in)."""
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(unclipped, mask), values.new_zeros(())
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask).detach()
    return loss, clip_fraction


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much of the returns' variance the critic explains: `1 - Var[R - V] / Var[R]` over the masked-in tokens
    of the whole batch (population variances, `masked_var`). 1 for a perfect critic, 0 for any constant prediction,
    negative for one worse than a constant; NaN when `Var[R] = 0` (undefined). `values`, `returns`, `mask` `[N, T]`;
    returns a detached scalar."""
    values, returns = values.detach(), returns.detach()
    variance = masked_var(returns, mask)
    residual = masked_var(returns - values, mask)
    return torch.where(variance > 0, 1 - residual / variance, torch.full_like(variance, float("nan")))


class AdaptiveKLController:
    """The adaptive KL-penalty coefficient of Ziegler et al. (arXiv 1909.08593): after each rollout batch,
    `e = clip(KL / target - 1, -0.2, 0.2)`, `β ← β · (1 + K_β e)` with the paper's gain `K_β = n_steps / horizon`,
    where `KL` is the batch's measured KL(π ‖ π_ref) per sequence and `n_steps` the number of samples it was measured
    on: β grows while the policy drifts further than `target` from the reference and shrinks while it stays closer,
    by at most `0.2 · n_steps / horizon` relative per update.

    A small class rather than a pure function because β is state carried from one rollout batch to the next (a
    trainer saves it with its checkpoints: `value`). `FixedKLController` has the same interface."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}.")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Updates and returns β from the measured `current_kl` (a float or a scalar tensor)."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


class FixedKLController:
    """A constant KL-penalty coefficient β with `AdaptiveKLController`'s interface (`value`, `update`)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Leaves β unchanged and returns it."""
        return self.value

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"
