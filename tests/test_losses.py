"""`hf_align.losses` against values worked out by hand (numbers written out below, float64 reference values).

log σ(x) = -log(1 + e^{-x}); so -log σ(0.2) = log(1 + e^{-0.2}) = 0.5981388693815918 and
-log σ(-0.2) = 0.2 + 0.5981388693815918 = 0.7981388693815918.
"""

from __future__ import annotations

import pytest
import torch

from hf_align import losses

NLL_02 = 0.5981388693815918  # -log σ(0.2)
NLL_M02 = 0.7981388693815918  # -log σ(-0.2)
LOG2 = 0.6931471805599453


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, t(*expected) if isinstance(expected, (list, tuple)) else expected,
                               rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------------ dpo_logit


def test_dpo_logit():
    # h = [logp(yw) - ref(yw)] - [logp(yl) - ref(yl)]
    close(losses.dpo_logit(t(1.5, -2.0), t(-0.5, -3.0)), [2.0, 1.0])


# ---------------------------------------------------------------------------------------------------- sigmoid/cDPO


def test_sigmoid_hand_values():
    # β = 0.1: h = 2 -> -log σ(0.2); h = 0 -> log 2; h = -2 -> -log σ(-0.2)
    close(losses.dpo_sigmoid_loss(t(2.0, 0.0, -2.0), beta=0.1), [NLL_02, LOG2, NLL_M02])
    # β = 1, h = 1: -log σ(1) = 0.31326168751822286
    close(losses.dpo_sigmoid_loss(t(1.0), beta=1.0), [0.31326168751822286])


def test_cdpo_hand_values():
    # ε = 0.1, β = 0.1, h = 2: 0.9 · 0.598138869 + 0.1 · 0.798138869 = 0.6181388693815918
    close(losses.dpo_sigmoid_loss(t(2.0), beta=0.1, label_smoothing=0.1), [0.6181388693815918])
    # ε = 0.5 is symmetric in h: 0.5 · (0.598138869 + 0.798138869) = 0.6981388693815918 for h = ±2
    close(losses.dpo_sigmoid_loss(t(2.0, -2.0), beta=0.1, label_smoothing=0.5), [0.6981388693815918] * 2)


def test_sigmoid_is_stable_for_large_margins():
    out = losses.dpo_sigmoid_loss(t(1e4, -1e4), beta=1.0)
    assert torch.isfinite(out).all()
    close(out, [0.0, 1e4], tol=1e-9)
    out32 = losses.dpo_sigmoid_loss(torch.tensor([1e4, -1e4]), beta=1.0, label_smoothing=0.1)
    assert torch.isfinite(out32).all()


def test_sigmoid_gradient_hand_value():
    # d/dh [-log σ(βh)] = -β σ(-βh) = -0.1 · σ(-0.2) = -0.1 · 0.45016600268752216
    h = t(2.0).requires_grad_()
    losses.dpo_sigmoid_loss(h, beta=0.1).sum().backward()
    close(h.grad, [-0.045016600268752216])


# ------------------------------------------------------------------------------------------------------- hinge


def test_hinge_hand_values():
    # relu(1 - βh), β = 0.1: h = 2 -> 0.8; h = 10 -> 0 (at the margin); h = 15 -> 0 (beyond it); h = -5 -> 1.5
    close(losses.dpo_hinge_loss(t(2.0, 10.0, 15.0, -5.0), beta=0.1), [0.8, 0.0, 0.0, 1.5])


def test_hinge_has_no_gradient_beyond_the_margin():
    h = t(15.0, 2.0).requires_grad_()
    losses.dpo_hinge_loss(h, beta=0.1).sum().backward()
    close(h.grad, [0.0, -0.1])


# ------------------------------------------------------------------------------------------------------ robust


def test_robust_hand_values():
    # [(1-ε)(-log σ(βh)) + ε log σ(-βh)] / (1 - 2ε), ε = 0.1, β = 0.1, h = 2:
    # (0.9 · 0.598138869 - 0.1 · 0.798138869) / 0.8 = 0.5731388693815918
    close(losses.dpo_robust_loss(t(2.0), beta=0.1, label_smoothing=0.1), [0.5731388693815918])


def test_robust_is_unbiased_under_label_flips():
    # E over a flip with probability ε of the robust loss = the clean sigmoid loss.
    h, eps = t(2.0, -1.0, 0.3), 0.2
    expected = (1 - eps) * losses.dpo_robust_loss(h, 0.1, eps) + eps * losses.dpo_robust_loss(-h, 0.1, eps)
    close(expected, losses.dpo_sigmoid_loss(h, 0.1))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_epsilon_zero_reduces_cdpo_and_robust_to_sigmoid(beta):
    h = t(2.0, -1.0, 0.0, 7.5)
    plain = losses.dpo_sigmoid_loss(h, beta)
    close(losses.dpo_sigmoid_loss(h, beta, label_smoothing=0.0), plain)
    close(losses.dpo_robust_loss(h, beta, label_smoothing=0.0), plain)


# --------------------------------------------------------------------------------------------------------- IPO


def test_ipo_hand_values_with_length_normalisation():
    # τ = β = 0.5: target 1/(2τ) = 1.
    # Pair 0: chosen ratio 3 over 3 tokens, rejected -1 over 2 tokens: h̄ = 1 + 0.5 = 1.5 -> (1.5 - 1)² = 0.25
    # Pair 1: chosen 2 over 4 tokens, rejected 2 over 1 token: h̄ = 0.5 - 2 = -1.5 -> (-2.5)² = 6.25
    out = losses.ipo_loss(t(3.0, 2.0), t(-1.0, 2.0), t(3.0, 4.0), t(2.0, 1.0), beta=0.5)
    close(out, [0.25, 6.25])
    # Without the normalisation pair 0 would be (4 - 1)² = 9: the lengths matter.
    assert out[0] != 9.0


def test_ipo_target_margin_and_empty_completion():
    # β = 0.1: target 5, h̄ = 0 -> 25; a zero-length completion counts as 1 token (no division by zero).
    close(losses.ipo_loss(t(0.0), t(0.0), t(3.0), t(2.0), beta=0.1), [25.0])
    close(losses.ipo_loss(t(2.0), t(0.0), t(0.0), t(0.0), beta=0.5), [1.0])  # h̄ = 2/1 -> (2 - 1)²


# ------------------------------------------------------------------------------------------------ dpo_loss dispatch


def test_dpo_loss_dispatches_each_type():
    chosen, rejected, beta = t(1.5, -0.5), t(-0.5, 0.5), 0.1  # h = 2, -1
    lengths_c, lengths_r = t(3.0, 2.0), t(2.0, 4.0)
    h = t(2.0, -1.0)
    expected = {
        "sigmoid": losses.dpo_sigmoid_loss(h, beta, 0.1),
        "hinge": losses.dpo_hinge_loss(h, beta),
        "robust": losses.dpo_robust_loss(h, beta, 0.1),
        "ipo": losses.ipo_loss(chosen, rejected, lengths_c, lengths_r, beta),
    }
    assert set(expected) <= set(losses.DPO_LOSS_TYPES)  # every type: tests/test_dpo_loss_types.py
    for loss_type, value in expected.items():
        out = losses.dpo_loss(loss_type, chosen, rejected, beta=beta, label_smoothing=0.1,
                              chosen_lengths=lengths_c, rejected_lengths=lengths_r)
        assert out.shape == (2,)
        close(out, value)
    close(losses.dpo_loss("sigmoid", chosen, rejected, beta=beta)[:1], [NLL_02])


def test_dpo_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="Unknown DPO loss_type 'kto'"):
        losses.dpo_loss("kto", t(1.0), t(0.0), beta=0.1)


# ---------------------------------------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_hand_values():
    chosen, rejected = t(2.0, 0.0), t(0.5, 0.0)
    # -log σ(1.5) = 0.2014132779827524; -log σ(0) = log 2
    close(losses.bradley_terry_loss(chosen, rejected), [0.2014132779827524, LOG2])
    # margin m = 1 for pair 0: -log σ(2 - 0.5 - 1) = -log σ(0.5) = 0.4740769841801067
    # margin m = 0.5 for pair 1: -log σ(-0.5) = 0.9740769841801067
    close(losses.bradley_terry_loss(chosen, rejected, margin=t(1.0, 0.5)), [0.4740769841801067, 0.9740769841801067])


def test_bradley_terry_with_centering():
    chosen, rejected = t(2.0, -1.0), t(0.5, -2.0)
    # pair 0: -log σ(0.5) + 0.01 · (2 + 0.5)² = 0.4740769841801067 + 0.0625 = 0.5365769841801067
    # pair 1: -log σ(1) + 0.01 · (-3)² = 0.31326168751822286 + 0.09 = 0.40326168751822286
    out = losses.bradley_terry_loss(chosen, rejected, margin=t(1.0, 0.0), center_rewards_coefficient=0.01)
    close(out, [0.5365769841801067, 0.40326168751822286])
    # The batch mean is TRL's form: mean(-log σ(rw - rl - m)) + c · mean((rw + rl)²).
    trl_form = (-torch.nn.functional.logsigmoid(t(0.5, 1.0))).mean() + 0.01 * (t(2.5, -3.0) ** 2).mean()
    close(out.mean(), trl_form)
    # A coefficient of 0 / None adds nothing.
    close(losses.bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.0),
          losses.bradley_terry_loss(chosen, rejected))


# ---------------------------------------------------------------------------------------------------- masked NLL


def test_masked_nll_hand_values():
    token_logps = t(-1.0, -2.0, -3.0, -4.0, -5.0, -6.0).reshape(2, 3)
    mask = t(1.0, 1.0, 0.0, 0.0, 1.0, 1.0).reshape(2, 3)
    # -(-1 - 2 - 5 - 6) / 4 tokens = 3.5 (the token mean over all rows together, not the mean of row means 3.75)
    close(losses.masked_nll(token_logps, mask), torch.tensor(3.5, dtype=torch.float64))
    # An empty mask gives 0, not NaN.
    close(losses.masked_nll(token_logps, torch.zeros_like(mask)), torch.tensor(0.0, dtype=torch.float64))


def test_masked_nll_with_num_tokens():
    import inspect

    if "num_tokens" not in inspect.signature(losses.masked_nll).parameters:
        pytest.skip("masked_nll has no num_tokens")
    token_logps = t(-1.0, -2.0, -3.0, -4.0, -5.0, -6.0).reshape(2, 3)
    mask = t(1.0, 1.0, 0.0, 0.0, 1.0, 1.0).reshape(2, 3)
    # Normalised by the step's token count (7 tokens over the accumulated micro-batches): 14 / 7 = 2
    close(losses.masked_nll(token_logps, mask, num_tokens=7), torch.tensor(2.0, dtype=torch.float64))
