"""Packed rows (`hf_align.packing`): prefix sharing (a prompt held once for all of its completions) and padding-free
batches (every sequence of a batch in one row) give the same per-token log-probs, losses, gradients and metrics as
the plain rows, for the preference trainers' pairs and for the online trainers' groups of completions."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from hf_align import DataCollatorForPreference, DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SimPOConfig, SimPOTrainer
from hf_align.logprobs import completion_logprobs
from hf_align.packing import PackedLayout, batch_token_count, pack_sequences
from hf_align.rollout import Rollout
from hf_align.sequence_logprobs import batch_logprobs, completion_token_logprobs

TOL = dict(rtol=1e-5, atol=1e-5)
MODES = {"sharing": dict(prefix_sharing=True), "padding_free": dict(padding_free=True),
         "both": dict(prefix_sharing=True, padding_free=True)}


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


def test_layout_of_shared_and_padding_free_rows():
    sequences = [([5, 6], [[7, 8, 9], [10]], [0, 2]), ([11], [[12, 13]], [1])]
    shared = pack_sequences(sequences, pad_token_id=0)
    assert shared["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]]
    assert shared["completion_index"].tolist() == [[-1, -1, 0, 0, 0, 2], [-1, 1, 1, -1, -1, -1]]
    assert shared["sequence_ids"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert shared["completion_lengths"].tolist() == [3, 2, 1]
    layout = PackedLayout(shared["sequence_ids"], shared["completion_index"])
    # Each completion restarts after its prompt: [10] sits where [7] does in its own row.
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 2, 0, 0, 0]]
    predictor, scored = layout.predictors()
    assert predictor[0][scored[0]].tolist() == [1, 2, 3, 1]

    flat = pack_sequences(sequences, pad_token_id=0, padding_free=True)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert flat["sequence_ids"].tolist() == [[1, 1, 1, 1, 1, 1, 2, 2, 2]]
    layout = PackedLayout(flat["sequence_ids"], flat["completion_index"])
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 2]]
    mask = layout.attention_mask(torch.float32)[0, 0] == 0
    assert mask[5].tolist() == [True, True, False, False, False, True, False, False, False]  # [10]: prompt and itself
    assert mask[7].tolist() == [False] * 6 + [True, True, False]  # the second sequence sees only itself
    # As unpacked rows: prompt [5, 6] twice (two completions), [11] once, and every completion token once.
    assert batch_token_count(flat) == 2 * 2 + 1 + 6


def test_collator_truncates_each_completion_as_in_its_own_row():
    pairs = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]}]
    batch = DataCollatorForPreference(pad_token_id=0, max_length=4, prefix_sharing=True, pad_to_multiple_of=8)(pairs)
    # prompt + chosen[:2], prompt + rejected; completion 0 is the chosen one, completion 1 (= B + 0) the rejected.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 10, 0, 0, 0]]
    assert batch["completion_index"].tolist() == [[-1, -1, 0, 0, 1, -1, -1, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    flat = DataCollatorForPreference(pad_token_id=0, max_length=4, truncation_mode="keep_end", padding_free=True)(pairs)
    # keep_end cuts the start of each `prompt + completion`, as the padded rows do: [6, 7, 8, 9] and [5, 6, 10].
    assert flat["input_ids"].tolist() == [[6, 7, 8, 9, 5, 6, 10]]
    with pytest.raises(ValueError, match="keep_start"):
        DataCollatorForPreference(pad_token_id=0, max_length=4, truncation_mode="keep_end", prefix_sharing=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("max_length", [None, 9], ids=["whole", "truncated"])
def test_pairs_get_the_log_probs_of_separate_rows(mode, attn_implementation, max_length, sharp_model):
    model = sharp_model(attn_implementation)
    pairs = _pairs(model.config.vocab_size)
    plain = DataCollatorForPreference(pad_token_id=1, max_length=max_length)(pairs)
    packed = DataCollatorForPreference(pad_token_id=1, max_length=max_length, pad_to_multiple_of=8,
                                       **MODES[mode])(pairs)
    with torch.no_grad():
        expected = completion_logprobs(model, plain["input_ids"], plain["attention_mask"], plain["completion_mask"],
                                       with_stats=True)
        got = batch_logprobs(model, packed, with_stats=True, chunk_size=5)
    assert got.mask.shape[0] == expected.mask.shape[0] == 2 * len(pairs)
    torch.testing.assert_close(got.lengths, expected.lengths)
    torch.testing.assert_close(got.sum, expected.sum, **TOL)
    for name in ("token_logps", "entropy", "mean_logit", "is_top1"):  # token by token, in order, row by row
        for row in range(2 * len(pairs)):
            got_values = getattr(got, name)[row][got.mask[row].bool()]
            expected_values = getattr(expected, name)[row][expected.mask[row].bool()]
            torch.testing.assert_close(got_values, expected_values, **TOL)
    assert batch_token_count(packed) == plain["attention_mask"].sum()


def _rollout(vocab_size: int) -> Rollout:
    """Two groups of three samples, shuffled; left-padded prompts; ragged completions, one of them empty (a truncated
    completion masked out)."""
    generator = torch.Generator().manual_seed(1)
    prompts = [[5, 6, 7, 8]] * 3 + [[9, 10]] * 3
    lengths = [5, 3, 1, 4, 0, 2]
    width = max(map(len, prompts))
    rollout = {
        "prompt_ids": torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
        "prompt_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        "completion_ids": torch.randint(3, vocab_size, (6, 5), generator=generator),
        "completion_mask": torch.tensor([[1] * n + [0] * (5 - n) for n in lengths]),
    }
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    return Rollout(**{key: value[order] for key, value in rollout.items()})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_groups_get_the_log_probs_and_gradients_of_separate_rows(mode, attn_implementation, sharp_model):
    model = sharp_model(attn_implementation)
    rollout = _rollout(model.config.vocab_size)
    results = []
    for options in ({}, MODES[mode]):
        model.zero_grad()
        out = completion_token_logprobs(model, rollout, temperature=0.7, with_stats=True, batch_size=4, **options)
        (out.token_logps * out.mask).sum().backward()
        results.append((out, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (expected, expected_grads), (got, got_grads) = results
    assert expected.token_logps.shape == got.token_logps.shape == rollout.completion_ids.shape
    for name in ("token_logps", "mask", "entropy", "mean_logit", "is_top1"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), **TOL)
    for name, grad in expected_grads.items():  # fp32 summation order differs: compare relative to the gradient's size
        assert (got_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_flash_style_attention_is_refused(sharp_model):
    model = sharp_model("sdpa")
    model.config._attn_implementation = "flex_attention"
    packed = DataCollatorForPreference(pad_token_id=1, prefix_sharing=True)(_pairs(model.config.vocab_size))
    with pytest.raises(ValueError, match="eager or sdpa"):
        batch_logprobs(model, packed)


def _loss_and_grads(trainer, batch):
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0  # `num_tokens` is a running count
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, dict(trainer._metrics["train"])


def _move_away(trainer, peft: bool) -> None:
    """Moves the policy away from its reference (the copy, or the base with the adapter disabled)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and (not peft or "lora_B" in name):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    trainer.model.train()


def _assert_same_step(trainer, plain, packed):
    plain_loss, plain_grads, plain_metrics = _loss_and_grads(trainer, plain)
    packed_loss, packed_grads, packed_metrics = _loss_and_grads(trainer, packed)
    torch.testing.assert_close(packed_loss, plain_loss, **TOL)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, **TOL, msg=lambda m: f"{name}: {m}")
    assert packed_metrics.keys() == plain_metrics.keys()
    for name, values in plain_metrics.items():
        assert packed_metrics[name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
    return plain_loss


@pytest.mark.parametrize(
    "mode, kind, peft",
    [("sharing", "preference", False), ("sharing", "preference_conversational", True),
     ("padding_free", "preference", True), ("both", "preference_conversational", False)],
)
def test_dpo_loss_gradients_and_metrics_match(mode, kind, peft, tiny_model_path, tiny_tokenizer, preference_data,
                                              tmp_path):
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_length=48, report_to="none", save_strategy="no")
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]) if peft else None
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                         train_dataset=preference_data(kind, 6), processing_class=tiny_tokenizer,
                         peft_config=peft_config)
    _move_away(trainer, peft)
    examples = [trainer.train_dataset[i] for i in range(6)]
    pad = tiny_tokenizer.pad_token_id
    plain = DataCollatorForPreference(pad, args.max_length)(examples)
    packed = DataCollatorForPreference(pad, args.max_length, **MODES[mode])(examples)
    assert packed["input_ids"].numel() < plain["input_ids"].numel()
    loss = _assert_same_step(trainer, plain, packed)
    assert abs(loss.item() - 0.6931) > 1e-3  # policy and reference really differ


def test_simpo_loss_gradients_and_metrics_match(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    args = SimPOConfig(output_dir=str(tmp_path / "out"), max_length=48, report_to="none", save_strategy="no")
    trainer = SimPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                           train_dataset=preference_data("preference", 6), processing_class=tiny_tokenizer)
    _move_away(trainer, peft=False)
    examples = [trainer.train_dataset[i] for i in range(6)]
    pad = tiny_tokenizer.pad_token_id
    _assert_same_step(trainer, DataCollatorForPreference(pad, args.max_length)(examples),
                      DataCollatorForPreference(pad, args.max_length, **MODES["both"])(examples))


@pytest.mark.parametrize("mode", ["sharing", "padding_free"])
def test_kto_loss_gradients_and_metrics_match(mode, tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    """Each row's prompt shared by its completion and its mismatched KL completion: the policy scores both in one
    forward, the reference too, and z0, the loss, the gradients and the metrics are the plain batch's."""
    args = KTOConfig(output_dir=str(tmp_path / "out"), max_length=48, per_device_train_batch_size=4,
                     report_to="none", save_strategy="no")
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                         train_dataset=embedded_data("unpaired_preference", 4), processing_class=tiny_tokenizer)
    _move_away(trainer, peft=False)
    examples = [trainer.train_dataset[i] for i in range(4)]
    assert "KL_completion_ids" in examples[0]
    plain = trainer.data_collator(examples)
    trainer.data_collator.prefix_sharing, trainer.data_collator.padding_free = mode == "sharing", mode != "sharing"
    packed = trainer.data_collator(examples)
    assert "completion_index" in packed
    _assert_same_step(trainer, plain, packed)


@pytest.mark.parametrize("trainer_class, config_class", [(DPOTrainer, DPOConfig), (SimPOTrainer, SimPOConfig)])
def test_trainer_collates_packed_rows_when_switched_on(trainer_class, config_class, tiny_model_path, tiny_tokenizer,
                                                       preference_data, tmp_path):
    args = config_class(output_dir=str(tmp_path / "out"), prefix_sharing=True, padding_free=True, max_steps=2,
                        per_device_train_batch_size=2, report_to="none", save_strategy="no")
    trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                            train_dataset=preference_data("preference", 4), processing_class=tiny_tokenizer)
    assert trainer.data_collator([trainer.train_dataset[0]])["input_ids"].size(0) == 1
    trainer.train()
    assert trainer.state.global_step == 2
