"""PPO (actor–critic): the clipped value loss, explained variance, KL-coefficient controllers.

PPO (arXiv 1707.06347) as used for RLHF (arXiv 1909.08593, 2203.02155). Shapes as in `advantages`: `N`
completions, `T` completion tokens, `mask` `[N, T]` (bool or float) 1 on the tokens that count. `values[:, t]` is
the critic's estimate for the state *before* token t is emitted (`hf_align.value`'s alignment), the per-token
reward `r_t` is e.g. `kl_penalised_token_rewards` (`-β KL_t`, plus the score on the last token), the advantages and
returns are `generalized_advantage_estimation`'s, and the policy loss is `clipped_surrogate_loss`. Advantages and
returns are targets: compute them from the rollout's old values under `torch.no_grad()`.
"""

from __future__ import annotations

import torch

from .stats import masked_mean, masked_var


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
