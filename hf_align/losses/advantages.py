"""Rewards, advantages and returns of the online trainers: GRPO's group-relative advantages (and Dr. GRPO's, DAPO's
overlong penalty), RLOO's leave-one-out, ReMax's greedy baseline, REINFORCE / REINFORCE++'s KL-penalised token rewards
and returns, reward-decoupled GDPO's per-function normalisation, and PPO's GAE.

Shapes: `N` completions = num_prompts · G, prompt-major (row `i·G + g` is completion `g` of prompt `i`); `T` completion
length; `mask` `[N, T]` (bool or float) is 1 on the completion tokens that count. Values at masked positions must be
finite: they are multiplied by 0, as TRL does. A reward of NaN means "unscorable" (every reward function returned
None for that sample): it is left out of the group and batch statistics and its advantage is 0, as in TRL 1.16.
"""

from __future__ import annotations

import torch

from .stats import nan_std


ADVANTAGE_EPS = 1e-4  # TRL 1.16 adds this to every reward / advantage standard deviation it divides by.
REWARD_SCALES = ("group", "batch", "none")


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
