"""The PPO section of `hf_align.losses` (GAE, clipped value loss, explained variance, KL controllers) against values
worked out by hand. The arithmetic is written out next to each expectation."""

from __future__ import annotations

import math

import pytest
import torch

from hf_align import losses


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-12):
    expected = torch.as_tensor(expected, dtype=torch.float64) if not isinstance(expected, torch.Tensor) else expected
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------------------ GAE

GAMMA, LAM = 0.9, 0.8  # γλ = 0.72


def test_gae_by_hand():
    """T = 3, r = (0.5, -1, 2), V = (1, 0.5, 1.5), γ = 0.9, λ = 0.8; V after the last token is 0.
        δ2 = 2   + 0.9·0   - 1.5 =  0.5
        δ1 = -1  + 0.9·1.5 - 0.5 = -0.15
        δ0 = 0.5 + 0.9·0.5 - 1   = -0.05
        A2 = 0.5
        A1 = -0.15 + 0.72·0.5  = 0.21
        A0 = -0.05 + 0.72·0.21 = 0.1012
        R  = A + V = (1.1012, 0.71, 2.0)"""
    rewards, values, mask = t(0.5, -1.0, 2.0)[None], t(1.0, 0.5, 1.5)[None], torch.ones(1, 3)
    advantages, returns = losses.generalized_advantage_estimation(rewards, values, mask, GAMMA, LAM)
    close(advantages, [[0.1012, 0.21, 0.5]])
    close(returns, [[1.1012, 0.71, 2.0]])


def test_gae_ragged_masks_offsets_holes_and_empty_rows():
    """Row 0: the sequence above. Row 1: two tokens, then padding holding garbage (ignored):
        δ1 = 1 - 0.4 = 0.6, δ0 = 1 + 0.9·0.4 - 0.2 = 1.16; A1 = 0.6, A0 = 1.16 + 0.72·0.6 = 1.592.
    Row 2: row 1's tokens starting at column 1 (the completion need not start at column 0). Row 3: row 1's tokens with
    a masked-out position between them (skipped: the successor of a token is the next masked-in token). Row 4: no
    token at all."""
    g = 99.0  # garbage at masked-out positions
    rewards = t(0.5, -1.0, 2.0, 1.0, 1.0, g, g, 1.0, 1.0, 1.0, g, 1.0, g, g, g).view(5, 3)
    values = t(1.0, 0.5, 1.5, 0.2, 0.4, g, g, 0.2, 0.4, 0.2, g, 0.4, g, g, g).view(5, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    advantages, returns = losses.generalized_advantage_estimation(rewards, values, mask, GAMMA, LAM)
    close(advantages, [[0.1012, 0.21, 0.5], [1.592, 0.6, 0], [0, 1.592, 0.6], [1.592, 0, 0.6], [0, 0, 0]])
    close(returns, [[1.1012, 0.71, 2.0], [1.792, 1.0, 0], [0, 1.792, 1.0], [1.792, 0, 1.0], [0, 0, 0]])
    # A float mask gives the same.
    advantages_f, _ = losses.generalized_advantage_estimation(rewards, values, mask.double(), GAMMA, LAM)
    close(advantages_f, advantages)


def _ragged_batch(seed=0, n=4, length=6):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, length, generator=generator, dtype=torch.float64)
    values = torch.randn(n, length, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([length, 3, 1, 5])
    mask = torch.arange(length)[None] < lengths[:, None]
    return rewards, values, mask


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = _ragged_batch()
    advantages, returns = losses.generalized_advantage_estimation(rewards, values, mask, 1.0, 1.0)
    reward_to_go = losses.discounted_returns(rewards, mask, 1.0)
    close(advantages, (reward_to_go - values) * mask, tol=1e-10)
    close(returns, reward_to_go, tol=1e-10)  # with λ = 1 the value targets are the Monte-Carlo returns


def test_gae_lambda_one_and_zero():
    rewards, values, mask = _ragged_batch(seed=1)
    # λ = 1: γ-discounted reward-to-go minus the value.
    advantages, _ = losses.generalized_advantage_estimation(rewards, values, mask, GAMMA, 1.0)
    close(advantages, (losses.discounted_returns(rewards, mask, GAMMA) - values) * mask, tol=1e-10)
    # λ = 0: the one-step TD error δ_t = r_t + γ V_{t+1} - V_t (V = 0 after each row's last token).
    advantages, _ = losses.generalized_advantage_estimation(rewards, values, mask, GAMMA, 0.0)
    next_values = torch.nn.functional.pad((values * mask)[:, 1:], (0, 1))
    close(advantages, (rewards + GAMMA * next_values - values) * mask, tol=1e-10)


# ------------------------------------------------------------------------------------------------ value loss


def test_clipped_value_loss_by_hand():
    """ε_v = 0.2; per token (V, V_old, R) → unclipped (V-R)², clipped (clip(V, V_old ± 0.2) - R)², max:
        a (1.0, 0.5, 1.5): 0.25, clip → 0.7: 0.64 → 0.64, clipped term larger
        b (2.0, 2.1, 1.0): 1.00, clip → 2.0: 1.00 → 1.00, equal (not counted as clipped)
        c (0.5, 1.0, 0.6): 0.01, clip → 0.8: 0.04 → 0.04, clipped term larger
        d (1.0, 0.5, 0.0): 1.00, clip → 0.7: 0.49 → 1.00, unclipped larger
        e: masked out (garbage)
    loss = 0.5 · (0.64 + 1 + 0.04 + 1) / 4 = 0.335; clip fraction = 2 / 4."""
    values = t(1.0, 2.0, 0.5, 1.0, 50.0).view(1, 5).requires_grad_()
    old_values = t(0.5, 2.1, 1.0, 0.5, -50.0).view(1, 5)
    returns = t(1.5, 1.0, 0.6, 0.0, 7.0).view(1, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clip_fraction = losses.clipped_value_loss(values, old_values, returns, mask, 0.2)
    close(loss, 0.335)
    close(clip_fraction, 0.5)
    loss.backward()
    # d/dV of 0.5 · mean: (V - R) / 4 where the unclipped term is used; 0 where the clipped one is (a, c) and at e.
    close(values.grad, [[0.0, 0.25, 0.0, 0.25, 0.0]])
    # No clipping: the plain 0.5 · mean (V - R)² = 0.5 · (0.25 + 1 + 0.01 + 1) / 4 = 0.2825.
    plain, fraction = losses.clipped_value_loss(values, old_values, returns, mask, None)
    close(plain, 0.2825)
    close(fraction, 0.0)
    # An empty mask gives 0, not NaN.
    empty = losses.clipped_value_loss(values, old_values, returns, torch.zeros_like(mask), 0.2)
    close(empty[0], 0.0)
    close(empty[1], 0.0)


# ------------------------------------------------------------------------------------------ explained variance


def test_explained_variance_by_hand():
    returns = t(1.0, 2.0, 3.0, 4.0, 99.0, 99.0).view(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(losses.explained_variance(returns, returns, mask), 1.0)  # perfect
    close(losses.explained_variance(torch.full_like(returns, 7.0), returns, mask), 0.0)  # any constant
    # V = (1, 2, 3, 5): R - V = (0, 0, 0, -1), Var = 1/4 - 1/16 = 3/16; Var[R] = 5/4 → 1 - (3/16)/(5/4) = 0.85.
    values = t(1.0, 2.0, 3.0, 5.0, -8.0, 123.0).view(2, 3)
    close(losses.explained_variance(values, returns, mask), 0.85)
    # Worse than a constant: V = R reversed, R - V = (-3, -1, 1, 3), Var = 5 → 1 - 5 / 1.25 = -3.
    close(losses.explained_variance(t(4.0, 3.0, 2.0, 1.0, 0, 0).view(2, 3), returns, mask), -3.0)
    # Constant returns: undefined.
    assert math.isnan(float(losses.explained_variance(values, torch.ones_like(returns), mask)))


# --------------------------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    controller = losses.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # KL = 9: e = clip(9/6 - 1 = 0.5, ±0.2) = 0.2; β = 0.2 · (1 + 0.2 · 256/10000) = 0.2 · 1.00512 = 0.201024
    assert controller.update(9.0, 256) == pytest.approx(0.201024, abs=1e-15)
    # KL = 5.4 (a tensor): e = 5.4/6 - 1 = -0.1; β = 0.201024 · (1 - 0.1 · 1000/10000) = 0.201024 · 0.99
    assert controller.update(torch.tensor(5.4, dtype=torch.float64), 1000) == pytest.approx(0.19901376, abs=1e-15)
    assert controller.value == pytest.approx(0.19901376, abs=1e-15)
    # KL = 0: e = clip(-1) = -0.2; β = 0.19901376 · (1 - 0.2 · 0.5) = 0.179112384
    assert controller.update(0.0, 5000) == pytest.approx(0.179112384, abs=1e-15)
    # On target: unchanged.
    assert controller.update(6.0, 5000) == pytest.approx(0.179112384, abs=1e-15)
    with pytest.raises(ValueError):
        losses.AdaptiveKLController(0.1, target=0.0, horizon=1)


def test_fixed_kl_controller():
    controller = losses.FixedKLController(0.05)
    assert controller.update(100.0, 64) == 0.05 and controller.update(torch.tensor(0.0), 1) == 0.05
    assert controller.value == 0.05
