"""`hf_align.logprobs.completion_logprobs` (chunked LM head on the last hidden state) against the naive
computation: the model's full `[B, T, V]` logits, `log_softmax`, gather."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from hf_align import logprobs
from hf_align.data import collate_prompt_completions
from hf_align.logprobs import completion_logprobs, token_logprobs

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def model(tiny_model_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    # Random init gives near-uniform logits; sharpen them so the statistics are not all equal.
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0)
    return model.eval()


def _batch(vocab_size: int, left_pad: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompt + completion rows of different lengths, right-padded (or left-padded) with pad id 1."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (2, 9), (7, 1), (3, 6)]  # (prompt, completion) lengths: 9, 11, 8, 9 tokens
    prompts = [torch.randint(2, vocab_size, (p,), generator=generator).tolist() for p, _ in shapes]
    completions = [torch.randint(2, vocab_size, (c,), generator=generator).tolist() for _, c in shapes]
    batch = collate_prompt_completions(prompts, completions, pad_token_id=1, max_length=None,
                                       truncation_mode="keep_start")
    if left_pad:  # move each row's padding to the front
        for key, fill in (("input_ids", 1), ("attention_mask", 0), ("completion_mask", 0)):
            rows = []
            for row, mask in zip(batch[key], batch["attention_mask"]):
                n = int(mask.sum())
                rows.append(torch.cat([torch.full((len(row) - n,), fill, dtype=row.dtype), row[:n]]))
            batch[key] = torch.stack(rows)
    return batch


def _greedy_last_token(model, batch):
    """Sets each row's last token to the model's argmax prediction there, so `is_top1` holds at those positions
    (earlier predictions do not depend on it)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for row in range(len(batch["input_ids"])):
        last = int(batch["completion_mask"][row].nonzero().max())
        batch["input_ids"][row, last] = logits[row, last - 1].argmax()
    return batch


def _naive(model, batch, temperature: float = 1.0, softcap: float | None = None):
    """Per-token log-probs and statistics from the full logits, aligned like `CompletionLogProbs`."""
    input_ids, mask = batch["input_ids"], batch["completion_mask"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits.float()[:, :-1]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    targets = input_ids[:, 1:]
    log_probs = torch.log_softmax(logits, -1)
    target_mask = mask[:, 1:].float()
    logps = log_probs.gather(-1, targets[..., None]).squeeze(-1) * target_mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * target_mask
    mean_logit = logits.mean(-1) * target_mask
    is_top1 = (logits.argmax(-1) == targets) & target_mask.bool()
    pad = lambda x: torch.nn.functional.pad(x, (1, 0))  # noqa: E731 - position 0 is never scored
    return {"token_logps": pad(logps), "mask": pad(target_mask), "entropy": pad(entropy),
            "mean_logit": pad(mean_logit), "is_top1": pad(is_top1)}


@pytest.mark.parametrize("left_pad", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("chunk_size", [1024, 7, 1])
def test_matches_naive_log_softmax(model, left_pad, chunk_size):
    batch = _greedy_last_token(model, _batch(model.config.vocab_size, left_pad))
    n_tokens = int(batch["completion_mask"][:, 1:].sum())
    assert n_tokens == 20 and (chunk_size >= 1024 or chunk_size < n_tokens)
    with torch.no_grad():
        ours = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                   chunk_size=chunk_size, with_stats=True)
        naive = _naive(model, batch)
    assert ours.token_logps.dtype == torch.float32 and ours.token_logps.shape == batch["input_ids"].shape
    torch.testing.assert_close(ours.mask, naive["mask"])
    torch.testing.assert_close(ours.token_logps, naive["token_logps"], **TOL)
    torch.testing.assert_close(ours.sum, naive["token_logps"].sum(-1), **TOL)
    torch.testing.assert_close(ours.lengths, naive["mask"].sum(-1))
    torch.testing.assert_close(ours.mean, naive["token_logps"].sum(-1) / naive["mask"].sum(-1), **TOL)
    # Padding and prompt positions are exactly 0.
    assert (ours.token_logps[ours.mask == 0] == 0).all()
    # Statistics.
    torch.testing.assert_close(ours.entropy, naive["entropy"], **TOL)
    torch.testing.assert_close(ours.mean_logit, naive["mean_logit"], **TOL)
    assert torch.equal(ours.is_top1, naive["is_top1"])
    assert naive["is_top1"].any() and not naive["is_top1"][naive["mask"].bool()].all()  # a non-trivial check
    assert naive["entropy"][naive["mask"].bool()].std() > 1e-2


def test_without_stats_and_with_temperature(model):
    batch = _batch(model.config.vocab_size, seed=1)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        plain = completion_logprobs(model, *args)
        assert plain.entropy is None and plain.mean_logit is None and plain.is_top1 is None
        torch.testing.assert_close(plain.token_logps, _naive(model, batch)["token_logps"], **TOL)
        hot = completion_logprobs(model, *args, temperature=0.7, chunk_size=3, with_stats=True)
        naive_hot = _naive(model, batch, temperature=0.7)
        torch.testing.assert_close(hot.token_logps, naive_hot["token_logps"], **TOL)
        torch.testing.assert_close(hot.entropy, naive_hot["entropy"], **TOL)


def test_a_soft_cap_the_forward_does_not_apply_is_not_applied(model):
    """A config may name a final soft cap that its model's forward does not apply (transformers' multimodal Gemma 3
    causal LM): the log-probs are those of the forward's own logits, still through the chunked head."""
    batch = _batch(model.config.vocab_size, seed=1)
    model.config.final_logit_softcapping = 2.0  # LlamaForCausalLM ignores it
    with torch.no_grad():
        ours = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                   chunk_size=5)
        torch.testing.assert_close(ours.token_logps, _naive(model, batch)["token_logps"], **TOL)
        assert (ours.token_logps - _naive(model, batch, softcap=2.0)["token_logps"]).abs().max() > 1e-2
    assert logprobs._FAST_PATHS[model] == logprobs._FastPath(softcap=None)


@pytest.mark.parametrize("chunk_size", [1024, 6])
def test_parameter_gradients_match_naive(tiny_model_path, chunk_size):
    """d/dθ Σ w · logp: the chunks are recomputed in the backward pass (checkpointed) and give the same gradient."""
    batch = _batch(1024, seed=2)
    weights = torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for use_naive in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).train()
        if use_naive:
            logps = _naive(model, batch)["token_logps"]
        else:
            logps = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                        chunk_size=chunk_size, with_stats=True).token_logps
        assert logps.requires_grad
        (logps * weights).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    ours, naive = grads
    assert set(ours) == set(naive)
    for name in naive:
        torch.testing.assert_close(ours[name], naive[name], rtol=1e-4, atol=1e-6, msg=name)
    assert naive["lm_head.weight" if "lm_head.weight" in naive else "model.embed_tokens.weight"].abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [4, 64], ids=["recomputed-chunks", "one-saved-chunk"])
def test_gradient_wrt_hidden_states_and_weight_of_token_logprobs(chunk_size):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=generator, requires_grad=True)
    head = torch.nn.Linear(8, 30)
    with torch.no_grad():
        head.weight.copy_(torch.randn(30, 8, generator=generator))
        head.bias.copy_(torch.randn(30, generator=generator))
    weight, bias = head.weight, head.bias
    targets = torch.randint(0, 30, (11,), generator=generator)
    (ours,) = token_logprobs(hidden, head, targets, chunk_size=chunk_size)
    naive = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(ours, naive, **TOL)
    g_ours = torch.autograd.grad(ours.sum(), (hidden, weight, bias))
    g_naive = torch.autograd.grad(naive.sum(), (hidden, weight, bias))
    for a, b in zip(g_ours, g_naive):
        torch.testing.assert_close(a, b, **TOL)


def test_target_logprobs_gradient_and_its_gradient_are_log_softmaxs():
    """The fused log-softmax-and-gather: values, the in-place backward (any upstream gradient, repeated targets) and
    the differentiable one double backprop takes (TRPO's Fisher products) against autograd's, in float64."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 3, 3, 8, 1, 0])
    upstream = torch.randn(6, dtype=torch.float64, generator=generator)
    logps, log_norm = logprobs._TargetLogProbs.apply(logits, targets)
    naive = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, naive)
    torch.testing.assert_close(log_norm, torch.logsumexp(logits, -1))
    assert not log_norm.requires_grad
    (ours,) = torch.autograd.grad(logps, logits, upstream)
    (theirs,) = torch.autograd.grad(naive, logits, upstream)
    torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradcheck(lambda x: logprobs._TargetLogProbs.apply(x, targets)[0], (logits,))
    assert torch.autograd.gradgradcheck(lambda x: logprobs._TargetLogProbs.apply(x, targets)[0], (logits,))


def test_no_completion_tokens(model):
    batch = _batch(model.config.vocab_size)
    empty = torch.zeros_like(batch["completion_mask"])
    out = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], empty, with_stats=True)
    assert out.token_logps.shape == batch["input_ids"].shape
    assert (out.token_logps == 0).all() and (out.lengths == 0).all() and (out.mean == 0).all()


def test_through_peft_model_and_with_adapter_disabled(model):
    batch = _batch(model.config.vocab_size, seed=4)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        base = _naive(model, batch)["token_logps"]
    lora = LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        adapted = _naive(peft_model, batch)["token_logps"]
        assert (adapted - base).abs().max() > 1e-2  # the adapter changes the outputs
        ours = completion_logprobs(peft_model, *args, chunk_size=5, with_stats=True)
        torch.testing.assert_close(ours.token_logps, adapted, **TOL)
        with peft_model.disable_adapter():
            disabled = completion_logprobs(peft_model, *args, chunk_size=5)
        torch.testing.assert_close(disabled.token_logps, base, **TOL)
        # Enabled again after the context.
        torch.testing.assert_close(completion_logprobs(peft_model, *args).token_logps, adapted, **TOL)
    # Gradients reach the adapter through the chunked head.
    peft_model.train()
    completion_logprobs(peft_model, *args, chunk_size=5).sum.sum().backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)
