"""The advantage estimators (`hf_align.estimators`): each registered function against hand computations, what each
declares it reads, and the registry's errors. The trainers' parity tests compare the same numbers with TRL."""

from __future__ import annotations

import math

import pytest
import torch

from hf_align import estimators


def inputs(rewards, group_size=2, **fields):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    n = rewards.numel()
    settings = dict(rewards_per_func=rewards[:, None], reward_weights=torch.ones(1), rewards=rewards,
                    group_size=group_size, mask=torch.ones(n, 3), is_truncated=torch.zeros(n, dtype=torch.bool))
    return estimators.EstimatorInputs(**{**settings, **fields})


def test_every_estimator_is_registered_with_what_it_reads():
    assert sorted(estimators.ESTIMATORS) == ["decoupled", "gae", "greedy_baseline", "group_relative",
                                             "leave_one_out", "reinforce++", "reinforce_returns"]
    assert estimators.Estimator("group_relative").needs == frozenset()
    assert estimators.Estimator("gae").needs == {"old_logps", "values"}
    assert estimators.Estimator("greedy_baseline").needs == {"greedy_rewards"}
    # The KL in the reward is measured with the sampling policy: old log-probs only when β ≠ 0.
    assert estimators.Estimator("leave_one_out", {"beta": 0.0}).needs == frozenset()
    assert estimators.Estimator("leave_one_out", {"beta": 0.1}).needs == {"old_logps"}
    assert estimators.Estimator("reinforce++", {"beta": 0.1}).needs == {"old_logps"}
    for estimator in estimators.ESTIMATORS:
        assert estimators.ESTIMATORS[estimator].needs({"beta": 1.0}) <= estimators.SUPPLIED


def test_unknown_estimators_and_options_are_errors():
    with pytest.raises(ValueError, match="Unknown advantage estimator 'ppo'"):
        estimators.Estimator("ppo")
    with pytest.raises(ValueError, match=r"takes no option \['gamma'\]"):
        estimators.Estimator("group_relative", {"gamma": 0.9})


def test_group_relative_by_hand():
    estimate = estimators.Estimator("group_relative")(inputs([1.0, 3.0, 2.0, 2.0]))
    std = math.sqrt(2.0)  # unbiased std of (1, 3)
    expected = torch.tensor([-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0])
    torch.testing.assert_close(estimate.advantages, expected)
    assert estimate.zero_std.tolist() == [False, False, True, True]
    unscaled = estimators.Estimator("group_relative", {"scale": "none"})(inputs([1.0, 3.0, 2.0, 2.0]))
    torch.testing.assert_close(unscaled.advantages, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_leave_one_out_with_the_kl_in_the_reward_by_hand():
    old = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 0.0, 0.0]])
    ref = torch.zeros(4, 3) - 1.0
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    estimate = estimators.Estimator("leave_one_out", {"beta": 0.5, "reward_clip_range": [-10.0, 2.5]})(
        inputs([1.0, 5.0, 2.0, 0.0], old_logps=old, ref_logps=ref, mask=mask))
    sequence_kl = torch.tensor([1.0 + 0.0, 0.0, 1.0, -2.0 + 1.0 + 1.0])  # Σ mask (old - ref)
    rewards = torch.tensor([1.0, 2.5, 2.0, 0.0]) - 0.5 * sequence_kl  # clipped, then penalised
    torch.testing.assert_close(estimate.sequence_kl, sequence_kl)
    # G = 2: each completion against the other one of its group.
    expected = torch.stack([rewards[0] - rewards[1], rewards[1] - rewards[0], rewards[2] - rewards[3],
                            rewards[3] - rewards[2]])
    torch.testing.assert_close(estimate.advantages, expected)
    assert estimate.metrics["kl"] == pytest.approx(float(sequence_kl.sum() / mask.sum()))


def test_greedy_baseline_by_hand():
    estimate = estimators.Estimator("greedy_baseline")(
        inputs([4.0, 1.0, 3.0, 3.0], greedy_rewards=torch.tensor([2.0, 5.0])))
    torch.testing.assert_close(estimate.advantages, torch.tensor([2.0, -1.0, -2.0, -2.0]))
    assert estimate.metrics["greedy_reward"] == pytest.approx(3.5)


def test_reinforce_returns_are_returns_to_go_minus_the_others_mean_total():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    estimate = estimators.Estimator("reinforce_returns", {"gamma": 0.5})(inputs([4.0, 2.0], mask=mask))
    # Rewards at the last token: row 0 returns (1, 2, 4), row 1 (1, 2); each baseline is the other's total G_0.
    expected = torch.tensor([[1.0 - 1.0, 2.0 - 1.0, 4.0 - 1.0], [1.0 - 1.0, 2.0 - 1.0, 0.0]])
    torch.testing.assert_close(estimate.advantages, expected)


def test_reinforce_plus_plus_whitens_the_returns_over_the_batch():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    estimate = estimators.Estimator("reinforce++", {"reward_clip_range": [-1.0, 1.0]})(
        inputs([3.0, -2.0, 0.5, 0.0], mask=mask))
    returns = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])  # γ = 1, clipped
    tokens = returns[mask.bool()]
    whitened = (returns - tokens.mean()) / torch.sqrt(tokens.var(unbiased=False) + 1e-8) * mask
    torch.testing.assert_close(estimate.advantages, whitened)


def test_gae_leaves_unscorable_rows_out_and_penalises_missing_stop_tokens():
    values = torch.tensor([[0.5, 0.25, 0.0], [0.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    estimate = estimators.Estimator("gae", {"gamma": 1.0, "lam": 1.0, "missing_eos_penalty": 1.0})(inputs(
        [2.0, float("nan")], group_size=1, values=values, old_logps=old, mask=torch.ones(2, 3),
        is_truncated=torch.tensor([True, False])))
    assert estimate.trained_rows.tolist() == [True, False]
    # λ = γ = 1: returns are the reward-to-go (2 - 1 at the last token), advantages returns - values, then whitened.
    torch.testing.assert_close(estimate.returns[0], torch.tensor([1.0, 1.0, 1.0]))
    raw = torch.tensor([0.5, 0.75, 1.0])
    torch.testing.assert_close(estimate.advantages[0], (raw - raw.mean()) / torch.sqrt(raw.var(unbiased=False) + 1e-8))
    assert estimate.advantages[1].abs().sum() == 0
    assert estimate.metrics["objective/scores"] == pytest.approx(0.5)  # (2 - 1 + 0) / 2: NaN scores count 0
