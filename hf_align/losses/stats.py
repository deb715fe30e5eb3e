"""Masked and NaN-aware statistics of the online trainers' losses and advantages: `mask` is 1 on the elements that
count, NaN marks an unscorable reward."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`Σ mask · values / max(Σ mask, 1)` over all elements (`dim=None`, a scalar) or along `dim`. A row with no
    masked-in element gives 0 (the `clamp(min=1)` TRL uses in its losses). `values`, `mask` broadcastable."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of the masked-in elements of `values` (all of them together; a scalar): `Σ mask (v - μ)² / n`, or
    `/ (n - 1)` with `unbiased=True` (0 when `n ≤ 1`), `μ = masked_mean(values, mask)`, `n = Σ mask`."""
    mask = mask.to(values.dtype)
    centred = (values - masked_mean(values, mask)) * mask
    count = mask.sum()
    denominator = (count - 1).clamp(min=1.0) if unbiased else count.clamp(min=1.0)
    return (centred**2).sum() / denominator


def masked_std(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """`sqrt(masked_var(values, mask, unbiased))`, a scalar."""
    return masked_var(values, mask, unbiased).sqrt()


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++'s advantage normalisation (arXiv 2501.03262, §3): whiten over the whole batch (every masked-in
    token of every row together, not per group), `(v - μ) / sqrt(σ² + eps)`; with `shift_mean=False` the mean is
    added back, `(v - μ) / sqrt(σ² + eps) + μ`. The variance is the biased (population) one by default, as
    OpenRLHF's REINFORCE++ uses (`unbiased=True` for Bessel's correction). Returns `[N, T]`, 0 at masked-out
    positions."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask, unbiased) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def nan_std(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (`/ (n - 1)`, `n` the count of non-NaN values);
    NaN where `n ≤ 1`. The same estimator as `trl.trainer.utils.nanstd`, which TRL 1.16 uses for every reward std."""
    if dim is None:
        std = nan_std(values.reshape(-1), dim=0)
        return std.reshape([1] * values.dim()) if keepdim else std
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    squares = torch.nansum((values - torch.nanmean(values, dim=dim, keepdim=True)) ** 2, dim=dim, keepdim=True)
    variance = torch.where(count > 1, squares / (count - 1).clamp(min=1), torch.full_like(squares, float("nan")))
    std = variance.sqrt()
    return std if keepdim else std.squeeze(dim)
