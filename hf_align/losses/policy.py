"""The policy-gradient losses of the online trainers (GRPO, Dr. GRPO, DAPO, GSPO, CISPO, SAPO, VESPO, RLOO,
REINFORCE): importance weights, clipping, KL estimate, token masks and TRL 1.16's loss aggregation. Shapes as in
`advantages`: `N` completions, `T` completion tokens, `mask` `[N, T]` 1 on the tokens that count."""

from __future__ import annotations

import math

import torch

from .stats import masked_mean


PG_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16's `loss_type`s
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_sum")


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
