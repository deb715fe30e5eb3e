"""`hf_align.value`: per-token values of a rollout from a value head on the policy and from a separate critic.

Alignment under test: completion token t sits at position `P + t` of prompt + completion; `values[:, t]` is read at
position `P - 1 + t` (the state before token t, the position that predicts it), 0 where `completion_mask` is 0."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from hf_align.models import reference_model, unwrap_causal_lm
from hf_align.rollout import Rollout
from hf_align.sequence_logprobs import completion_token_logprobs
from hf_align.value import ValueHead, critic_token_values, policy_logprobs_and_values, token_values

PAD = 0
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32, 33, 34]]  # left-padded to P = 5
COMPLETIONS = [[41, 42, 43, 44], [51, 52], [61]]  # right-padded to C = 4


def _rollout(prompts=PROMPTS, completions=COMPLETIONS):
    p, c = max(map(len, prompts)), max(map(len, completions))
    rollout = {
        "prompt_ids": torch.tensor([[PAD] * (p - len(x)) + x for x in prompts]),
        "prompt_mask": torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts]),
        "completion_ids": torch.tensor([x + [PAD] * (c - len(x)) for x in completions]),
        "completion_mask": torch.tensor([[1] * len(x) + [0] * (c - len(x)) for x in completions]),
    }
    return Rollout(**rollout)


def _lora(model, **kwargs):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], **kwargs)
    return get_peft_model(model, config)


def _count_forwards(model):
    calls = []
    handle = unwrap_causal_lm(model).get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_value_head_init():
    zeros = ValueHead(8)
    assert torch.all(zeros.linear.weight == 0) and torch.all(zeros.linear.bias == 0)
    torch.manual_seed(0)
    normal = ValueHead(64, init="normal")
    assert torch.all(normal.linear.bias == 0) and 0.5 / 65 < normal.linear.weight.std() < 2 / 65
    assert normal(torch.randn(2, 3, 64, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="init"):
        ValueHead(8, init="xavier")


def test_values_align_with_completion_tokens(tiny_model):
    """Against a manual forward of each row without any padding: value t = head(h[len(prompt) - 1 + t])."""
    torch.manual_seed(0)
    head = ValueHead.for_model(tiny_model, init="normal", std=0.5)
    rollout = _rollout()
    with torch.no_grad():
        values = token_values(tiny_model, head, rollout)
        expected = torch.zeros(3, 4)
        for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            hidden = tiny_model.model(input_ids=torch.tensor([prompt + completion])).last_hidden_state[0]
            for t in range(len(completion)):
                expected[row, t] = hidden[len(prompt) - 1 + t] @ head.linear.weight[0] + head.linear.bias[0]
    assert values.shape == (3, 4) and values.dtype == torch.float32
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)
    assert (values[rollout.completion_mask == 0] == 0).all() and values[0].abs().min() > 1e-3
    # Row slicing gives the same values.
    with torch.no_grad():
        torch.testing.assert_close(token_values(tiny_model, head, rollout, batch_size=2), values, rtol=0, atol=1e-6)


def test_gradients_reach_head_and_adapters_not_base(tiny_model):
    policy = _lora(tiny_model)
    torch.manual_seed(0)
    head = ValueHead.for_model(policy, init="normal", std=0.5)
    token_values(policy, head, _rollout()).pow(2).sum().backward()
    assert head.linear.weight.grad.abs().sum() > 0 and head.linear.bias.grad.abs() > 0
    lora = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    base = [p for n, p in policy.named_parameters() if "lora_" not in n]
    assert base and all(not p.requires_grad and p.grad is None for p in base)
    # One copy of the base: the reference is the same module with the adapter disabled.
    with reference_model(policy, None) as reference:
        assert reference is policy


def test_zero_initialised_head_sends_no_gradient_into_the_trunk(tiny_model):
    policy = _lora(tiny_model)
    head = ValueHead.for_model(policy)  # zeros
    values = token_values(policy, head, _rollout())
    assert (values == 0).all()
    (values - 1.0).pow(2).sum().backward()
    assert head.linear.weight.grad.abs().sum() > 0  # the head learns...
    assert all(p.grad is None or (p.grad == 0).all() for n, p in policy.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "peft"])
def test_one_pass_logprobs_and_values(tiny_model, use_peft):
    policy = _lora(tiny_model) if use_peft else tiny_model
    torch.manual_seed(0)
    head = ValueHead.for_model(policy, init="normal", std=0.5)
    rollout = _rollout()
    with torch.no_grad():
        # First (and so before counting): the LM head's one-time probe of this model (`logprobs.scored_forward`).
        reference = completion_token_logprobs(policy, rollout, temperature=0.7, with_stats=True)
        calls, handle = _count_forwards(policy)
        out, values = policy_logprobs_and_values(policy, head, rollout, temperature=0.7, with_stats=True)
        handle.remove()
        assert len(calls) == 1  # ONE forward for both
        separate = token_values(policy, head, rollout)
    for name in ("token_logps", "mask", "entropy", "mean_logit"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), rtol=0, atol=1e-6)
    assert torch.equal(out.is_top1, reference.is_top1)
    torch.testing.assert_close(values, separate, rtol=0, atol=1e-6)
    with torch.no_grad():
        sliced, sliced_values = policy_logprobs_and_values(policy, head, rollout, temperature=0.7, batch_size=2)
    torch.testing.assert_close(sliced.token_logps, reference.token_logps, rtol=0, atol=1e-6)
    torch.testing.assert_close(sliced_values, separate, rtol=0, atol=1e-6)


def test_one_pass_gradients_equal_two_passes(tiny_model):
    torch.manual_seed(0)
    head = ValueHead.for_model(tiny_model, init="normal", std=0.5)
    rollout = _rollout()
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    params = [tiny_model.model.layers[0].self_attn.q_proj.weight, tiny_model.lm_head.weight, head.linear.weight]

    def grads(one_pass):
        for p in params:
            p.grad = None
        if one_pass:
            out, values = policy_logprobs_and_values(tiny_model, head, rollout)
        else:
            out, values = completion_token_logprobs(tiny_model, rollout), token_values(tiny_model, head, rollout)
        ((out.token_logps + values) * weights).sum().backward()
        return [p.grad.clone() for p in params]

    for one, two in zip(grads(True), grads(False)):
        assert one.abs().max() > 1e-3
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-5)  # float summation order differs


# ------------------------------------------------------------------------------------------------ separate critic


def test_critic_values_are_the_classifier_on_each_prefix(tiny_seqcls_path):
    """For an unpadded row, value t is the classifier's own output for prompt + completion[:t]: in particular the
    value at the last completion token is its logit for the sequence without that token (the state it is emitted
    from); the padded batch gives the same values."""
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_seqcls_path, dtype=torch.float32)
    rollout = _rollout()
    with torch.no_grad():
        values = critic_token_values(critic, rollout)
        single = critic_token_values(critic, _rollout([PROMPTS[1]], [COMPLETIONS[0]]))
        prompt, completion = PROMPTS[1], COMPLETIONS[0]
        own = torch.stack([critic(input_ids=torch.tensor([prompt + completion[:t]])).logits[0, 0]
                           for t in range(len(completion))])
    torch.testing.assert_close(single[0], own, rtol=0, atol=1e-6)
    assert own.std() > 1e-4  # the prefixes score differently
    assert values.shape == (3, 4) and values.dtype == torch.float32
    assert (values[rollout.completion_mask == 0] == 0).all()
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):  # padding changes nothing
        with torch.no_grad():
            alone = critic_token_values(critic, _rollout([prompt], [completion]))[0]
        torch.testing.assert_close(values[row, : len(completion)], alone, rtol=0, atol=1e-5)


def test_critic_with_peft_trains_adapters_and_score(tiny_seqcls_path):
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_seqcls_path, dtype=torch.float32)
    with torch.no_grad():
        plain = critic_token_values(critic, _rollout())
    critic = _lora(critic, task_type="SEQ_CLS")  # peft adds `score` to modules_to_save
    values = critic_token_values(critic, _rollout())
    torch.testing.assert_close(values.detach(), plain, rtol=0, atol=1e-6)  # LoRA B starts at 0
    values.pow(2).sum().backward()
    trained = {n for n, p in critic.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("score" in n for n in trained) and any("lora_B" in n for n in trained)
    assert all(p.grad is None for p in critic.parameters() if not p.requires_grad)


def test_critic_needs_a_score_head(tiny_model):
    with pytest.raises(ValueError, match="score"):
        critic_token_values(tiny_model, _rollout())
