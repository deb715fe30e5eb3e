"""Likelihood objectives on given completions: SFT's NLL, DFT, and distributional GDPO's belief losses."""

from __future__ import annotations

import torch


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
