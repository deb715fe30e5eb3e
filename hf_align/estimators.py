"""Advantage estimators of the online trainers, registered by name: pure functions from a generation batch's rewards
(and whatever else they declare: the sampling policy's token log-probs, the critic's values, a greedy baseline) to
advantages. The engine (`online.OnlineTrainer.estimate`) supplies what an estimator declares, gathered from every
process, and keeps each process's rows of the result; a trainer only chooses an estimator and its options.

Every tensor below is over the whole generation batch of every process, rows prompt-major (row `i * G + g` is the
`g`-th completion of prompt `i`), per-token tensors `[N, C]` right-padded with 0 to the longest completion. A reward of
NaN means no reward function applied to the completion.

| name                   | paper                   | needs                            | advantages        |
|------------------------|-------------------------|----------------------------------|-------------------|
| `group_relative`       | GRPO 2402.03300         |                                  | `[N]`             |
| `decoupled`            | GDPO 2601.05242         |                                  | `[N]`             |
| `leave_one_out`        | RLOO 2402.14740         | old log-probs when β ≠ 0         | `[N]`             |
| `greedy_baseline`      | ReMax 2310.10505        | greedy rewards; old log-probs when β ≠ 0 | `[N]`     |
| `reinforce_returns`    | Williams 1992           | old log-probs when β ≠ 0         | `[N, C]`          |
| `reinforce++`          | REINFORCE++ 2501.03262  | old log-probs when β ≠ 0         | `[N, C]`          |
| `gae`                  | GAE 1506.02438 (PPO)    | old log-probs, values            | `[N, C]`, returns |

The KL-in-reward estimators take `ref_logps` when the trainer has a reference (β ≠ 0), and return each sequence's
summed k1 KL `log π_old - log π_ref` (`Estimate.sequence_kl`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import losses


@dataclass(frozen=True)
class EstimatorInputs:
    """What an estimator reads: always the rewards, the rest when it declares it (else None)."""

    rewards_per_func: torch.Tensor  # [N, F] each reward function's score
    reward_weights: torch.Tensor  # [F]
    rewards: torch.Tensor  # [N] the weighted sum plus any reward shaping (e.g. DAPO's overlong penalty)
    group_size: int
    mask: torch.Tensor  # [N, C] the loss tokens (sampled, not tool results)
    is_truncated: torch.Tensor  # [N] bool
    old_logps: torch.Tensor | None = None  # [N, C] under the sampling policy
    ref_logps: torch.Tensor | None = None  # [N, C] under the reference (β ≠ 0)
    values: torch.Tensor | None = None  # [N, C] the critic's
    greedy_rewards: torch.Tensor | None = None  # [N / G] the reward of each prompt's greedy completion


@dataclass
class Estimate:
    advantages: torch.Tensor  # [N] or [N, C]
    returns: torch.Tensor | None = None  # [N, C] the critic's targets
    trained_rows: torch.Tensor | None = None  # [N] bool: rows left in the loss (None: all)
    zero_std: torch.Tensor | None = None  # [N] bool: rows whose group (or batch) rewards all tie
    sequence_kl: torch.Tensor | None = None  # [N] the KL taken out of each sequence's reward
    metrics: dict[str, float] = field(default_factory=dict)  # already over every process


@dataclass(frozen=True)
class Registered:
    function: Callable[..., Estimate]
    needs: Callable[[dict], frozenset[str]]  # of the options: the EstimatorInputs fields it reads beyond the rewards


ESTIMATORS: dict[str, Registered] = {}
SUPPLIED = frozenset({"old_logps", "values", "greedy_rewards"})


def register(name: str, needs: tuple[str, ...] = (), kl_in_reward: bool = False):
    """Registers an estimator. `needs`: the inputs it always reads; `kl_in_reward`: it also reads the old log-probs
    when its `beta` option is not 0."""

    def decorator(function):
        def declared(options: dict) -> frozenset[str]:
            kl = ("old_logps",) if kl_in_reward and options.get("beta", 0) != 0 else ()
            return frozenset(needs + kl)

        ESTIMATORS[name] = Registered(function, declared)
        return function

    return decorator


@dataclass(frozen=True)
class Estimator:
    """A registered estimator with its options bound (what a trainer chooses)."""

    name: str
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in ESTIMATORS:
            raise ValueError(f"Unknown advantage estimator {self.name!r}; expected one of {sorted(ESTIMATORS)}.")
        accepted = set(inspect.signature(ESTIMATORS[self.name].function).parameters) - {"inputs"}
        unknown = set(self.options) - accepted
        if unknown:
            raise ValueError(f"The {self.name} estimator takes no option {sorted(unknown)}; it takes {sorted(accepted)}.")

    @property
    def needs(self) -> frozenset[str]:
        return ESTIMATORS[self.name].needs(self.options)

    def __call__(self, inputs: EstimatorInputs) -> Estimate:
        return ESTIMATORS[self.name].function(inputs, **self.options)


def _kl_in_reward(inputs: EstimatorInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The rewards less `β Σ_t (log π_old - log π_ref)` (k1, RLOO §2: `losses.sequence_kl_penalised_rewards`), the
    sequence KLs and the `kl` metric (the token mean of the log-ratio); the rewards as they are with β = 0."""
    if beta == 0:
        return inputs.rewards, None, {}
    token_kl = inputs.old_logps - inputs.ref_logps
    sequence_kl = (token_kl * inputs.mask.to(token_kl.dtype)).sum(-1)
    rewards = losses.sequence_kl_penalised_rewards(inputs.rewards, inputs.old_logps, inputs.ref_logps, inputs.mask,
                                                   beta)
    return rewards, sequence_kl, _kl_metric(token_kl, inputs.mask)


def _kl_metric(token_kl: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """`kl`: the token mean of the k1 log-ratio over the loss tokens (none when there are none)."""
    return {"kl": losses.masked_mean(token_kl, mask).item()} if mask.sum() > 0 else {}


@register("group_relative")
def group_relative(inputs: EstimatorInputs, scale: str = "group") -> Estimate:
    """GRPO (arXiv 2402.03300, §4.1.2): `A_i = (r_i - mean_G(r)) / (std(r) + 1e-4)`, the std of the group, of the
    batch, or none (Dr. GRPO, arXiv 2503.20783) as `scale` says (`losses.group_relative_advantages`). `[N]`."""
    zero_std = losses.reward_std_is_zero(inputs.rewards, inputs.group_size, scale)
    return Estimate(losses.group_relative_advantages(inputs.rewards, inputs.group_size, scale), zero_std=zero_std)


@register("decoupled")
def decoupled(inputs: EstimatorInputs) -> Estimate:
    """GDPO's reward-decoupled normalisation (TRL's `multi_objective_aggregation="normalize_then_sum"`): each reward
    normalised in its group, weighted, summed, then normalised over the batch (`losses.decoupled_group_advantages`).
    A zero advantage comes from the batch std of the summed normalised rewards, as in TRL. `[N]`."""
    summed = losses.decoupled_group_rewards(inputs.rewards_per_func, inputs.reward_weights, inputs.group_size)
    return Estimate(
        losses.decoupled_group_advantages(inputs.rewards_per_func, inputs.reward_weights, inputs.group_size),
        zero_std=losses.reward_std_is_zero(summed, inputs.group_size, scale="batch"),
    )


@register("leave_one_out", kl_in_reward=True)
def leave_one_out(inputs: EstimatorInputs, beta: float = 0.0, normalize: bool = False,
                  reward_clip_range: list[float] | None = None) -> Estimate:
    """RLOO (arXiv 2402.14740, eq. 6): `A_i = r_i - mean_{j ≠ i} r_j` within the group, on rewards clipped to
    `reward_clip_range` and less `β` times the sequence KL; optionally normalised over the batch
    (`losses.leave_one_out_advantages`). `[N]`."""
    rewards = inputs.rewards
    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    rewards, sequence_kl, metrics = _kl_in_reward(dataclasses.replace(inputs, rewards=rewards), beta)
    return Estimate(losses.leave_one_out_advantages(rewards, inputs.group_size, normalize=normalize),
                    zero_std=losses.reward_std_is_zero(rewards, inputs.group_size), sequence_kl=sequence_kl,
                    metrics=metrics)


@register("greedy_baseline", needs=("greedy_rewards",), kl_in_reward=True)
def greedy_baseline(inputs: EstimatorInputs, beta: float = 0.0) -> Estimate:
    """ReMax (arXiv 2310.10505, Algorithm 1): `A_i = r_i - r(greedy completion of the prompt)`, the rewards less `β`
    times the sequence KL (`losses.greedy_baseline_advantages`). `[N]`."""
    rewards, sequence_kl, metrics = _kl_in_reward(inputs, beta)
    metrics["greedy_reward"] = torch.nanmean(inputs.greedy_rewards).item()
    return Estimate(losses.greedy_baseline_advantages(rewards, inputs.greedy_rewards, inputs.group_size),
                    sequence_kl=sequence_kl, metrics=metrics)


def _token_returns(inputs: EstimatorInputs, scores: torch.Tensor, beta: float, gamma: float,
                   clip: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The returns-to-go `G_t` `[N, C]` from the completions' scores `[N]` (NaN: unscorable, the row is masked out
    and its returns are 0), clipped to `clip` first, with the k1 KL penalty per token when β ≠ 0
    (`losses.kl_penalised_token_rewards`, `losses.discounted_returns`); the mask they are defined on; the `kl`
    metric."""
    mask = inputs.mask.to(scores.dtype) * (~torch.isnan(scores))[:, None]
    metrics = {}
    if beta != 0:
        kl = (inputs.old_logps - inputs.ref_logps).to(scores.dtype)
        metrics = _kl_metric(kl, inputs.mask)
    else:
        kl = torch.zeros_like(mask)
    token_rewards = losses.kl_penalised_token_rewards(scores.nan_to_num(), kl, mask, beta, clip)
    return losses.discounted_returns(token_rewards, mask, gamma), mask, metrics


@register("reinforce_returns", kl_in_reward=True)
def reinforce_returns(inputs: EstimatorInputs, beta: float = 0.0, gamma: float = 1.0) -> Estimate:
    """REINFORCE (Williams 1992) with a leave-one-out baseline: `A_t = G_t - b`, `G_t` the (KL-penalised)
    return-to-go and `b` the mean total return `G_0` of the group's other completions, written
    `(G_t - G_0) + (G_0 - b)`. Completions with no token to train on are left out of the baselines. `[N, C]`."""
    scores = inputs.rewards
    returns, mask, metrics = _token_returns(inputs, scores, beta, gamma)
    totals = returns[:, 0].masked_fill(mask[:, 0] == 0, float("nan"))
    advantages = (returns - returns[:, :1] + losses.leave_one_out_advantages(totals, inputs.group_size)[:, None]) * mask
    return Estimate(advantages, zero_std=losses.reward_std_is_zero(scores, inputs.group_size), metrics=metrics)


@register("reinforce++", kl_in_reward=True)
def reinforce_plus_plus(inputs: EstimatorInputs, beta: float = 0.0, gamma: float = 1.0,
                        reward_clip_range: list[float] | None = None, group_baseline: bool = False) -> Estimate:
    """REINFORCE++ (arXiv 2501.03262, §3): the KL-penalised returns-to-go of scores clipped to `reward_clip_range`,
    whitened over the whole batch; with `group_baseline` (`reinforce++_baseline`) each score less its group's mean
    first. Without the baseline only a batch whose scores all tie teaches nothing. `[N, C]`."""
    scores = inputs.rewards
    zero_std = losses.reward_std_is_zero(scores, inputs.group_size, "group" if group_baseline else "batch")
    if group_baseline:
        scores = torch.where(torch.isnan(scores), scores, losses.group_mean_baseline(scores, inputs.group_size))
    returns, mask, metrics = _token_returns(inputs, scores, beta, gamma, clip=reward_clip_range)
    return Estimate(losses.masked_whiten(returns, mask), zero_std=zero_std, metrics=metrics)


@register("gae", needs=("old_logps", "values"))
def generalized_advantages(inputs: EstimatorInputs, beta: float = 0.0, gamma: float = 1.0, lam: float = 0.95,
                           whiten_rewards: bool = False, missing_eos_penalty: float | None = None) -> Estimate:
    """PPO's estimator (arXiv 1707.06347; TRL's PPOTrainer): the score at each completion's last token less
    `missing_eos_penalty` for a truncated one, minus `β` times the per-token k1 KL (`losses.kl_penalised_token_rewards`,
    optionally whitened without shifting the mean), then GAE(γ, λ) (arXiv 1506.02438) against the critic's values;
    advantages whitened over the batch (`[N, C]`), returns the critic's targets. A completion no reward function
    applies to leaves the loss. Metrics: TRL's `objective/*`."""
    scorable = ~torch.isnan(inputs.rewards)
    mask = (inputs.mask * scorable[:, None]).float()
    scores = inputs.rewards.nan_to_num(0.0)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * inputs.is_truncated.float()
    token_kl = (inputs.old_logps - inputs.ref_logps) * mask if inputs.ref_logps is not None else torch.zeros_like(mask)
    token_rewards = losses.kl_penalised_token_rewards(scores, token_kl, mask, beta)
    if whiten_rewards:
        token_rewards = losses.masked_whiten(token_rewards, mask, shift_mean=False)
    advantages, returns = losses.generalized_advantage_estimation(token_rewards, inputs.values, mask, gamma, lam)
    sequence_kl = token_kl.sum(-1)
    metrics = {"objective/kl": sequence_kl.mean().item(), "objective/kl_coef": beta,
               "objective/scores": scores.mean().item(),
               "objective/rlhf_reward": (scores - beta * sequence_kl).mean().item()}
    return Estimate(losses.masked_whiten(advantages, mask), returns=returns, trained_rows=scorable,
                    sequence_kl=sequence_kl, metrics=metrics)
