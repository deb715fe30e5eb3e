"""hf_align.generation: shapes and masks, the cut after the first stop token, prompt rendering (text and chat),
reproducible sampling, train/eval mode, and generating through peft and DDP-style wrappers."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_align.generation import SamplingConfig, encode_prompts, generate_completions, stop_token_ids

TEXT_PROMPTS = [
    "Question: How do I bake bread?\nAnswer:",
    "Question: Hi?\nAnswer:",
    "Question: Can you explain why the sky is blue on a clear summer day?\nAnswer:",
]
CHAT_PROMPTS = [[{"role": "user", "content": "How do I bake bread?"}], [{"role": "user", "content": "Hi?"}]]


def _check_layout(completions, pad_token_id: int, stop_ids: list[int]) -> None:
    """Masks are a prefix of ones; a stop token, if any, is the last masked token; padding follows."""
    ids, mask = completions.completion_ids, completions.completion_mask
    assert ids.shape == mask.shape and ids.dtype == torch.long
    for row_ids, row_mask in zip(ids, mask):
        length = int(row_mask.sum())
        assert length >= 1 and row_mask[:length].all() and not row_mask[length:].any()
        stops = [i for i, token in enumerate(row_ids[:length].tolist()) if token in stop_ids]
        assert stops in ([], [length - 1])
        assert (row_ids[length:] == pad_token_id).all()


@pytest.fixture
def perturbed_model(tiny_model):
    """The tiny model with larger random weights: its greedy choices are clear (not near-ties of a fresh init)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in tiny_model.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return tiny_model


def test_shapes_masks_and_texts(tiny_model, tiny_tokenizer):
    sampling = SamplingConfig(max_new_tokens=7, num_generations=3, batch_size=4, seed=0)
    completions = generate_completions(tiny_model, tiny_tokenizer, TEXT_PROMPTS, sampling)
    assert completions.completion_ids.shape[0] == len(TEXT_PROMPTS) * 3
    assert completions.completion_ids.shape[1] <= 7
    assert len(completions.texts) == 9
    _check_layout(completions, tiny_tokenizer.pad_token_id, stop_token_ids(tiny_model, tiny_tokenizer))
    # Text prompts are tokenized as TRL does; the texts are the decoded completion tokens without special tokens.
    assert completions.prompt_ids == [tiny_tokenizer(text=p)["input_ids"] for p in TEXT_PROMPTS]
    for i, text in enumerate(completions.texts):
        tokens = completions.completion_ids[i][completions.completion_mask[i].bool()]
        assert text == tiny_tokenizer.decode(tokens, skip_special_tokens=True)


def test_rows_are_prompt_major(perturbed_model, tiny_tokenizer):
    """Row `i * G + g` is prompt `i`'s `g`-th completion: greedily, all G rows of a prompt are its own greedy text."""
    def greedy(prompts, generations):
        sampling = SamplingConfig(max_new_tokens=5, temperature=0, num_generations=generations, batch_size=4)
        return generate_completions(perturbed_model, tiny_tokenizer, prompts, sampling).texts

    singles = greedy(TEXT_PROMPTS, 1)
    assert len(set(singles)) == len(singles)  # distinct prompts give distinct texts, so the order is checked
    assert greedy(TEXT_PROMPTS, 2) == [text for text in singles for _ in range(2)]


def test_completions_are_cut_after_the_first_stop_token(perturbed_model, tiny_tokenizer):
    """`<|im_end|>` (a stop token from the model's generation config, not the tokenizer's eos) forced as the third
    token of the first row: that row keeps exactly three tokens, the others run to `max_new_tokens`."""
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = stop_token_ids(perturbed_model, tiny_tokenizer)
    assert stops[0] == tiny_tokenizer.eos_token_id and im_end in stops and len(stops) == len(set(stops))
    calls = []

    def force_stop(_module, _inputs, logits):
        calls.append(1)
        logits = logits.clone()
        logits[:, :, stops] = -1e4  # no stop token anywhere ...
        if len(calls) == 3:
            logits[0, -1, im_end] = 1e4  # ... except the third token of row 0
        return logits

    handle = perturbed_model.lm_head.register_forward_hook(force_stop)
    try:
        completions = generate_completions(
            perturbed_model, tiny_tokenizer, TEXT_PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0)
        )
    finally:
        handle.remove()
    _check_layout(completions, tiny_tokenizer.pad_token_id, stops)
    assert completions.lengths.tolist() == [3, 6, 6]
    assert completions.completion_ids[0, 2] == im_end
    assert "<|im_end|>" not in completions.texts[0]
    assert completions.texts[0] == tiny_tokenizer.decode(completions.completion_ids[0, :2])


def test_chat_prompts_render_with_the_generation_prompt(tiny_model, tiny_tokenizer):
    completions = generate_completions(tiny_model, tiny_tokenizer, CHAT_PROMPTS, SamplingConfig(max_new_tokens=3))
    expected = [tiny_tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                ["input_ids"] for p in CHAT_PROMPTS]
    assert completions.prompt_ids == [list(ids) for ids in expected]
    assert encode_prompts(tiny_tokenizer, CHAT_PROMPTS) == completions.prompt_ids
    rendered = tiny_tokenizer.decode(completions.prompt_ids[1])
    assert rendered == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"


def test_sampling_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone(tiny_model, tiny_tokenizer):
    def sample(seed):
        sampling = SamplingConfig(max_new_tokens=8, num_generations=2, seed=seed, temperature=1.0)
        return generate_completions(tiny_model, tiny_tokenizer, TEXT_PROMPTS, sampling).completion_ids

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, again, other = sample(0), sample(0), sample(1)
    assert torch.equal(torch.get_rng_state(), state)  # forked: the caller's random stream is untouched
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # The two samples of one prompt differ (sampling, not copies of one draw).
    assert not torch.equal(first[0], first[1])


def test_greedy_decoding_ignores_the_seed_and_left_padding_does_not_change_it(perturbed_model, tiny_tokenizer):
    def greedy(prompts, batch_size, seed):
        sampling = SamplingConfig(max_new_tokens=6, temperature=0, batch_size=batch_size, seed=seed)
        return generate_completions(perturbed_model, tiny_tokenizer, prompts, sampling).texts

    batched = greedy(TEXT_PROMPTS, 3, 0)  # prompts of different lengths, left-padded together
    assert batched == greedy(TEXT_PROMPTS, 3, 1)
    assert batched == [greedy([prompt], 1, 0)[0] for prompt in TEXT_PROMPTS]


def test_eval_mode_during_generation_and_mode_restored(tiny_model, tiny_tokenizer):
    modes = []
    handle = tiny_model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    try:
        for training in (True, False):
            tiny_model.train(training)
            generate_completions(tiny_model, tiny_tokenizer, TEXT_PROMPTS[:1], SamplingConfig(max_new_tokens=2))
            assert tiny_model.training is training
    finally:
        handle.remove()
    assert modes and not any(modes)


class _DDPLike(torch.nn.Module):
    """Holds the real model in `.module`, as DistributedDataParallel does."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_peft_model_generates_with_its_adapter_through_a_wrapper(perturbed_model, tiny_tokenizer):
    peft_model = get_peft_model(perturbed_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    wrapped = _DDPLike(peft_model)
    wrapped.train()
    with_adapter = generate_completions(wrapped, tiny_tokenizer, TEXT_PROMPTS, greedy)
    assert wrapped.training and peft_model.training
    with peft_model.disable_adapter():
        base = generate_completions(peft_model, tiny_tokenizer, TEXT_PROMPTS, greedy)
    merged = peft_model.merge_and_unload()
    assert generate_completions(merged, tiny_tokenizer, TEXT_PROMPTS, greedy).texts == with_adapter.texts
    assert base.texts != with_adapter.texts


def test_invalid_settings_raise(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-0.1)
    with pytest.raises(ValueError, match="at least 1"):
        SamplingConfig(num_generations=0)
    with pytest.raises(ValueError, match="empty"):
        generate_completions(tiny_model, tiny_tokenizer, [])
