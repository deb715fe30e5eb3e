"""Alignment objectives as pure functions of tensors, one module per family:

- `preference`: the DPO family, IPO, ORPO, SimPO, CPO, KTO and the Bradley–Terry reward-model loss;
- `supervised`: the NLL, DFT and distributional GDPO's belief losses;
- `advantages`: the online trainers' rewards, advantages and returns (group-relative, leave-one-out, greedy baseline,
  KL-penalised rewards, reward-decoupled, GAE);
- `policy`: the policy-gradient losses, importance weights, clipping, token masks and loss aggregation;
- `value`: PPO's value loss, explained variance and KL-coefficient controllers;
- `stats`: masked and NaN-aware statistics.

Every public name is re-exported here, so callers write `losses.dpo_loss(...)` whatever the family.
"""

from .preference import (
    dpo_logit,
    F_DIVERGENCE_TYPES,
    f_divergence_scores,
    length_normalized_logit,
    dpo_sigmoid_loss,
    dpo_hinge_loss,
    dpo_robust_loss,
    ipo_loss,
    exo_pair_loss,
    nca_pair_loss,
    bco_pair_loss,
    sppo_hard_loss,
    aot_loss,
    apo_zero_loss,
    apo_down_loss,
    discopop_loss,
    length_desensitized_logps,
    wpo_weights,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    dpo_loss,
    bradley_terry_loss,
    LN2,
    log1mexp,
    log_odds,
    orpo_odds_ratio_loss,
    orpo_loss,
    simpo_loss,
    CPO_LOSS_TYPES,
    CPO_MEAN_LOGP_LOSS_TYPES,
    CPO_LABEL_SMOOTHING_LOSS_TYPES,
    alphapo_reward,
    cpo_loss,
    kto_loss,
)
from .supervised import (
    masked_nll,
    dft_loss,
    belief_log_distribution,
    belief_calibration_kl,
    sequence_mean_nll,
)
from .advantages import (
    ADVANTAGE_EPS,
    REWARD_SCALES,
    weighted_reward_sum,
    group_relative_advantages,
    reward_std_is_zero,
    soft_overlong_penalty,
    leave_one_out_advantages,
    sequence_kl_penalised_rewards,
    greedy_baseline_advantages,
    group_mean_baseline,
    kl_penalised_token_rewards,
    discounted_returns,
    decoupled_group_rewards,
    decoupled_group_advantages,
    generalized_advantage_estimation,
)
from .policy import (
    PG_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    log_importance_weights,
    clipped_surrogate_loss,
    clip_fractions,
    k3_kl,
    sapo_loss,
    weighted_reinforce_loss,
    cispo_weights,
    VESPO_LOG_WEIGHT_RANGE,
    vespo_weights,
    off_policy_sequence_mask,
    high_entropy_mask,
    adaptive_entropy_coef,
    aggregate_token_loss,
    reinforce_loss,
)
from .value import (
    clipped_value_loss,
    explained_variance,
    AdaptiveKLController,
    FixedKLController,
)
from .stats import (
    masked_mean,
    masked_var,
    masked_std,
    masked_whiten,
    nan_std,
)
