"""The numerical core of TRPO (Trust Region Policy Optimization, Schulman et al., arXiv 1502.05477) for LLMs.

One TRPO update maximises the surrogate `L(θ) = E[ρ_t A_t]` (`ρ_t = π_θ(y_t | ·) / π_old(y_t | ·)` per completion
token, or any other surrogate closure) subject to `E[KL(π_old ‖ π_θ)] ≤ δ`, over an explicit list of trainable
parameters θ (LoRA adapters typically; any parameter list works, full fine-tuning of a small model included):

1. `g = ∇L(θ_old)` (one forward + backward of the surrogate);
2. `x ≈ (F + λI)⁻¹ g` by conjugate gradient, where `F` is the Hessian of the mean KL at `θ = θ_old` — the Fisher
   information matrix — only ever used through Fisher-vector products (double backprop through the KL);
3. the largest step along `x` whose quadratic KL model `½ β² xᵀFx` equals δ: `β = sqrt(2δ / xᵀFx)`;
4. a backtracking line search on `θ_old + α β x`, `α = 1, ½, ¼, …`, that measures the KL and the surrogate and keeps
   the first step within the trust region that improves the surrogate enough, else restores `θ_old` bit for bit.

Conventions. Closures take no argument and read the parameters in place: `surrogate_fn()` returns the scalar
surrogate to MAXIMISE, `kl_fn()` the scalar mean `KL(π_old ‖ π_θ)`, where "old" is the distribution at the parameters
`trpo_update` starts from (detached; so the KL is 0 there and its Hessian is the Fisher matrix). Both must be
deterministic (model in eval mode: no dropout) and must work under `torch.no_grad()` (the line search evaluates them
so). `sampled_token_kl` and `token_surrogate` build them from per-token log-probs, e.g. from
`hf_align.sequence_logprobs.completion_token_logprobs` (whose chunked LM head supports double backprop). Vectors over the
parameters are flat, in the parameters' dtype promoted to at least float32.

Cost. Each Fisher-vector product is one extra backward pass through the graph of the KL gradient (≈ 2–3× a normal
backward); the KL forward and its `create_graph` gradient are computed once per update and their graph is kept
alive while conjugate gradient runs. Conjugate gradient does `cg_iterations` products (plus one for `xᵀFx`), and
the line search one forward of the surrogate and of the KL per trial (plus one for the surrogate at `θ_old`).
Memory beyond that graph holds about one vector the size of the trainable parameters per CG vector — gradient,
solution, residual, direction, product, plus a saved copy of `θ_old` — i.e. 4–5 vectors: trivial for LoRA adapters
(megabytes), 4–5 extra copies of the weights for full fine-tuning — fine for small models, prohibitive for billions
of parameters, where LoRA-restricted TRPO is the practical choice.

Single process: under DDP the gradient and every Fisher-vector product would have to be averaged across processes,
which is not done here (`torch.autograd.grad` bypasses DDP's gradient hooks).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

Closure = Callable[[], torch.Tensor]


# ------------------------------------------------------------------------------------------ parameter vectors


def work_dtype(params: Iterable[torch.Tensor]) -> torch.dtype:
    """The dtype of flat vectors over `params`: their promoted dtype, at least float32 (bf16 weights are solved in
    fp32)."""
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def flatten(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensors concatenated into one flat vector `[Σ numel]` (cast to `dtype` when given)."""
    parts = [t.reshape(-1) if dtype is None else t.reshape(-1).to(dtype) for t in tensors]
    return torch.cat(parts)


def unflatten_like(vector: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the flat `vector` shaped like each of `params`, in order (`vector` must hold exactly their
    elements); dtypes are `vector`'s."""
    total = sum(p.numel() for p in params)
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"A flat vector of {total} elements is needed for these parameters, "
                         f"got shape {tuple(vector.shape)}.")
    return [piece.view_as(p) for piece, p in zip(vector.split([p.numel() for p in params]), params)]


def flat_grad(output: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool | None = None,
              create_graph: bool = False) -> torch.Tensor:
    """`∇ output` with respect to `params`, flattened `[Σ numel]` (zeros for parameters `output` does not depend
    on). With `create_graph` the result is itself differentiable (double backprop); `retain_graph` defaults to
    `create_graph`, as in `torch.autograd.grad`."""
    grads = torch.autograd.grad(output, params, retain_graph=retain_graph, create_graph=create_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


@torch.no_grad()
def add_to_params(params: Sequence[torch.Tensor], vector: torch.Tensor, scale: float = 1.0) -> None:
    """In place: `θ ← θ + scale · vector` (each piece cast to its parameter's dtype)."""
    for p, piece in zip(params, unflatten_like(vector, params)):
        p.add_(piece.to(p.dtype), alpha=scale)


@torch.no_grad()
def copy_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of `params`, in their own dtypes (restoring them with `restore_params` is exact)."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore_params(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """In place: `θ ← saved`, bit for bit."""
    for p, s in zip(params, saved):
        p.copy_(s)


# --------------------------------------------------------------------------------------- surrogate and KL


def token_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """TRPO's importance-sampled surrogate (arXiv 1502.05477, eq. 14) per completion token, to maximise:
    `L = Σ_t m_t ρ_t A_t / Σ_t m_t` with `ρ_t = exp(logps_t - old_logps_t)`.

    `logps`, `old_logps`, `mask`: `[N, C]`; `advantages`: `[N]` (one per completion) or `[N, C]` (per token).
    Returns a scalar."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logps - old_logps.detach())
    mask = mask.to(ratio.dtype)
    return (ratio * advantages.detach() * mask).sum() / mask.sum().clamp(min=1)


def sampled_token_kl(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token `KL(π_old ‖ π_θ)` over completion tokens sampled from π_old, by the non-negative estimator
    `k3 = (r - 1) - log r`, `r = exp(logps - old_logps) = π_θ / π_old` (unbiased, as `E_old[r] = 1`).

    Its Hessian at `θ = θ_old` is `mean_t ∇log π_θ(y_t) ∇log π_θ(y_t)ᵀ`, the empirical Fisher matrix: positive
    semi-definite for any sample, which conjugate gradient needs (the plain estimator `old_logps - logps` has the
    Fisher as Hessian only in expectation, and an indefinite one on a finite sample).
    `logps`, `old_logps`, `mask`: `[N, C]`. Returns a scalar."""
    log_ratio = logps - old_logps.detach()
    mask = mask.to(log_ratio.dtype)
    per_token = torch.expm1(log_ratio) - log_ratio
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------- Fisher-vector products


def fisher_vector_product(kl_fn: Closure, params: Sequence[torch.Tensor], damping: float = 0.1,
                          math_attention: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """`v ↦ F v + damping · v`, where `F = ∇²KL` at the current parameters (the Fisher matrix when `kl_fn()` is the
    KL from the detached distribution at these very parameters).

    Evaluates `kl_fn()` and its gradient `∇KL` once, with `create_graph=True`; each product is then
    `∇(∇KL · v)`, one more backward pass through that graph (kept alive by the returned function: drop it to free
    memory). `v` and the result are flat `[Σ numel]` vectors in `work_dtype(params)`. The returned function also
    carries `kl_value` (float), the KL where it was built (≈ 0 when the closure is right).

    With `math_attention` (default) the KL forward runs under `sdpa_kernel(SDPBackend.MATH)`: the fused
    scaled-dot-product attention kernels (flash / memory-efficient, CPU and CUDA) have no double backward, so the
    products would fail for any trainable parameter upstream of an attention layer (LoRA on q/k/v, full
    fine-tuning). The math kernel materialises the `[B, heads, T, T]` attention weights for that one forward."""
    params = list(params)
    if math_attention:
        with sdpa_kernel(SDPBackend.MATH):
            kl = kl_fn()
    else:
        kl = kl_fn()
    kl_grad = flat_grad(kl, params, create_graph=True)
    dtype = work_dtype(params)

    def product(v: torch.Tensor) -> torch.Tensor:
        v = v.detach()
        if not kl_grad.requires_grad:  # the KL is linear (or constant) in θ: F = 0
            return damping * v
        directional = (kl_grad.to(dtype) * v.to(dtype)).sum()
        return flat_grad(directional, params, retain_graph=True).to(dtype).detach() + damping * v

    product.kl_value = float(kl.detach())
    return product


# ------------------------------------------------------------------------------------- conjugate gradient


def conjugate_gradient(Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int = 10,
                       residual_tol: float = 1e-10) -> tuple[torch.Tensor, float, int]:
    """Solves `A x = b` for a symmetric positive-definite `A` known only through products `Avp(v) = A v`, starting
    from `x = 0` (Hestenes–Stiefel conjugate gradient; `b` flat `[n]`).

    Stops after `iterations` products, or as soon as the squared residual `‖b - A x‖²` falls below `residual_tol`,
    or when a direction `p` has `pᵀAp ≤ 0` (A not positive definite along it; the iterate so far is kept).
    Returns `(x, residual_norm, iterations_done)`: `residual_norm` is `‖b - A x‖` as tracked by the recurrence
    (equal to the explicit residual up to rounding), `iterations_done` the number of products used."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = float(r @ r)
    done = 0
    for _ in range(iterations):
        if rr < residual_tol:
            break
        Ap = Avp(p)
        done += 1
        pAp = float(p @ Ap)
        if not pAp > 0:  # also catches NaN
            break
        alpha = rr / pAp
        x.add_(p, alpha=alpha)
        r.add_(Ap, alpha=-alpha)
        rr_new = float(r @ r)
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
    return x, math.sqrt(rr), done


def trpo_step_size(x: torch.Tensor, Fx: torch.Tensor, max_kl: float) -> float:
    """`β = sqrt(2δ / xᵀFx)`: the multiplier that puts the step `β x` on the trust-region boundary of the quadratic
    KL model, `½ (βx)ᵀ F (βx) = δ` (arXiv 1502.05477, appendix C).

    Returns 0.0 (no step) when `xᵀFx ≤ 0` or is not finite: `x = 0` (a zero gradient: nothing to do) or a KL whose
    Hessian is not positive there (a wrong `kl_fn`, warned about)."""
    shs = float(x @ Fx)
    if not math.isfinite(shs) or shs <= 0:
        if shs != 0 or bool(x.any()):
            warnings.warn(f"TRPO: xᵀFx = {shs:g} is not positive; no step is taken. Is kl_fn the KL from the "
                          "detached distribution at the current parameters?", stacklevel=2)
        return 0.0
    return math.sqrt(2 * max_kl / shs)


# ------------------------------------------------------------------------------------------- line search


@dataclass
class LineSearchResult:
    """What `backtracking_line_search` did. When nothing was accepted the parameters are back at `θ_old`, `kl` and
    `improvement` are 0 and `step_fraction` is 0."""

    accepted: bool
    step_fraction: float  # α of the accepted step θ_old + α · full_step
    backtracks: int  # shrinks before the accepted step (0: the full step); max_backtracks when none was accepted
    kl: float  # measured KL at the final parameters
    improvement: float  # measured surrogate(final) - surrogate(θ_old)
    surrogate_before: float
    surrogate_after: float
    last_kl: float  # measured KL of the last step tried (accepted or not): how far outside the region a rejection was


@torch.no_grad()
def backtracking_line_search(params: Sequence[torch.Tensor], full_step: torch.Tensor, surrogate_fn: Closure,
                             kl_fn: Closure, max_kl: float, expected_improvement: float, accept_ratio: float = 0.1,
                             backtrack_ratio: float = 0.5, max_backtracks: int = 10,
                             surrogate_before: float | None = None) -> LineSearchResult:
    """Tries `θ_old + α · full_step` for `α = 1, r, r², …, r^max_backtracks` (`r = backtrack_ratio`) and keeps the
    first whose measured `kl_fn() ≤ max_kl` and whose surrogate improvement is `> 0` and
    `≥ accept_ratio · α · expected_improvement` (`expected_improvement = gᵀ full_step`, the first-order gain of the
    full step). When none qualifies (or a value is not finite), the parameters are restored to `θ_old` bit for bit.

    `θ_old` is the parameters on entry; every trial is set from a saved copy of them (never by accumulating steps).
    All evaluations run under `torch.no_grad()`: one surrogate at `θ_old` (unless `surrogate_before` is given), then
    one surrogate and one KL per trial."""
    params = list(params)
    saved = copy_params(params)
    before = float(surrogate_fn()) if surrogate_before is None else float(surrogate_before)
    last_kl = float("nan")
    for k in range(max_backtracks + 1):
        fraction = backtrack_ratio**k
        restore_params(params, saved)
        add_to_params(params, full_step, fraction)
        kl = float(kl_fn())
        last_kl = kl
        if not (math.isfinite(kl) and kl <= max_kl):
            continue
        after = float(surrogate_fn())
        improvement = after - before
        enough = improvement >= accept_ratio * fraction * expected_improvement
        if math.isfinite(improvement) and improvement > 0 and enough:
            return LineSearchResult(True, fraction, k, kl, improvement, before, after, kl)
    restore_params(params, saved)
    return LineSearchResult(False, 0.0, max_backtracks, 0.0, 0.0, before, before, last_kl)


# ------------------------------------------------------------------------------------------------- update


@dataclass
class TRPOStats:
    """What one `trpo_update` did — what a trainer logs."""

    accepted: bool  # a step was taken (else the parameters are unchanged)
    kl: float  # measured KL(π_old ‖ π_new) after the update (0 when rejected)
    surrogate_before: float
    surrogate_after: float
    improvement: float  # surrogate_after - surrogate_before
    expected_improvement: float  # gᵀ full_step (first-order gain of the full step)
    step_fraction: float  # α of the accepted step (0 when rejected)
    backtracks: int  # line-search shrinks before acceptance
    cg_iterations: int  # Fisher-vector products used by conjugate gradient
    cg_residual: float  # ‖g - (F + λI) x‖ when CG stopped
    step_size: float  # β = sqrt(2δ / xᵀ(F + λI)x)
    grad_norm: float  # ‖g‖
    kl_at_start: float  # KL where the Fisher matrix was taken (≈ 0 when kl_fn is right)


def trpo_update(params: Iterable[torch.Tensor], surrogate_fn: Closure, kl_fn: Closure, max_kl: float,
                damping: float = 0.1, cg_iterations: int = 10, cg_residual_tol: float = 1e-10,
                accept_ratio: float = 0.1, backtrack_ratio: float = 0.5, max_backtracks: int = 10,
                math_attention: bool = True) -> TRPOStats:
    """One TRPO update of `params` in place (arXiv 1502.05477, appendix C): gradient `g` of `surrogate_fn()` →
    `x ≈ (F + damping·I)⁻¹ g` by `cg_iterations` of conjugate gradient on Fisher-vector products of `kl_fn()` →
    `full_step = sqrt(2·max_kl / xᵀ(F + damping·I)x) · x` → backtracking line search (KL ≤ `max_kl`, improvement
    ≥ `accept_ratio` of the expected one). On rejection the parameters are left exactly as they were.

    `kl_fn()` must be the mean `KL(π_old ‖ π_θ)` with π_old the (detached) distribution at the parameters on entry,
    so it is 0 there; `surrogate_fn()` is maximised. Both must be evaluable under `torch.no_grad()`.
    `math_attention`: see `fisher_vector_product`."""
    params = list(params)
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(f"trpo_update: parameters {frozen} do not require grad; pass only trainable parameters.")
    dtype = work_dtype(params)

    surrogate = surrogate_fn()
    g = flat_grad(surrogate, params).to(dtype)
    grad_norm = float(g.norm())
    fvp = fisher_vector_product(kl_fn, params, damping, math_attention)
    kl_at_start = fvp.kl_value
    if kl_at_start > 1e-3 * max_kl:
        warnings.warn(f"TRPO: kl_fn() = {kl_at_start:g} at the starting parameters (expected ≈ 0): the 'old' "
                      "log-probs were not computed at these parameters, so F is not the Fisher matrix.", stacklevel=2)
    if math.isfinite(grad_norm) and grad_norm > 0:
        x, cg_residual, cg_done = conjugate_gradient(fvp, g, cg_iterations, cg_residual_tol)
        step_size = trpo_step_size(x, fvp(x), max_kl)
    else:
        x, cg_residual, cg_done, step_size = torch.zeros_like(g), 0.0, 0, 0.0
    del fvp  # frees the graph of the KL gradient before the line search

    full_step = step_size * x
    expected = float(g @ full_step)
    if step_size > 0:
        search = backtracking_line_search(params, full_step, surrogate_fn, kl_fn, max_kl, expected, accept_ratio,
                                          backtrack_ratio, max_backtracks)
    else:
        before = float(surrogate.detach())
        search = LineSearchResult(False, 0.0, 0, 0.0, 0.0, before, before, 0.0)
    return TRPOStats(
        accepted=search.accepted, kl=search.kl, surrogate_before=search.surrogate_before,
        surrogate_after=search.surrogate_after, improvement=search.improvement, expected_improvement=expected,
        step_fraction=search.step_fraction, backtracks=search.backtracks, cg_iterations=cg_done,
        cg_residual=cg_residual, step_size=step_size, grad_norm=grad_norm, kl_at_start=kl_at_start,
    )
