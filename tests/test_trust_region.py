"""`hf_align.trust_region`, the numerical core of TRPO (arXiv 1502.05477): parameter-vector utilities, conjugate
gradient against a direct solve, Fisher-vector products against the explicit Hessian of the KL on a tiny causal LM,
the backtracking line search (KL bound, backtracking, exact restore), and whole updates on a toy softmax policy and on
a tiny causal LM (a few trainable parameters, and every parameter).

The tiny causal LM is built here (Llama, hidden 8, one layer, vocabulary 32, random weights): small enough for an
explicit Hessian over a subset of its parameters. Rollouts are random token ids; nothing is generated.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_align import trust_region as tr
from hf_align.rollout import Rollout
from hf_align.sequence_logprobs import completion_token_logprobs

VOCAB = 32


# --------------------------------------------------------------------------------------------------- helpers


def tiny_lm(seed: int = 0, attn_implementation: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         attn_implementation=attn_implementation)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so the policy is far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20.0)
    return model


def random_rollout(rows: int = 4, prompt_length: int = 3, completion_length: int = 5, seed: int = 1) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    rollout = {
        "prompt_ids": torch.randint(3, VOCAB, (rows, prompt_length), generator=g),
        "prompt_mask": torch.ones(rows, prompt_length, dtype=torch.long),
        "completion_ids": torch.randint(3, VOCAB, (rows, completion_length), generator=g),
        "completion_mask": torch.ones(rows, completion_length, dtype=torch.long),
    }
    rollout["prompt_ids"][0, 0] = 0  # a left-padded prompt
    rollout["prompt_mask"][0, 0] = 0
    rollout["completion_mask"][1, -2:] = 0  # a shorter completion
    return Rollout(**rollout)


def lm_closures(model, rollout, advantages):
    """(old_logps, surrogate_fn, kl_fn) with π_old = the model as it is now."""
    with torch.no_grad():
        old = completion_token_logprobs(model, rollout).token_logps
    mask = rollout.completion_mask

    def logps():
        return completion_token_logprobs(model, rollout).token_logps

    def surrogate_fn():
        return tr.token_surrogate(logps(), old, advantages, mask)

    def kl_fn():
        return tr.sampled_token_kl(logps(), old, mask)

    return old, surrogate_fn, kl_fn


class SoftmaxPolicy(torch.nn.Module):
    """π(a | s) = softmax(logits[s]) over a few actions: the toy TRPO problem."""

    def __init__(self, states: int = 3, actions: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(torch.randn(states, actions, generator=g, dtype=torch.float64))

    def log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=-1)


def exact_kl(old_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over states of the full-distribution KL(π_old ‖ π)."""
    return (old_log_probs.exp() * (old_log_probs - log_probs)).sum(-1).mean()


def toy_closures(policy: SoftmaxPolicy, states: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor):
    old = policy.log_probs().detach()

    def surrogate_fn():
        logp = policy.log_probs()[states, actions]
        return (torch.exp(logp - old[states, actions]) * advantages).mean()

    def kl_fn():
        return exact_kl(old, policy.log_probs())

    return old, surrogate_fn, kl_fn


def toy_batch(policy: SoftmaxPolicy, n: int = 64, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    states = torch.randint(0, policy.logits.size(0), (n,), generator=g)
    with torch.no_grad():
        probs = policy.log_probs().exp()[states]
    actions = torch.multinomial(probs, 1, generator=g).squeeze(1)
    action_values = torch.randn(policy.logits.shape, generator=g, dtype=torch.float64)
    advantages = action_values[states, actions] - (probs * action_values[states]).sum(-1)
    return states, actions, advantages


def within(kl: float, max_kl: float, rel: float = 1e-3) -> bool:
    return kl <= max_kl * (1 + rel)


# --------------------------------------------------------------------------------------------- vector utilities


def test_flatten_unflatten_and_add_to_params():
    params = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    flat = tr.flatten(params)
    assert flat.shape == (12,)
    for piece, p in zip(tr.unflatten_like(flat, params), params):
        assert torch.equal(piece, p)
    with pytest.raises(ValueError):
        tr.unflatten_like(torch.zeros(11), params)

    before = [p.clone() for p in params]
    step = torch.arange(12.0)
    tr.add_to_params(params, step, scale=0.5)
    torch.testing.assert_close(tr.flatten(params), tr.flatten(before) + 0.5 * step)

    w = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    g = tr.flat_grad((w**2).sum(), [w, unused])
    torch.testing.assert_close(g, torch.cat([2 * w.detach(), torch.zeros(2)]))
    assert tr.work_dtype([torch.zeros(1, dtype=torch.bfloat16)]) == torch.float32
    assert tr.work_dtype([torch.zeros(1, dtype=torch.float64)]) == torch.float64


# ------------------------------------------------------------------------------------------ conjugate gradient


def spd_matrix(n: int = 6, damping: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    return J.T @ J / (2 * n) + damping * torch.eye(n, dtype=torch.float64)


def test_conjugate_gradient_matches_direct_solve():
    A = spd_matrix()
    b = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x, residual, done = tr.conjugate_gradient(lambda v: A @ v, b, iterations=20, residual_tol=1e-24)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-10)
    assert residual < 1e-11
    assert math.isclose(residual, float(torch.linalg.norm(b - A @ x)), abs_tol=1e-11)
    assert done < 20  # exact arithmetic needs n = 6 products; the residual test stops it

    # Truncated: the reported residual is the true one, and the iterates reduce the A-norm error monotonically.
    errors = []
    for k in (1, 2, 3):
        x_k, residual_k, done_k = tr.conjugate_gradient(lambda v: A @ v, b, iterations=k)
        assert done_k == k
        assert math.isclose(residual_k, float(torch.linalg.norm(b - A @ x_k)), rel_tol=1e-9)
        e = x_k - torch.linalg.solve(A, b)
        errors.append(float(e @ A @ e))
    assert errors[0] > errors[1] > errors[2]

    # b = 0: nothing to solve, no product used.
    x0, r0, d0 = tr.conjugate_gradient(lambda v: A @ v, torch.zeros(6, dtype=torch.float64))
    assert d0 == 0 and r0 == 0 and not x0.any()

    # Not positive definite along the first direction: stops there and returns the iterate so far (zero).
    x_bad, _, done_bad = tr.conjugate_gradient(lambda v: -v, b)
    assert done_bad == 1 and not x_bad.any()


def test_trpo_step_size():
    A = spd_matrix()
    x = torch.randn(6, dtype=torch.float64)
    beta = tr.trpo_step_size(x, A @ x, max_kl=0.01)
    step = beta * x
    assert math.isclose(0.5 * float(step @ A @ step), 0.01, rel_tol=1e-12)
    assert tr.trpo_step_size(torch.zeros(6), torch.zeros(6), 0.01) == 0.0
    with pytest.warns(UserWarning, match="not positive"):
        assert tr.trpo_step_size(x, -(A @ x), 0.01) == 0.0


# ---------------------------------------------------------------------------------- Fisher-vector products


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_fisher_vector_product_matches_explicit_hessian_on_tiny_lm(attn_implementation):
    model = tiny_lm(attn_implementation=attn_implementation)
    rollout = random_rollout()
    mask = rollout.completion_mask
    # A few trainable parameters, one of them upstream of attention (double backprop through it): 8 + 8 + 64.
    names = ["model.norm.weight", "model.layers.0.post_attention_layernorm.weight",
             "model.layers.0.self_attn.v_proj.weight"]
    named = dict(model.named_parameters())
    params = [named[name] for name in names]
    n = sum(p.numel() for p in params)
    old, _, kl_fn = lm_closures(model, rollout, torch.zeros(4))

    # At θ = θ_old the KL is 0 and so is its gradient.
    kl = kl_fn()
    assert float(kl.detach()) == 0.0
    assert float(tr.flat_grad(kl, params).abs().max()) < 1e-12

    # Explicit Hessian of the same KL over a flat vector of those parameters.
    class KL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self):
            return kl_fn()

    wrapper = KL()
    flat0 = tr.flatten(params).detach()

    def kl_of(flat):
        overrides = {f"model.{name}": piece for name, piece in zip(names, tr.unflatten_like(flat, params))}
        return torch.func.functional_call(wrapper, overrides, ())

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(kl_of, flat0)
    assert H.shape == (n, n)
    torch.testing.assert_close(H, H.T, rtol=1e-4, atol=1e-6)
    assert float(torch.linalg.eigvalsh(H.double()).min()) > -1e-5  # the KL's Hessian at θ_old is PSD

    # ... and it is the empirical Fisher matrix: mean over completion tokens of ∇log π ∇log π^T.
    logps = completion_token_logprobs(model, rollout).token_logps
    scores = [tr.flat_grad(logps[i, t], params, retain_graph=True) for i, t in mask.nonzero().tolist()]
    fisher = torch.stack([s[:, None] * s[None, :] for s in scores]).mean(0)
    torch.testing.assert_close(H, fisher, rtol=1e-3, atol=1e-5)

    damping = 0.05
    fvp = tr.fisher_vector_product(kl_fn, params, damping)
    assert abs(fvp.kl_value) < 1e-10  # ≈ 0 (the math attention kernel rounds differently from the fused one)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        v = torch.randn(n, generator=g)
        torch.testing.assert_close(fvp(v), H @ v + damping * v, rtol=1e-3, atol=1e-5)
    e = torch.zeros(n)
    e[3] = 1.0
    torch.testing.assert_close(fvp(e), H[:, 3] + damping * e, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------------ line search


def test_line_search_backtracks_until_the_kl_bound_holds():
    policy = SoftmaxPolicy()
    states, actions, advantages = toy_batch(policy)
    old, surrogate_fn, kl_fn = toy_closures(policy, states, actions, advantages)
    params = [policy.logits]
    g = tr.flat_grad(surrogate_fn(), params)
    max_kl = 0.01
    full_step = 50.0 * g / g.norm()  # far outside the trust region
    theta_old = policy.logits.detach().clone()
    tr.add_to_params(params, full_step)
    assert float(kl_fn().detach()) > max_kl  # the full step breaks the bound
    tr.restore_params(params, [theta_old])

    trials = []

    def recording_kl():
        value = kl_fn()
        trials.append(float(value))
        return value

    result = tr.backtracking_line_search(params, full_step, surrogate_fn, recording_kl, max_kl,
                                         expected_improvement=float(g @ full_step))
    assert result.accepted
    assert result.backtracks >= 1 and result.step_fraction == 0.5**result.backtracks
    assert len(trials) == result.backtracks + 1
    assert trials[0] > max_kl  # the full step was tried, measured and refused
    assert result.kl == trials[-1] <= max_kl
    assert float(exact_kl(old, policy.log_probs())) <= max_kl  # measured again, independently
    assert result.improvement > 0
    torch.testing.assert_close(policy.logits.detach(), theta_old + result.step_fraction * full_step.view(3, 5))
    assert math.isclose(result.surrogate_after - result.surrogate_before, result.improvement, rel_tol=1e-12)


@pytest.mark.parametrize("case", ["kl_never_within_bound", "surrogate_never_improves"])
def test_line_search_rejects_and_restores_parameters_bit_for_bit(case):
    policy = SoftmaxPolicy(seed=4)
    states, actions, advantages = toy_batch(policy)
    old, surrogate_fn, kl_fn = toy_closures(policy, states, actions, advantages)
    params = [policy.logits]
    g = tr.flat_grad(surrogate_fn(), params)
    if case == "kl_never_within_bound":
        full_step, max_backtracks = 1e3 * g / g.norm(), 3  # even 1/8 of it is far outside
    else:
        full_step, max_backtracks = -0.1 * g / g.norm(), 10  # downhill: every step lowers the surrogate
    theta_old = policy.logits.detach().clone()
    result = tr.backtracking_line_search(params, full_step, surrogate_fn, kl_fn, max_kl=0.01,
                                         expected_improvement=float(g @ full_step), max_backtracks=max_backtracks)
    assert not result.accepted
    assert result.step_fraction == 0.0 and result.kl == 0.0 and result.improvement == 0.0
    assert result.backtracks == max_backtracks
    assert torch.equal(policy.logits.detach(), theta_old)  # bit for bit
    if case == "kl_never_within_bound":
        assert result.last_kl > 0.01


def test_line_search_requires_enough_improvement():
    policy = SoftmaxPolicy(seed=6)
    states, actions, advantages = toy_batch(policy)
    old, surrogate_fn, kl_fn = toy_closures(policy, states, actions, advantages)
    params = [policy.logits]
    g = tr.flat_grad(surrogate_fn(), params)
    full_step = 1e-3 * g / g.norm()
    # Claim a first-order gain 1000× the real one: no step reaches 10 % of it.
    result = tr.backtracking_line_search(params, full_step, surrogate_fn, kl_fn, max_kl=0.01,
                                         expected_improvement=1e3 * float(g @ full_step), max_backtracks=4)
    assert not result.accepted


# --------------------------------------------------------------------------------------------- whole updates


@pytest.mark.parametrize("max_kl", [1e-2, 1e-4])
def test_trpo_update_on_a_toy_softmax_policy(max_kl):
    policy = SoftmaxPolicy(seed=1)
    for update in range(4):
        states, actions, advantages = toy_batch(policy, seed=10 + update)
        old, surrogate_fn, kl_fn = toy_closures(policy, states, actions, advantages)
        stats = tr.trpo_update([policy.logits], surrogate_fn, kl_fn, max_kl, damping=1e-3, cg_iterations=20)
        assert stats.accepted and stats.improvement > 0
        assert stats.surrogate_after > stats.surrogate_before
        kl = float(exact_kl(old, policy.log_probs()))  # measured again, with the exact KL
        assert within(kl, max_kl) and math.isclose(kl, stats.kl, rel_tol=1e-9)
        assert stats.kl_at_start == 0.0 and 0 < stats.cg_iterations <= 20 and stats.grad_norm > 0
        assert stats.step_fraction >= 0.5  # the quadratic model is never far off here
        if max_kl == 1e-4:  # ... and at a small δ it is accurate: the full step lands just inside the boundary
            assert stats.step_fraction == 1.0 and kl > 0.95 * max_kl

    # Zero advantages: zero gradient, no step, parameters untouched.
    before = policy.logits.detach().clone()
    states, actions, _ = toy_batch(policy)
    _, surrogate_fn, kl_fn = toy_closures(policy, states, actions, torch.zeros(len(states), dtype=torch.float64))
    stats = tr.trpo_update([policy.logits], surrogate_fn, kl_fn, max_kl)
    assert not stats.accepted and stats.step_size == 0.0 and stats.cg_iterations == 0
    assert torch.equal(policy.logits.detach(), before)


def test_trpo_update_refuses_frozen_parameters():
    frozen = torch.zeros(3)
    with pytest.raises(ValueError, match="require grad"):
        tr.trpo_update([frozen], lambda: frozen.sum(), lambda: frozen.sum(), 0.01)


@pytest.mark.parametrize("trainable", ["few", "all"])
def test_trpo_update_on_a_tiny_causal_lm(trainable):
    model = tiny_lm(seed=3)
    rollout = random_rollout(rows=6, seed=7)
    if trainable == "few":
        names = {"model.norm.weight", "model.layers.0.self_attn.v_proj.weight", "lm_head.weight"}
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    max_kl = 0.02
    for _ in range(3):
        old, surrogate_fn, kl_fn = lm_closures(model, rollout, advantages)
        stats = tr.trpo_update(params, surrogate_fn, kl_fn, max_kl, damping=0.1, cg_iterations=10)
        assert stats.accepted and stats.improvement > 0
        with torch.no_grad():  # measured again, from scratch
            logps = completion_token_logprobs(model, rollout).token_logps
            kl = float(tr.sampled_token_kl(logps, old, rollout.completion_mask))
            surrogate = float(tr.token_surrogate(logps, old, advantages, rollout.completion_mask))
        assert within(kl, max_kl)
        assert math.isclose(kl, stats.kl, rel_tol=1e-5, abs_tol=1e-9)
        assert surrogate > stats.surrogate_before
        assert math.isfinite(stats.cg_residual) and 0 < stats.cg_iterations <= 10
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name])
