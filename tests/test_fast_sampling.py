"""hf_align.generation's decode loop (`_decode_sharing_prompts`: each prompt prefilled once for its group, finished
rows dropped from the batch, tokens drawn by inverse CDF) against Hugging Face `generate` (the plain path) drawing
with the same sampler in place of `torch.multinomial`: the same completions under the same seed, with every sampling
filter, groups, ragged prompts and batches that split a group; the sampler's draws follow the distribution; the
prompt runs through the model once per distinct prompt; peft models; and the cases that fall back to `generate`."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_align import generation
from hf_align.generation import SamplingConfig, generate_completions
from hf_align.trainers.grpo import cast_lm_head_to_fp32

# Ragged lengths; the first prompt twice, so identical prompts arrive from different places of the batch too.
PROMPTS = [
    "Question: Can you explain why the sky is blue on a clear summer day?\nAnswer:",
    "Question: Hi?\nAnswer:",
    "Question: How do I bake bread?\nAnswer:",
    "Question: Can you explain why the sky is blue on a clear summer day?\nAnswer:",
]
FILTERS = dict(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.3)


@pytest.fixture
def stopping_model(tiny_model, tiny_tokenizer):
    """The tiny model with its four most often sampled tokens added as stop tokens, so that completions end at many
    different lengths (the tiny model rarely samples eos) and finished rows leave the decode batch."""
    sampled = _sample(tiny_model, tiny_tokenizer, fast=False, num_generations=4, max_new_tokens=24, seed=0)
    common = torch.bincount(sampled.completion_ids.flatten()).topk(4).indices.tolist()
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, *common]
    return tiny_model


def _multinomial_by_inverse_cdf(probs, num_samples):
    """`torch.multinomial(probs, 1)` as the decode loop draws it: one float64 uniform per row of the batch."""
    assert num_samples == 1
    return generation.inverse_cdf_sample(probs, torch.rand(probs.size(0), dtype=torch.float64))[:, None]


def _sample(model, tokenizer, *, fast: bool, prompts=PROMPTS, **settings):
    """`generate_completions` through the decode loop (`fast`) or through `generate` alone, which then draws each
    token with the loop's sampler (its batch keeps finished rows, so it draws a uniform for each row at each step
    as the loop does)."""
    if fast:
        return generate_completions(model, tokenizer, prompts, SamplingConfig(**settings))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "_decode_loop_config", lambda *args: None)
        patch.setattr(torch, "multinomial", _multinomial_by_inverse_cdf)
        return generate_completions(model, tokenizer, prompts, SamplingConfig(**settings))


def test_inverse_cdf_draws_follow_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.15, 0.1, 0.05], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    draws = 200_000
    uniforms = torch.rand(draws, 2, dtype=torch.float64, generator=generator)
    tokens = generation.inverse_cdf_sample(probs.repeat(draws, 1), uniforms.flatten()).view(draws, 2)
    counts = torch.bincount(tokens[:, 0], minlength=6).double()
    assert counts[1] == 0  # a zero-probability token is never drawn
    expected = probs[0] * draws
    support = expected > 0
    chi_square = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    assert chi_square < 18.47  # the 0.999 quantile of chi-square with 4 degrees of freedom
    assert torch.all(tokens[:, 1] == 5)
    # the edges: u = 0 draws the first token with mass, u just below 1 the last one
    edges = generation.inverse_cdf_sample(probs[:1].repeat(2, 1), torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64))
    assert edges.tolist() == [0, 5]
    for invalid in ([0.5, float("nan")], [0.0, 0.0]):
        with pytest.raises(RuntimeError, match="inf or nan, or sum to zero"):
            generation.inverse_cdf_sample(torch.tensor([invalid]), torch.tensor([0.3], dtype=torch.float64))


def test_inverse_cdf_over_blocks_is_the_whole_rows_inverse_cdf():
    """A vocabulary of several blocks and a shorter last one (`INVERSE_CDF_BLOCK` tokens each), a block with no mass
    and zero-probability tokens at block edges: each draw is the token the whole row's float64 cumulative sum gives
    up to float32's rounding of the block sums (a draw may differ only where its target lies within 1e-6 of the
    boundary between the two tokens), and no zero-probability token is drawn, the uniform's edges included."""
    block = generation.INVERSE_CDF_BLOCK
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 3 * block + 100, generator=generator) ** 4
    probs[:, block : 2 * block] = 0  # a whole block
    probs[:, [0, block - 1, 2 * block, 3 * block - 1, 3 * block, -1]] = 0  # the edges of the others
    probs[2, : 3 * block] = 0  # a row whose mass is all in the last, shorter block
    probs /= probs.sum(-1, keepdim=True)
    draws = 20_000
    uniforms = torch.cat([torch.rand(draws * 3, dtype=torch.float64, generator=generator),
                          torch.tensor([0.0, 0.0, 0.0, 1 - 2**-53, 1 - 2**-53, 1 - 2**-53], dtype=torch.float64)])
    rows = probs.repeat(draws + 2, 1)
    tokens = generation.inverse_cdf_sample(rows, uniforms)
    whole_cdf = rows.double().cumsum(-1)
    targets = (uniforms * whole_cdf[:, -1])[:, None]
    expected = torch.searchsorted(whole_cdf, targets, right=True).squeeze(1)
    differ = tokens != expected
    assert differ.sum() <= 3
    boundary = whole_cdf[differ].gather(1, torch.minimum(tokens, expected)[differ, None])
    assert torch.allclose(boundary, targets[differ], rtol=0, atol=1e-6)
    assert (rows.gather(1, tokens[:, None]) > 0).all()
    assert (tokens.view(-1, 3)[:, 2] >= 3 * block).all()


@pytest.mark.parametrize("settings", [
    dict(num_generations=4),
    dict(num_generations=3, **FILTERS),
    dict(num_generations=2, temperature=0),
    # batches of 6 rows split groups of 4; left padding to a multiple of 8
    dict(num_generations=4, batch_size=6, pad_to_multiple_of=8),
    dict(num_generations=3, generation_kwargs={"no_repeat_ngram_size": 2, "min_new_tokens": 3}),
], ids=["temperature-1", "filters", "greedy", "split-groups-padded", "generation-kwargs"])
def test_decode_loop_gives_generates_completions(stopping_model, tiny_tokenizer, settings):
    plain = _sample(stopping_model, tiny_tokenizer, fast=False, max_new_tokens=24, seed=7, **settings)
    fast = _sample(stopping_model, tiny_tokenizer, fast=True, max_new_tokens=24, seed=7, **settings)
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert torch.equal(fast.completion_mask, plain.completion_mask)
    assert fast.texts == plain.texts
    if settings.get("temperature") != 0:  # rows finished early, at different steps, while others ran on
        assert plain.lengths.min() < plain.lengths.max() == 24


def test_each_distinct_prompt_is_prefilled_once(stopping_model, tiny_tokenizer):
    batch_sizes = []
    hook = stopping_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        generate_completions(stopping_model, tiny_tokenizer, PROMPTS, SamplingConfig(num_generations=4, seed=0))
    finally:
        hook.remove()
    width = max(len(ids) for ids in tiny_tokenizer(PROMPTS)["input_ids"])
    assert batch_sizes[0] == (3, width)  # 16 rows, three distinct prompts
    assert all(rows <= 16 and length == 1 for rows, length in batch_sizes[1:])
    assert batch_sizes[-1][0] < 16  # finished rows left the batch


def test_peft_model_samples_as_generate_does(tiny_model, tiny_tokenizer):
    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain = _sample(model, tiny_tokenizer, fast=False, num_generations=3, max_new_tokens=12, seed=1)
    fast = _sample(model, tiny_tokenizer, fast=True, num_generations=3, max_new_tokens=12, seed=1)
    assert torch.equal(fast.completion_ids, plain.completion_ids)


def test_sliding_window_model_and_static_cache_fall_back_to_generate(tiny_model, tiny_tokenizer):
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    config = GenerationConfig(max_new_tokens=4, do_sample=True, eos_token_id=[0], pad_token_id=0)
    assert generation._decode_loop_config(tiny_model, config, torch.device("cpu")) is not None
    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=4))
    assert generation._decode_loop_config(sliding, config, torch.device("cpu")) is None
    static = GenerationConfig(**{**config.to_diff_dict(), "cache_implementation": "static"})
    assert generation._decode_loop_config(tiny_model, static, torch.device("cpu")) is None
    # a guided (classifier-free guidance) processor reads another forward pass, not only its row
    guided = GenerationConfig(**{**config.to_diff_dict(), "guidance_scale": 1.5})
    assert generation._decode_loop_config(tiny_model, guided, torch.device("cpu")) is None
    sampled = generate_completions(tiny_model, tiny_tokenizer, PROMPTS[:2],
                                   SamplingConfig(max_new_tokens=4, cache_implementation="static", seed=0))
    assert sampled.completion_ids.shape[0] == 2


def test_head_product_gives_linears_logits_and_is_undone(tiny_model):
    head = tiny_model.get_output_embeddings()
    hidden = torch.randn(5, 1, head.in_features)
    with generation._head_as_vocab_major_product(tiny_model):
        assert "forward" in vars(head)
        logits = head(hidden)
    assert "forward" not in vars(head)
    assert logits.shape == (5, 1, head.out_features)
    torch.testing.assert_close(logits, torch.nn.functional.linear(hidden, head.weight), rtol=1e-5, atol=1e-5)


def test_head_product_leaves_an_accelerate_hooked_head_alone(tiny_model):
    from accelerate.hooks import ModelHook, add_hook_to_module

    head = tiny_model.get_output_embeddings()
    add_hook_to_module(head, ModelHook())  # as accelerate's offloading hooks a module
    hook_forward = vars(head)["forward"]
    with generation._head_as_vocab_major_product(tiny_model):
        assert vars(head)["forward"] is hook_forward
    assert vars(head)["forward"] is hook_forward


def test_head_product_leaves_other_heads_alone(tiny_model):
    hooked = tiny_model.get_output_embeddings()
    handle = hooked.register_forward_hook(lambda *args: None)
    with generation._head_as_vocab_major_product(tiny_model):
        assert "forward" not in vars(hooked)
    handle.remove()
    cast_lm_head_to_fp32(tiny_model)  # a forward of its own, which sampling must keep
    own_forward = vars(hooked)["forward"]
    with generation._head_as_vocab_major_product(tiny_model):
        assert vars(hooked)["forward"] is own_forward
    assert vars(hooked)["forward"] is own_forward
    lora_head = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["lm_head"]))
    with generation._head_as_vocab_major_product(lora_head.get_base_model()):
        assert "forward" not in vars(lora_head.get_base_model().get_output_embeddings())
