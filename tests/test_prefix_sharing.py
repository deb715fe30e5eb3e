"""Prefix sharing (`DPOConfig.prefix_sharing`): one packed row `prompt, chosen, rejected` per pair gives the same
log-probs, losses and gradients as the `[2B, T]` rows of chosen and rejected sequences."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from hf_align import DataCollatorForPreference, DPOConfig, DPOTrainer
from hf_align.logprobs import CHOSEN, PROMPT, REJECTED, completion_logprobs, shared_prefix_logprobs

TOL = dict(rtol=1e-5, atol=1e-5)


def _pairs(vocab_size: int, seed: int = 0) -> list[dict]:
    """Ragged pairs: prompts of 1 to 7 tokens, chosen longer, shorter or as long as rejected."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5, 4, 2), (1, 9, 3), (7, 1, 6), (3, 6, 6)]  # (prompt, chosen, rejected) lengths

    def ids(n):
        return torch.randint(2, vocab_size, (n,), generator=generator).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in shapes]


@pytest.fixture
def sharp_model(tiny_model_path):
    def load(attn_implementation):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_path, dtype=torch.float32, attn_implementation=attn_implementation
        )
        with torch.no_grad():  # sharpen the near-uniform random logits so the statistics differ
            for param in model.parameters():
                param.mul_(4.0)
        return model.eval()

    return load


def test_packed_rows_and_segments():
    pairs = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]}]
    batch = DataCollatorForPreference(pad_token_id=0, max_length=4, prefix_sharing=True, pad_to_multiple_of=8)(pairs)
    # Each completion is truncated as in its own row: prompt + chosen[:2], prompt + rejected.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 10, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="keep_start"):
        DataCollatorForPreference(pad_token_id=0, max_length=4, truncation_mode="keep_end", prefix_sharing=True)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("max_length", [None, 9], ids=["whole", "truncated"])
def test_same_logprobs_as_separate_rows(attn_implementation, max_length, sharp_model):
    model = sharp_model(attn_implementation)
    pairs = _pairs(model.config.vocab_size)
    plain = DataCollatorForPreference(pad_token_id=1, max_length=max_length)(pairs)
    packed = DataCollatorForPreference(pad_token_id=1, max_length=max_length, prefix_sharing=True,
                                       pad_to_multiple_of=8)(pairs)
    with torch.no_grad():
        expected = completion_logprobs(model, plain["input_ids"], plain["attention_mask"], plain["completion_mask"],
                                       with_stats=True)
        got = shared_prefix_logprobs(model, packed["input_ids"], packed["segment_ids"], with_stats=True, chunk_size=5)
    assert got.mask.shape[0] == expected.mask.shape[0] == 2 * len(pairs)
    torch.testing.assert_close(got.lengths, expected.lengths)
    torch.testing.assert_close(got.sum, expected.sum, **TOL)
    for name in ("token_logps", "entropy", "mean_logit", "is_top1"):  # token by token, in order, row by row
        for row in range(2 * len(pairs)):
            got_values = getattr(got, name)[row][got.mask[row].bool()]
            expected_values = getattr(expected, name)[row][expected.mask[row].bool()]
            torch.testing.assert_close(got_values, expected_values, **TOL)


def test_flash_style_attention_is_refused(sharp_model):
    model = sharp_model("sdpa")
    model.config._attn_implementation = "flex_attention"
    packed = DataCollatorForPreference(pad_token_id=1, prefix_sharing=True)(_pairs(model.config.vocab_size))
    with pytest.raises(ValueError, match="eager or sdpa"):
        shared_prefix_logprobs(model, packed["input_ids"], packed["segment_ids"])


def _loss_and_grads(trainer, batch):
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0  # `num_tokens` is a running count
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, dict(trainer._metrics["train"])


@pytest.mark.parametrize("kind", ["preference", "preference_conversational"])
@pytest.mark.parametrize("peft", [False, True], ids=["copy-reference", "lora-reference"])
def test_dpo_loss_gradients_and_metrics_match(kind, peft, tiny_model_path, tiny_tokenizer, preference_data,
                                              tmp_path):
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_length=48, report_to="none", save_strategy="no")
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]) if peft else None
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                         train_dataset=preference_data(kind, 6), processing_class=tiny_tokenizer,
                         peft_config=peft_config)
    # Move the policy away from its reference (the copy, or the base with the adapter disabled).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and (not peft or "lora_B" in name):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    trainer.model.train()
    examples = [trainer.train_dataset[i] for i in range(6)]
    pad = tiny_tokenizer.pad_token_id
    plain = DataCollatorForPreference(pad, args.max_length)(examples)
    packed = DataCollatorForPreference(pad, args.max_length, prefix_sharing=True)(examples)
    assert packed["input_ids"].numel() < plain["input_ids"].numel()

    plain_loss, plain_grads, plain_metrics = _loss_and_grads(trainer, plain)
    packed_loss, packed_grads, packed_metrics = _loss_and_grads(trainer, packed)
    assert abs(plain_loss.item() - 0.6931) > 1e-3  # policy and reference really differ
    torch.testing.assert_close(packed_loss, plain_loss, **TOL)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, **TOL, msg=lambda m: f"{name}: {m}")
    assert packed_metrics.keys() == plain_metrics.keys()
    for name, values in plain_metrics.items():
        assert packed_metrics[name] == pytest.approx(values, rel=1e-4, abs=1e-5), name


def test_trainer_collates_packed_rows_when_switched_on(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path / "out"), prefix_sharing=True, max_steps=2,
                     per_device_train_batch_size=2, report_to="none", save_strategy="no")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                         train_dataset=preference_data("preference", 4), processing_class=tiny_tokenizer)
    assert "segment_ids" in trainer.data_collator([trainer.train_dataset[0]])
    trainer.train()
    assert trainer.state.global_step == 2
