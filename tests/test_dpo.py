"""DPOTrainer: TRL's quickstart with the import swapped, learning on held-out pairs, data validation, and how the
reference model is obtained (frozen copy, peft adapter disabled, precomputed log-probs)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from hf_align import DataError, DPOConfig, DPOTrainer

FAST = dict(max_steps=3, per_device_train_batch_size=2, report_to="none", save_strategy="no")


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _naive_sequence_logps(model, batch) -> torch.Tensor:
    """Summed completion log-probs from the full logits (independent of `hf_align.logprobs`)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


# ----------------------------------------------------------------------------------------------------- quickstart


@pytest.mark.parametrize("as_path", [False, True], ids=["model-object", "model-path"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_trl_quickstart_runs_with_import_swapped(as_path, peft, tiny_model_path, tiny_tokenizer, preference_data,
                                                 tmp_path):
    # TRL's documented quickstart, with `from trl import ...` replaced by `from hf_align import ...`.
    if as_path:
        model = tiny_model_path  # a model id: the trainer loads the model and its tokenizer
        kwargs = {}
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        kwargs = {"processing_class": tiny_tokenizer}
    if peft:
        kwargs["peft_config"] = LoraConfig()
    train_dataset = preference_data("preference", 16)

    training_args = DPOConfig(output_dir=str(tmp_path / "tiny-DPO"), **FAST)
    trainer = DPOTrainer(model=model, args=training_args, train_dataset=train_dataset, **kwargs)
    before = _params(trainer.model)
    trainer.train()

    assert trainer.state.global_step == 3
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    after = dict(trainer.model.named_parameters())
    trainable = {name for name, p in after.items() if p.requires_grad}
    changed = {name for name in trainable if not torch.equal(before[name], after[name].detach())}
    assert changed, "no trainable parameter moved"
    if peft:
        assert isinstance(trainer.model, PeftModel) and trainer.ref_model is None
        assert trainable and all("lora_" in name for name in trainable)
        frozen = [name for name in after if name not in trainable]
        assert all(torch.equal(before[name], after[name].detach()) for name in frozen)
    else:
        assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
        assert trainable == set(after)


def test_bf16_on_cpu_warns_and_trains_in_fp32(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    """TRL's DPOConfig defaults to bf16; hf_align picks fp32 on a CPU, and an explicit `bf16=True` warns."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.warns(UserWarning, match="bf16"):
        args = DPOConfig(output_dir=str(tmp_path / "out"), bf16=True, **FAST)
    assert args.bf16 is False and args.fp16 is False and args.precision == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the default config does not warn
        assert DPOConfig(output_dir=str(tmp_path / "out2"), report_to="none").precision == "fp32"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_data("preference", 8),
                         processing_class=tiny_tokenizer)
    assert trainer.accelerator.mixed_precision == "no"
    trainer.train()
    assert trainer.state.global_step == 3
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.ref_model.parameters())


# ------------------------------------------------------------------------------------------- held-out learning


def test_dpo_learns_held_out_preferences(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    train, test = preference_data("preference", split="train"), preference_data("preference", split="test")
    args = DPOConfig(
        output_dir=str(tmp_path / "out"), learning_rate=5e-4, max_steps=40, per_device_train_batch_size=8,
        per_device_eval_batch_size=len(test),  # one eval batch: the logged accuracy is the exact fraction
        lr_scheduler_type="constant", logging_steps=10, report_to="none", save_strategy="no", seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tiny_tokenizer)

    prepared_test = trainer.prepare_eval_dataset(test, "test")
    batch = trainer.data_collator([prepared_test[i] for i in range(len(prepared_test))])

    def policy_beats_reference() -> float:
        """Fraction of held-out pairs where the policy's logp(chosen) - logp(rejected) exceeds the reference's."""
        policy_c, policy_r = _naive_sequence_logps(trainer.model, batch).chunk(2)
        ref_c, ref_r = _naive_sequence_logps(trainer.ref_model, batch).chunk(2)
        return ((policy_c - policy_r) > (ref_c - ref_r)).float().mean().item()

    before = trainer.evaluate(test)  # a raw split: `evaluate` prepares it, as TRL's does
    beats_before = policy_beats_reference()
    ref_before = _naive_sequence_logps(trainer.ref_model, batch)
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 0
    assert before["eval_rewards/accuracies"] == 0.0 and beats_before == 0.0

    trainer.train()
    after = trainer.evaluate(test)
    beats_after = policy_beats_reference()
    assert after["eval_rewards/accuracies"] > 0.8, after
    assert after["eval_rewards/margins"] > 0
    assert after["eval_loss"] < before["eval_loss"]
    assert beats_after > 0.8 and beats_after > beats_before
    # The trainer's reward accuracy is exactly this fraction: β(Δpolicy - Δref) > 0.
    assert after["eval_rewards/accuracies"] == pytest.approx(beats_after, abs=1.5 / len(test))
    # The reference stayed frozen: held-out reference log-probs are unchanged by training.
    assert torch.equal(_naive_sequence_logps(trainer.ref_model, batch), ref_before)
    assert trainer.state.global_step == 40


# ---------------------------------------------------------------------------------------------- malformed data


def _rows(n: int = 6) -> list[dict]:
    return [{"prompt": f"Question {i}?\nAnswer:", "chosen": f" Yes, {i}.", "rejected": " No."} for i in range(n)]


def _conv_rows(n: int = 6) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": [{"role": "assistant", "content": f"Yes, {i}."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
        for i in range(n)
    ]


def _build(dataset, tiny_model_path, tiny_tokenizer, tmp_path, **config):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    args = DPOConfig(output_dir=str(tmp_path / "out"), **{**FAST, **config})
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)


def _with(rows, index, **changes):
    rows = [dict(row) for row in rows]
    rows[index].update(changes)
    return rows


MALFORMED = {
    "missing-rejected": (
        Dataset.from_list([{k: v for k, v in row.items() if k != "rejected"} for row in _rows()]), ["rejected"]
    ),
    "missing-rejected-implicit-prompt": (Dataset.from_list([{"chosen": "a b"} for _ in range(3)]), ["rejected"]),
    "empty-chosen-row-3": (Dataset.from_list(_with(_rows(), 3, chosen="")), ["row 3", "'chosen'", "empty"]),
    "blank-chosen-row-3": (Dataset.from_list(_with(_rows(), 3, chosen="   ")), ["row 3", "'chosen'"]),
    "none-chosen-row-2": (Dataset.from_list(_with(_rows(), 2, chosen=None)), ["row 2", "'chosen'", "None"]),
    "int-rejected": (Dataset.from_list([{**row, "rejected": 7} for row in _rows()]), ["row 0", "'rejected'", "int"]),
    "int-prompt": (
        Dataset.from_list([{**row, "prompt": i} for i, row in enumerate(_rows())]), ["row 0", "'prompt'"]
    ),
    "wrong-role-row-1": (
        Dataset.from_list(_with(_conv_rows(), 1, chosen=[{"role": "bot", "content": "Yes."}])),
        ["row 1", "'chosen'", "'bot'"],
    ),
    "conversational-prompt-text-completions": (
        Dataset.from_list([{**row, "chosen": " Yes.", "rejected": " No."} for row in _conv_rows()]),
        ["row 0", "'chosen'"],
    ),
    "text-prompt-conversational-completions": (
        Dataset.from_list([{**row, "prompt": "Question?"} for row in _conv_rows()]),
        ["row 0", "'prompt'"],
    ),
    "empty-message-list-row-5": (
        Dataset.from_list(_with(_conv_rows(), 5, rejected=[])), ["row 5", "'rejected'"]
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_data_raises_before_training(case, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset, fragments = MALFORMED[case]
    with pytest.raises(DataError) as info:
        _build(dataset, tiny_model_path, tiny_tokenizer, tmp_path)  # the constructor: nothing has trained yet
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "train" in message


def test_malformed_eval_dataset_names_the_eval_dataset(tiny_model_path, tiny_tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(DataError, match=r"eval dataset, row 3, column 'chosen'"):
        DPOTrainer(
            model=model, args=DPOConfig(output_dir=str(tmp_path / "o"), **FAST), processing_class=tiny_tokenizer,
            train_dataset=Dataset.from_list(_rows()), eval_dataset=Dataset.from_list(_with(_rows(), 3, chosen="")),
        )


def test_overlong_prompts_are_dropped_and_counted(tiny_model_path, tiny_tokenizer, tmp_path):
    long_prompt = "Question: " + "please explain this in detail " * 40 + "\nAnswer:"
    assert len(tiny_tokenizer(long_prompt)["input_ids"]) > 64
    rows = _rows(8)
    for index in (1, 4, 6):
        rows[index] = {**rows[index], "prompt": long_prompt}
    trainer = _build(Dataset.from_list(rows), tiny_model_path, tiny_tokenizer, tmp_path, max_length=64)
    assert trainer.dropped_rows["train"] == 3
    assert len(trainer.train_dataset) == 5
    assert all(len(ids) < 64 for ids in trainer.train_dataset["prompt_ids"])
    trainer.train()  # what is left trains
    assert trainer.state.global_step == 3


def test_every_prompt_too_long_raises(tiny_model_path, tiny_tokenizer, tmp_path):
    rows = [{**row, "prompt": "Question: " + "tell me more " * 60} for row in _rows(4)]
    with pytest.raises(DataError, match="max_length=32"):
        _build(Dataset.from_list(rows), tiny_model_path, tiny_tokenizer, tmp_path, max_length=32)


# --------------------------------------------------------------------------------------------- reference handling


def test_frozen_copy_reference_for_model_built_in_memory(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    """No `ref_model`, no peft: the trainer copies the model in memory (TRL reloads `config._name_or_path`, which a
    model built in memory does not have)."""
    config = AutoConfig.from_pretrained(tiny_model_path)
    config._name_or_path = ""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.config._name_or_path == ""
    args = DPOConfig(output_dir=str(tmp_path / "out"), learning_rate=1e-3, **FAST)
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_data("preference", 8),
                         processing_class=tiny_tokenizer)
    reference = trainer.ref_model
    assert reference is not None and reference is not trainer.model
    assert not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    ref_before = _params(reference)
    policy_before = _params(trainer.model)
    assert all(torch.equal(ref_before[name], policy_before[name]) for name in ref_before)
    # No shared storage: updating the policy cannot move the reference.
    ref_ptrs = {p.data_ptr() for p in reference.parameters()}
    assert not ref_ptrs & {p.data_ptr() for p in trainer.model.parameters()}

    trainer.train()
    assert any(not torch.equal(policy_before[n], p.detach()) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(ref_before[n], p) for n, p in reference.named_parameters())
    assert trainer.state.log_history[-1]["train_loss"] > 0


def test_trl_cannot_build_a_reference_for_a_model_built_in_memory(tiny_model_path, tiny_tokenizer, preference_data,
                                                                 tmp_path):
    """Documents why hf_align copies in memory: TRL 1.16 reloads the reference from `config._name_or_path`."""
    trl = pytest.importorskip("trl")
    if not trl.__version__.startswith("1.16"):
        pytest.skip("documents TRL 1.16's behaviour")
    config = AutoConfig.from_pretrained(tiny_model_path)
    config._name_or_path = ""
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, gradient_checkpointing=False)
    with pytest.raises(OSError):
        trl.DPOTrainer(model=LlamaForCausalLM(config), args=args, train_dataset=preference_data("preference", 4),
                       processing_class=tiny_tokenizer)


def test_peft_reference_is_the_base_model(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    args = DPOConfig(output_dir=str(tmp_path / "out"), **FAST)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_data("preference", 8),
                         processing_class=tiny_tokenizer, peft_config=peft_config)
    assert trainer.ref_model is None
    # A freshly initialised LoRA is a no-op; move it so policy and base differ.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    base_logps = _naive_sequence_logps(base, batch)
    trainer.model.train()
    policy_before = _naive_sequence_logps(trainer.model, batch)
    reference = trainer.reference_logps(batch)
    ref_logps = torch.cat([reference["ref_chosen_logps"], reference["ref_rejected_logps"]])
    torch.testing.assert_close(ref_logps, base_logps, rtol=1e-5, atol=1e-4)
    assert (policy_before - base_logps).abs().max() > 1e-2  # the adapter really changes the policy
    # The adapter is enabled again afterwards, and the trainer's rewards use policy vs base.
    torch.testing.assert_close(_naive_sequence_logps(trainer.model, batch), policy_before)
    trainer.compute_loss(trainer.model, batch)
    expected_margin = args.beta * ((policy_before - base_logps).chunk(2)[0] - (policy_before - base_logps).chunk(2)[1])
    assert trainer._metrics["train"]["rewards/margins"][-1] == pytest.approx(expected_margin.mean().item(), rel=1e-3)


def test_peft_model_without_config_compares_against_its_base(tiny_model_path, tiny_tokenizer, preference_data,
                                                             tmp_path):
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    trainer = DPOTrainer(model=peft_model, args=DPOConfig(output_dir=str(tmp_path / "out"), **FAST),
                         train_dataset=preference_data("preference", 8), processing_class=tiny_tokenizer)
    assert trainer.ref_model is None and trainer.model is peft_model
    trainer.train()
    assert trainer.state.global_step == 3


@pytest.mark.parametrize("kind", ["preference", "preference_conversational"])
def test_precomputed_reference_matches_live_reference(kind, tiny_model_path, tiny_tokenizer, preference_data,
                                                      tmp_path):
    train, test = preference_data(kind, 8), preference_data(kind, 6, split="test")

    def build(precompute: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        args = DPOConfig(
            output_dir=str(tmp_path / f"out-{precompute}"), precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=3, per_device_train_batch_size=8, max_steps=2, logging_steps=1,
            learning_rate=1e-3, report_to="none", save_strategy="no",
        )
        return DPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                          processing_class=tiny_tokenizer)

    pre, live = build(True), build(False)
    assert pre.ref_model is None and live.ref_model is not None
    for dataset in (pre.train_dataset, pre.eval_dataset):
        assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names)
    assert "ref_chosen_logps" not in live.train_dataset.column_names

    # The precomputed columns are the live reference's log-probs.
    rows = list(range(len(train)))
    live_batch = live.data_collator([live.train_dataset[i] for i in rows])
    expected = live.reference_logps(live_batch)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(pre.train_dataset[key]), expected[key], rtol=1e-5, atol=1e-4)

    # Move both policies identically, so the first-step loss is not log 2, then compare it.
    for trainer in (pre, live):
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    losses = {}
    for name, trainer in (("pre", pre), ("live", live)):
        trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
        assert ("ref_chosen_logps" in batch) == (name == "pre")
        losses[name] = trainer.compute_loss(trainer.model, batch).item()
    assert abs(losses["live"] - math.log(2)) > 1e-3
    assert losses["pre"] == pytest.approx(losses["live"], rel=1e-5)

    # Whole training runs agree step by step (one batch holds the whole dataset), and so does evaluation.
    for trainer in (pre, live):
        trainer.train()
    pre_losses = [h["loss"] for h in pre.state.log_history if "loss" in h]
    live_losses = [h["loss"] for h in live.state.log_history if "loss" in h]
    assert len(pre_losses) == 2 and pre_losses == pytest.approx(live_losses, rel=1e-4)
    assert pre.evaluate()["eval_loss"] == pytest.approx(live.evaluate()["eval_loss"], rel=1e-4)


def test_precomputed_evaluate_after_training_without_reference_raises(tiny_model_path, tiny_tokenizer,
                                                                      preference_data, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path / "out"), precompute_ref_log_probs=True, **FAST)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                         train_dataset=preference_data("preference", 8), processing_class=tiny_tokenizer)
    test = preference_data("preference", 4, split="test")
    before = trainer.evaluate(test)  # before training the policy is the reference
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    trainer.train()
    with pytest.raises(ValueError, match="after training started"):
        trainer.evaluate(test)


def test_ref_model_must_differ_from_model(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="different objects"):
        DPOTrainer(model=model, ref_model=model, args=DPOConfig(output_dir=str(tmp_path / "o"), **FAST),
                   train_dataset=preference_data("preference", 4), processing_class=tiny_tokenizer)
