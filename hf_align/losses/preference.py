"""The offline preference objectives: the DPO family (TRL 1.16's loss types, f-DPO, LD-DPO, WPO), IPO, ORPO, SimPO,
CPO / AlphaPO, KTO and the Bradley–Terry reward-model loss.

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
