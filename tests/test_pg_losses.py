"""The policy-gradient section of `hf_align.losses` (GRPO / Dr. GRPO / DAPO / GSPO, RLOO, ReMax, REINFORCE++,
reward-decoupled GDPO) against values worked out by hand, and against TRL 1.16.

TRL computes advantages inline in `_generate_and_score_completions`, which cannot run without a model and a
generation backend; those are compared with a restatement of TRL's arithmetic built on TRL's own `nanstd`. TRL's
loss code (`GRPOTrainer._compute_loss`, `RLOOTrainer._compute_loss`) is called for real, on a stand-in trainer whose
"model" returns fixed per-token log-probs.

Rows are prompt-major: row `i·G + g` is completion `g` of prompt `i`. Group std is Bessel-corrected (TRL), so for two
rewards {a, b}: std = |a - b| / √2.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from hf_align import losses

EPS = 1e-4  # TRL's std epsilon
SQRT2 = math.sqrt(2.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-12):
    expected = torch.as_tensor(expected, dtype=torch.float64) if not isinstance(expected, torch.Tensor) else expected
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------- masked helpers


def test_masked_mean_and_std():
    values = t(1.0, 2.0, 99.0, 3.0, 99.0, 99.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    close(losses.masked_mean(values, mask), 2.0)  # (1 + 2 + 3) / 3
    close(losses.masked_mean(values, mask, dim=-1), [1.5, 3.0])
    # biased: ((1-2)² + 0 + (3-2)²) / 3 = 2/3; unbiased: 2/2 = 1
    close(losses.masked_var(values, mask), 2 / 3)
    close(losses.masked_var(values, mask, unbiased=True), 1.0)
    close(losses.masked_std(values, mask), math.sqrt(2 / 3))
    # a row with no token: mean 0, not NaN
    close(losses.masked_mean(values, torch.zeros_like(mask), dim=-1), [0.0, 0.0])


def test_masked_whiten():
    values = t(1.0, 2.0, 99.0, 3.0, 99.0, 99.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # μ = 2, σ² = 2/3 (biased): (v - 2) / sqrt(2/3 + 1e-8), 0 where masked out
    s = 1 / math.sqrt(2 / 3 + 1e-8)
    close(losses.masked_whiten(values, mask), [[-s, 0.0, 0.0], [s, 0.0, 0.0]])
    s1 = 1 / math.sqrt(1 + 1e-8)  # unbiased σ² = 1
    close(losses.masked_whiten(values, mask, unbiased=True), [[-s1, 0.0, 0.0], [s1, 0.0, 0.0]])
    close(losses.masked_whiten(values, mask, shift_mean=False), [[2 - s, 2.0, 0.0], [2 + s, 0.0, 0.0]])
    # the batch, not the group: both rows are whitened together, so row 1 alone does not have mean 0
    out = losses.masked_whiten(values, mask)
    assert out[1, 0] > 0


def test_nan_std_matches_trl_nanstd():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x[0, 1] = x[2, :3] = x[3, :] = float("nan")  # row 2: one value (std NaN); row 3: none
    # 1e-6, not 1e-12: TRL's Bessel factor count / (count - 1) divides integer tensors, so it is float32 even for
    # float64 rewards (a 1e-8 relative difference); hf_align's is exact.
    for dim in (None, 0, 1):
        torch.testing.assert_close(losses.nan_std(x, dim=dim), nanstd(x, dim=dim), equal_nan=True, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        losses.nan_std(x, dim=1, keepdim=True), nanstd(x, dim=1, keepdim=True), equal_nan=True, rtol=1e-6, atol=0
    )
    close(losses.nan_std(t(1.0, 2.0, 3.0, 4.0)), math.sqrt(5 / 3))  # Σ(r-2.5)² = 5, / (4 - 1)


# ------------------------------------------------------------------------------------------------------- GRPO


def test_group_relative_advantages_hand_values():
    r = t(1.0, 2.0, 3.0, 4.0)  # groups {1, 2}, {3, 4}: means 1.5, 3.5, group stds 1/√2
    a = 0.5 / (1 / SQRT2 + EPS)
    close(losses.group_relative_advantages(r, 2), [-a, a, -a, a])
    # batch std of all four: sqrt(5/3); the mean stays per group
    b = 0.5 / (math.sqrt(5 / 3) + EPS)
    close(losses.group_relative_advantages(r, 2, scale="batch"), [-b, b, -b, b])
    close(losses.group_relative_advantages(r, 2, scale="none"), [-0.5, 0.5, -0.5, 0.5])  # Dr. GRPO
    with pytest.raises(ValueError, match="scale"):
        losses.group_relative_advantages(r, 2, scale="std")
    with pytest.raises(ValueError, match="multiple"):
        losses.group_relative_advantages(r, 3)


def test_group_relative_advantages_ties_nan_and_g1():
    r = t(1.0, 1.0, 0.0, 2.0)  # group 0 ties: A = 0 / (0 + 1e-4) = 0
    c = 1.0 / (SQRT2 + EPS)
    out = losses.group_relative_advantages(r, 2)
    close(out, [0.0, 0.0, -c, c])
    assert losses.reward_std_is_zero(r, 2).tolist() == [True, True, False, False]  # frac_reward_zero_std = 0.5
    assert losses.reward_std_is_zero(r, 2, scale="none").tolist() == [True, True, False, False]
    assert not losses.reward_std_is_zero(r, 2, scale="batch").any()  # TRL checks the batch std there
    assert losses.reward_std_is_zero(t(3.0, 3.0), 1, scale="batch").all()

    # NaN (unscorable) rewards: left out of the group's mean and std, advantage 0. Group 0 = {1, ·, 3}: mean 2,
    # std √2. Group 1 = {·, 4, ·}: one scorable value, std undefined -> advantage 0 and not "zero std".
    nan = float("nan")
    r = t(1.0, nan, 3.0, nan, 4.0, nan)
    c = 1.0 / (SQRT2 + EPS)
    out = losses.group_relative_advantages(r, 3)
    close(out, [-c, 0.0, c, 0.0, 0.0, 0.0])
    assert losses.reward_std_is_zero(r, 3).tolist() == [False] * 6

    # G = 1: nothing to compare with, advantages 0, std counted as zero
    close(losses.group_relative_advantages(t(0.3, 0.9), 1), [0.0, 0.0])
    assert losses.reward_std_is_zero(t(0.3, 0.9), 1).all()


def _trl_grpo_advantages(rewards, group_size, scale):
    """TRL 1.16 `sum_then_normalize` arithmetic, restated on TRL's `nanstd`."""
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, group_size)
    centred = rewards - torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(group_size)
    adv = centred if scale == "none" else centred / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_relative_advantages_match_trl(scale):
    g = torch.Generator().manual_seed(1)
    r = torch.randint(0, 3, (24,), generator=g).double()  # small integers: plenty of tied groups
    r[5] = r[13] = r[14] = float("nan")
    expected, zero = _trl_grpo_advantages(r, 4, scale)
    close(losses.group_relative_advantages(r, 4, scale=scale), expected, tol=1e-6)
    assert torch.equal(losses.reward_std_is_zero(r, 4, scale=scale), zero)


def test_weighted_reward_sum():
    nan = float("nan")
    per_func = t(1.0, 2.0, nan, 3.0, nan, nan).view(3, 2)
    # 1·1 + 0.5·2 = 2; the NaN function is skipped: 0.5·3 = 1.5; all NaN -> NaN
    out = losses.weighted_reward_sum(per_func, t(1.0, 0.5))
    close(out[:2], [2.0, 1.5])
    assert torch.isnan(out[2])


# ------------------------------------------------------------------------------------------------------- RLOO


def test_leave_one_out_hand_values():
    r = t(1.0, 2.0, 3.0, 6.0)  # one group, Σ = 12
    # A_i = r_i - (12 - r_i)/3: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3
    loo = [-8 / 3, -4 / 3, 0.0, 4.0]
    close(losses.leave_one_out_advantages(r, 4), loo)
    # = G/(G-1) (r - mean) as well
    close(losses.leave_one_out_advantages(r, 4), 4 / 3 * (r - 3.0))
    # normalize: mean 0, Σ A² = 64/9 + 16/9 + 0 + 16 = 224/9, unbiased var 224/27
    std = math.sqrt(224 / 27)
    close(losses.leave_one_out_advantages(r, 4, normalize=True), [x / (std + EPS) for x in loo])
    # two groups are independent
    close(losses.leave_one_out_advantages(t(0.0, 1.0, 5.0, 5.0), 2), [-1.0, 1.0, 0.0, 0.0])


def test_leave_one_out_nan_ties_and_g1():
    nan = float("nan")
    # group {1, ·, 3}: scorable count 2, baselines (4 - 1)/1 = 3 and (4 - 3)/1 = 1; group {·, 7, ·}: alone -> 0
    out = losses.leave_one_out_advantages(t(1.0, nan, 3.0, nan, 7.0, nan), 3)
    close(out, [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    close(losses.leave_one_out_advantages(t(2.0, 2.0, 2.0), 3, normalize=True), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="group_size >= 2"):
        losses.leave_one_out_advantages(t(1.0, 2.0), 1)


def _trl_rloo_advantages(rewards, group_size, normalize):
    """TRL 1.16 RLOOTrainer arithmetic, restated on TRL's `nanstd`."""
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, group_size)
    count = (~torch.isnan(grouped)).sum(1, keepdim=True)
    baseline = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (count - 1)
    adv = rewards - baseline.view(-1)
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out_matches_trl(normalize):
    g = torch.Generator().manual_seed(2)
    r = torch.randn(16, generator=g, dtype=torch.float64)
    r[3] = r[8] = r[9] = r[10] = float("nan")  # group 2 keeps one scorable completion
    close(losses.leave_one_out_advantages(r, 4, normalize=normalize), _trl_rloo_advantages(r, 4, normalize), tol=1e-6)


def test_sequence_kl_penalised_rewards():
    logps = t(-1.0, -2.0, -9.0, -1.0, -1.0, -1.0).view(2, 3)
    ref = t(-1.5, -1.0, 0.0, -1.0, -1.0, -3.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # Σ mask (logp - ref): 0.5 - 1.0 = -0.5 (k1, negative here); 0 + 0 + 2 = 2. β = 0.1
    close(losses.sequence_kl_penalised_rewards(t(1.0, 1.0), logps, ref, mask, 0.1), [1.05, 0.8])


# ------------------------------------------------------------------------------------------------------ ReMax


def test_greedy_baseline_advantages():
    out = losses.greedy_baseline_advantages(t(1.0, 0.0, 0.5, 0.5), t(0.5, 1.0), 2)
    close(out, [0.5, -0.5, -0.5, -0.5])
    close(losses.greedy_baseline_advantages(t(1.0, float("nan")), t(0.25, 0.5), 1), [0.75, 0.0])
    with pytest.raises(ValueError, match="greedy reward per prompt"):
        losses.greedy_baseline_advantages(t(1.0, 0.0, 0.5, 0.5), t(0.5, 1.0, 2.0), 2)


# ------------------------------------------------------------------------------------------------- REINFORCE++


def test_group_mean_baseline():
    close(losses.group_mean_baseline(t(1.0, 3.0, 2.0, 2.0), 2), [-1.0, 1.0, 0.0, 0.0])


def test_kl_penalised_token_rewards():
    scores = t(2.0, -5.0, 1.0)
    kl = t(0.1, 0.2, 0.3, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0).view(3, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    # β = 0.1: -0.1·KL on tokens; the score (clipped to [-3, 3]) on each row's last completion token;
    # row 2 has no completion token: nothing at all
    out = losses.kl_penalised_token_rewards(scores, kl, mask, beta=0.1, clip=3.0)
    close(out, [[-0.01, -0.02 + 2.0, 0.0], [-0.05, -0.05, -0.05 - 3.0], [0.0, 0.0, 0.0]])
    out = losses.kl_penalised_token_rewards(scores, kl, mask, beta=0.0, clip=(-1.0, 10.0))
    close(out, [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    out = losses.kl_penalised_token_rewards(scores, kl, mask, beta=0.0)  # no clip
    close(out[1], [0.0, 0.0, -5.0])


def test_discounted_returns():
    rewards = t(1.0, 2.0, 3.0, 9.0).view(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    # γ = 0.5: G2 = 3, G1 = 2 + 0.5·3 = 3.5, G0 = 1 + 0.5·3.5 = 2.75; the masked 9 is no reward
    close(losses.discounted_returns(rewards, mask, 0.5), [[2.75, 3.5, 3.0, 0.0]])
    close(losses.discounted_returns(rewards, mask, 1.0), [[6.0, 5.0, 3.0, 0.0]])  # reverse cumulative sum
    # a hole: its reward is dropped and its return is 0, but the discount counts positions: G0 = 1 + 0.25·3
    close(losses.discounted_returns(rewards, torch.tensor([[1, 0, 1, 0]]), 0.5), [[1.75, 0.0, 3.0, 0.0]])
    close(losses.discounted_returns(rewards, torch.zeros(1, 4), 0.9), [[0.0] * 4])


def test_reinforce_pp_pipeline():
    # REINFORCE++-baseline end to end: group-mean baseline on scores, token rewards, γ = 1 returns, batch whitening
    scores = t(1.0, 0.0, 0.0, 0.0)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    centred = losses.group_mean_baseline(scores, 2)  # [0.5, -0.5, 0, 0]
    token_rewards = losses.kl_penalised_token_rewards(centred, torch.zeros(4, 2, dtype=torch.float64), mask, 0.1)
    returns = losses.discounted_returns(token_rewards, mask, 1.0)
    close(returns, [[0.5, 0.5], [-0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    adv = losses.masked_whiten(returns, mask)
    close(losses.masked_mean(adv, mask), 0.0, tol=1e-9)
    close(losses.masked_var(adv, mask), 1.0, tol=1e-6)


# ---------------------------------------------------------------------------------------- reward-decoupled GDPO


def test_decoupled_group_advantages_hand_values():
    # K = 2 functions, weights (1, 0.5), G = 2. Group 0: f1 = {1, 0} -> ±0.5/(1/√2 + ε) = ±a;
    # f2 = {0, 2} -> ∓1/(√2 + ε) = ∓b. Group 1: f1 = {1, 1} ties -> 0; f2 = {3, 3} ties -> 0.
    per_func = t(1.0, 0.0, 0.0, 2.0, 1.0, 3.0, 1.0, 3.0).view(4, 2)
    a, b = 0.5 / (1 / SQRT2 + EPS), 1.0 / (SQRT2 + EPS)
    s = a - 0.5 * b
    summed = losses.decoupled_group_rewards(per_func, t(1.0, 0.5), 2)
    close(summed, [s, -s, 0.0, 0.0])
    # batch whitening of {s, -s, 0, 0}: mean 0, unbiased std sqrt(2 s² / 3)
    std = math.sqrt(2 * s * s / 3)
    close(losses.decoupled_group_advantages(per_func, t(1.0, 0.5), 2), [s / (std + EPS), -s / (std + EPS), 0.0, 0.0])


def test_decoupled_group_advantages_nan_and_ties():
    nan = float("nan")
    # Group 1 = rows 2, 3: row 3 returned None for both functions (unscorable -> NaN, advantage 0). Row 2 is then the
    # only scorable value of each function in its group: std undefined, both terms drop out, its sum is 0.
    per_func = t(1.0, 0.0, 0.0, 2.0, 1.0, 3.0, nan, nan).view(4, 2)
    a, b = 0.5 / (1 / SQRT2 + EPS), 1.0 / (SQRT2 + EPS)
    s = a - 0.5 * b
    summed = losses.decoupled_group_rewards(per_func, t(1.0, 0.5), 2)
    close(summed[:3], [s, -s, 0.0])
    assert torch.isnan(summed[3])
    # batch over the 3 scorable: mean 0, std sqrt(2 s² / 2) = |s|
    out = losses.decoupled_group_advantages(per_func, t(1.0, 0.5), 2)
    close(out, [s / (abs(s) + EPS), -s / (abs(s) + EPS), 0.0, 0.0])
    assert not torch.isnan(out).any()
    # every reward tied: all zeros, no NaN, and TRL's zero-std check (batch std) fires
    tied = torch.ones(6, 3, dtype=torch.float64)
    close(losses.decoupled_group_advantages(tied, t(1.0, 1.0, 1.0), 3), [0.0] * 6)
    assert losses.reward_std_is_zero(losses.decoupled_group_rewards(tied, t(1.0, 1.0, 1.0), 3), 3, "batch").all()


def test_decoupled_matches_trl():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(3)
    per_func = torch.randint(0, 4, (12, 3), generator=g).double()
    per_func[1, 0] = per_func[4, :] = per_func[7, 2] = per_func[8, 2] = float("nan")
    weights = t(1.0, 0.5, 2.0)
    # TRL 1.16 `normalize_then_sum`, restated on its `nanstd`
    grouped = per_func.view(-1, 3, 3)
    k = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    summed = (k.view(-1, 3) * weights).nansum(1)
    summed[torch.isnan(per_func).all(1)] = float("nan")
    expected = torch.nan_to_num((summed - torch.nanmean(summed)) / (nanstd(summed) + 1e-4), nan=0.0)
    close(losses.decoupled_group_advantages(per_func, weights, 3), expected, tol=1e-6)


# ----------------------------------------------------------------------------------- ratios, clipping, KL, loss


LOGPS = t(-1.0, -2.0, -3.0, -1.0, -1.0, -1.0).view(2, 3)
OLD = t(-1.5, -2.0, -2.0, -1.0, -1.0, -1.0).view(2, 3)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_log_importance_weights_levels():
    close(losses.log_importance_weights(LOGPS, OLD, MASK), [[0.5, 0.0, -1.0], [0.0, 0.0, 0.0]])  # not masked
    # GSPO: the mean over the row's tokens, (0.5 + 0) / 2; RLOO: the sum
    close(losses.log_importance_weights(LOGPS, OLD, MASK, "sequence"), [[0.25], [0.0]])
    close(losses.log_importance_weights(LOGPS, OLD, MASK, "sequence_sum"), [[0.5], [0.0]])
    close(losses.log_importance_weights(LOGPS, OLD, torch.zeros_like(MASK), "sequence"), [[0.0], [0.0]])
    with pytest.raises(ValueError, match="importance sampling level"):
        losses.log_importance_weights(LOGPS, OLD, MASK, "tokens")


def test_token_vs_sequence_level_differ():
    # A = (+1, -1), ε = 0.2. Token level, row 0: ρ = e^0.5 = 1.65 is clipped to 1.2 (loss -1.2), ρ = 1 (loss -1);
    # sequence level, row 0: ρ = e^0.25 = 1.28 for every token, clipped to 1.2 (loss -1.2 each). Row 1: ρ = 1, loss 1.
    adv = t(1.0, -1.0)
    logps = LOGPS.clone().requires_grad_(True)
    per_level = {}
    for level in ("token", "sequence"):
        ratio = losses.log_importance_weights(logps, OLD, MASK, level)
        per_token = losses.clipped_surrogate_loss(ratio, adv, 0.2, 0.2)
        loss = losses.aggregate_token_loss(per_token, MASK, "grpo")
        (grad,) = torch.autograd.grad(loss, logps)
        per_level[level] = (loss.detach(), grad, losses.clip_fractions(ratio, adv, MASK, 0.2, 0.2))
    loss_tok, grad_tok, clip_tok = per_level["token"]
    loss_seq, grad_seq, clip_seq = per_level["sequence"]
    close(loss_tok, ((-1.2 - 1.0) / 2 + 1.0) / 2)  # -0.05
    close(loss_seq, (-1.2 + 1.0) / 2)  # -0.1
    # gradients: token level, only row 0's clipped token is cut off; sequence level, the whole of row 0 is
    close(grad_tok[0], [0.0, -0.25, 0.0])  # d(-ρA)/dlogp = -1, · 1/2 (row mean) · 1/2 (batch mean)
    close(grad_seq[0], [0.0, 0.0, 0.0])
    close(grad_tok[1], grad_seq[1])
    # clip fractions: 1 of 5 tokens vs 1 of 2 sequences
    close(clip_tok["high_mean"], 0.2)
    close(clip_seq["high_mean"], 0.5)
    close(clip_tok["low_mean"], 0.0)


def test_clipped_surrogate_hand_values():
    log_ratio = torch.log(t(1.5, 0.5, 1.5, 0.5))
    adv = t(1.0, -1.0, -1.0, 1.0)
    # ε_low = 0.2, ε_high = 0.28 (DAPO): clip range [0.8, 1.28]
    #  ρ=1.5, A=+1: -min(1.5, 1.28) = -1.28     ρ=0.5, A=-1: -min(-0.5, -0.8) = 0.8
    #  ρ=1.5, A=-1: -min(-1.5, -1.28) = 1.5     ρ=0.5, A=+1: -min(0.5, 0.8) = -0.5
    close(losses.clipped_surrogate_loss(log_ratio, adv, 0.2, 0.28), [-1.28, 0.8, 1.5, -0.5])
    # δ = 1.4 (two-sided): ρ=1.5, A=-1 -> -min(-1.4, -1.28) = 1.4
    close(losses.clipped_surrogate_loss(log_ratio, adv, 0.2, 0.28, delta=1.4), [-1.28, 0.8, 1.4, -0.5])
    # [N] advantages broadcast over [N, T] ratios
    out = losses.clipped_surrogate_loss(torch.zeros(2, 3, dtype=torch.float64), t(2.0, -1.0), 0.2, 0.2)
    close(out, [[-2.0] * 3, [1.0] * 3])
    fr = losses.clip_fractions(log_ratio.view(1, 4), adv.view(1, 4), torch.ones(1, 4), 0.2, 0.28)
    close(fr["low_mean"], 0.25)  # ρ=0.5 with A<0
    close(fr["high_mean"], 0.25)  # ρ=1.5 with A>0
    close(fr["region_mean"], 0.5)


def test_k3_kl():
    # logp = -1, ref = -2: e^-1 + 1 - 1; equal: 0; logp = -2, ref = -1: e - 1 - 1
    close(losses.k3_kl(t(-1.0, -1.0, -2.0), t(-2.0, -1.0, -1.0)), [math.exp(-1), 0.0, math.e - 2])
    assert (losses.k3_kl(torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)) >= 0).all()


def test_aggregate_token_loss_hand_values():
    loss = t(1.0, 2.0, 3.0, 4.0, 5.0, 6.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # S = 1 + 2 + 4 = 7 over 3 tokens
    agg = losses.aggregate_token_loss
    close(agg(loss, mask, "grpo"), (1.5 + 4.0) / 2)
    close(agg(loss, mask, "grpo", gradient_accumulation_steps=2), (1.5 + 4.0) / 4)
    close(agg(loss, mask, "bnpo"), 7 / 3)
    close(agg(loss, mask, "dr_grpo", max_completion_length=4), 7 / 8)
    close(agg(loss, mask, "dapo", num_items_in_batch=10), 0.7)
    # 2 processes, GA 2, 4 steps per generation: normaliser 10 / 2 · 2 / 4 = 2.5
    close(agg(loss, mask, "dapo", num_items_in_batch=10, gradient_accumulation_steps=2, num_processes=2,
              steps_per_generation=4), 7 / 2.5)
    # a row with no token counts 0 in the grpo mean
    close(agg(t(1.0, 2.0, 3.0, 4.0).view(2, 2), torch.tensor([[1, 1], [0, 0]]), "grpo"), 0.75)
    # a sequence-level [N, 1] loss broadcasts over the mask
    close(agg(t(1.0, 2.0).view(2, 1), mask, "bnpo"), (1 + 1 + 2) / 3)
    with pytest.raises(ValueError, match="max_completion_length"):
        agg(loss, mask, "dr_grpo")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        agg(loss, mask, "dapo")
    with pytest.raises(ValueError, match="loss_type"):
        agg(loss, mask, "sigmoid")


# ------------------------------------------------------------------------- TRL's own loss code on a stand-in


class _Model(SimpleNamespace):
    training = True


class _IdenticalProcesses:
    """What TRL's `_compute_loss` reads of `self.accelerator`, as accelerate's `Accelerator` gives it when each of
    `num_processes` (≥ 2) processes holds the same rows: `gather` concatenates the copies along the first dimension (a
    scalar becomes one value per process) and `reduce` sums or averages them. One process is a real `Accelerator`."""

    def __init__(self, num_processes: int):
        assert num_processes >= 2, "one process: use accelerate's own Accelerator"
        self.num_processes = num_processes

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor.reshape(1) if tensor.dim() == 0 else tensor] * self.num_processes)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor * self.num_processes if reduction == "sum" else tensor


def _stand_in(per_token_logps, **attributes):
    """Just what TRL's `_compute_loss` reads from `self`; the "model" returns the given per-token log-probs."""
    stub = SimpleNamespace(
        model=_Model(),
        accelerator=Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
    )
    for key, value in attributes.items():
        setattr(stub, key, value)
    return stub


def _rollout(seed, n=6, length=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, length, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(n, length, generator=g, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(n, length, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])
    mask = (torch.arange(length) < lengths.unsqueeze(1)).long()
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return logps, old, ref, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(loss_type, level, beta):
    from trl.trainer.grpo_trainer import GRPOTrainer

    logps, old, ref, mask, adv = _rollout(5)  # a seed where both clip sides and δ are active, at both levels
    ga, procs, spg, max_len, eps_low, eps_high, delta = 2, 2, 4, 7, 0.2, 0.28, (None if beta else 1.5)
    num_items = torch.tensor(40.0, dtype=torch.float64)
    stub = _stand_in(
        logps, top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=ga,
        max_completion_length=max_len,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=spg),
    )
    stub.accelerator = _IdenticalProcesses(procs)
    n = logps.shape[0]
    inputs = {
        "prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.ones_like(mask), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": num_items,
    }
    trl_loss = GRPOTrainer._compute_loss(stub, None, inputs)

    log_ratio = losses.log_importance_weights(logps, old, mask, level)
    per_token = losses.clipped_surrogate_loss(log_ratio, adv, eps_low, eps_high, delta=delta)
    if beta:
        per_token = per_token + beta * losses.k3_kl(logps, ref)
    ours = losses.aggregate_token_loss(
        per_token, mask, loss_type, max_completion_length=max_len, num_items_in_batch=num_items,
        gradient_accumulation_steps=ga, num_processes=procs, steps_per_generation=spg,
    )
    close(ours, trl_loss, tol=1e-6)

    metrics = stub._metrics["train"]
    fractions = losses.clip_fractions(log_ratio, adv, mask, eps_low, eps_high)
    assert fractions["low_mean"] > 0 and fractions["high_mean"] > 0  # the comparison is not vacuous
    for name in ("low_mean", "high_mean", "region_mean"):
        close(fractions[name], metrics[f"clip_ratio/{name}"][0], tol=1e-6)
    close(torch.nan_to_num(fractions["low_per_seq"], nan=2.0).min(), metrics["clip_ratio/low_min"][0], tol=1e-6)
    close(torch.nan_to_num(fractions["high_per_seq"], nan=-1.0).max(), metrics["clip_ratio/high_max"][0], tol=1e-6)
    if beta:
        close(losses.masked_mean(losses.k3_kl(logps, ref), mask), metrics["kl"][0], tol=1e-6)


def test_rloo_loss_matches_trl():
    from trl.trainer.rloo_trainer import RLOOTrainer

    logps, old, _, mask, adv = _rollout(5)
    stub = _stand_in(logps, epsilon_low=0.2, epsilon_high=0.28)
    n = logps.shape[0]
    inputs = {
        "prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.ones_like(mask), "completion_mask": mask, "advantages": adv,
        "old_logps": (old * mask).sum(1),
    }
    trl_loss = RLOOTrainer._compute_loss(stub, None, inputs)

    log_ratio = losses.log_importance_weights(logps, old, mask, "sequence_sum")  # RLOO clips π(y)/π_old(y)
    ours = losses.clipped_surrogate_loss(log_ratio, adv, 0.2, 0.28).mean()
    close(ours, trl_loss, tol=1e-6)
    fractions = losses.clip_fractions(log_ratio, adv, mask, 0.2, 0.28)
    assert fractions["low_mean"] > 0 and fractions["high_mean"] > 0
    for name in ("low_mean", "high_mean", "region_mean"):
        close(fractions[name], stub._metrics["train"][f"clip_ratio/{name}"][0], tol=1e-6)
