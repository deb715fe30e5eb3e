"""KTOTrainer: the loss against hand-computed values, TRL's data handling (unpairing, KL pairs, checks), parity with
TRL 1.16's `KTOTrainer` on the first step, the reference point z0 (per micro-batch, over processes), finite metrics on
one-kind batches, TRL's quickstart with the import swapped, learning on held-out data, and the example script.

Parity: both trainers get the same policy (the tiny model) and the same explicit reference (the tiny model plus
fixed-seed noise, so the policy scores every completion higher than the reference and z0 > 0 is not clamped away); the
rows of one per-device batch, in order, are collated by each trainer's own `data_collator` and passed to
`trainer.compute_loss(trainer.model, batch)` in train mode. The loss and every metric both log agree to 2e-3 relative.
"""

from __future__ import annotations

import logging
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_align import DataError, KTOConfig, KTOTrainer, losses
from hf_align.trainers.kto import add_kl_completions

trl = pytest.importorskip("trl")

REL = 2e-3
FAST = dict(max_steps=3, per_device_train_batch_size=2, report_to="none", save_strategy="no")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kto.py"
PARITY_MAX_REL: dict[str, float] = {}  # case -> worst relative difference over the required keys


def _args(tmp_path, **kwargs) -> dict:
    return {"output_dir": str(tmp_path / "out"), "report_to": "none", "save_strategy": "no", **kwargs}


def _naive_sequence_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Summed completion log-probs from the full logits (independent of `hf_align.logprobs`)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logps * completion_mask[:, 1:]).sum(-1)


def _naive_logratios(trainer, batch, prefix: str = "") -> torch.Tensor:
    keys = [f"{prefix}{key}" for key in ("input_ids", "attention_mask", "completion_mask")]
    return (_naive_sequence_logps(trainer.model, *(batch[k] for k in keys))
            - _naive_sequence_logps(trainer.ref_model, *(batch[k] for k in keys)))


def _unpaired_conversational(preference_data, n: int) -> Dataset:
    """Conversational prompt/completion/label rows: pair i gives its chosen answer (even i) or rejected one (odd i)."""
    pairs = preference_data("conversational", n)
    return Dataset.from_list([
        {"prompt": row["prompt"], "completion": row["chosen"] if i % 2 == 0 else row["rejected"], "label": i % 2 == 0}
        for i, row in enumerate(pairs)
    ])


# ------------------------------------------------------------------------------------------------------------ loss


def test_kto_loss_matches_hand_computed_values():
    logratios = torch.tensor([2.0, -1.0, 0.5, 3.0])
    desirable = torch.tensor([True, False, True, False])
    beta, z0, wd, wu = 0.5, 1.0, 1.25, 0.75
    out = losses.kto_loss(logratios, desirable, torch.tensor(z0), beta, wd, wu)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [
        wd * (1 - sig(0.5 * (2.0 - 1.0))),  # desirable: λD (1 - σ(β (r - z0)))
        wu * (1 - sig(0.5 * (1.0 + 1.0))),  # undesirable: λU (1 - σ(β (z0 - r)))
        wd * (1 - sig(0.5 * (0.5 - 1.0))),
        wu * (1 - sig(0.5 * (1.0 - 3.0))),
    ]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # TRL's reduction: the plain mean of the weighted per-example losses (desirable and undesirable concatenated).
    assert out.mean().item() == pytest.approx(sum(expected) / 4, rel=1e-6)


@pytest.mark.parametrize("label", [True, False], ids=["all-desirable", "all-undesirable"])
def test_kto_loss_one_kind_batch_is_finite(label):
    logratios = torch.tensor([0.4, -0.2, 1.0], requires_grad=True)
    desirable = torch.full((3,), label)
    loss = losses.kto_loss(logratios, desirable, torch.tensor(0.3), beta=0.1).mean()
    sign = 1.0 if label else -1.0
    expected = sum(1 - 1 / (1 + math.exp(-sign * 0.1 * (r - 0.3))) for r in (0.4, -0.2, 1.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logratios.grad).all() and (logratios.grad != 0).all()
    # Desirable examples are pushed up, undesirable ones down.
    assert ((logratios.grad < 0) if label else (logratios.grad > 0)).all()


def test_apo_zero_unpaired_is_kto_with_z0_zero():
    logratios, desirable = torch.tensor([1.0, -2.0]), torch.tensor([True, False])
    out = losses.kto_loss(logratios, desirable, 0.0, beta=0.2)
    expected = torch.stack([1 - torch.sigmoid(torch.tensor(0.2)), torch.sigmoid(torch.tensor(-0.4))])
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------- data handling


def test_kl_completions_rotate_within_each_per_device_batch():
    dataset = Dataset.from_dict({"completion_ids": [[i] for i in range(7)]})
    out = add_kl_completions(dataset, batch_size=3)["KL_completion_ids"]
    # Runs [0,1,2] [3,4,5] [6]: row i gets row i-1's completion, the first row the last one's (TRL's pairing).
    assert out == [[2], [0], [1], [5], [3], [4], [6]]


def test_paired_data_is_unpaired_like_trl_and_said_so(tiny_model, tiny_tokenizer, preference_data, tmp_path, caplog):
    pairs = preference_data("preference", 6)
    with caplog.at_level(logging.WARNING, logger="hf_align"):
        trainer = KTOTrainer(model=tiny_model, args=KTOConfig(**_args(tmp_path, per_device_train_batch_size=4)),
                             train_dataset=pairs, processing_class=tiny_tokenizer)
    assert any("is paired" in r.getMessage() and "6 pairs -> 12 rows" in r.getMessage() for r in caplog.records)
    expected = trl.data_utils.unpair_preference_dataset(pairs)
    assert trainer.train_dataset["label"] == expected["label"] == [True] * 6 + [False] * 6
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 6)])
    assert batch["label"].tolist() == [True, False]
    # Row 6 is pair 0's rejected answer: the same prompt as row 0.
    assert trainer.train_dataset[0]["prompt_ids"] == trainer.train_dataset[6]["prompt_ids"]


def test_bad_rows_raise_data_errors_naming_row_and_column(tiny_model, tiny_tokenizer, tmp_path):
    args = KTOConfig(**_args(tmp_path))

    def build(rows):
        return KTOTrainer(model=tiny_model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tiny_tokenizer)

    good = {"prompt": "Hi?", "completion": " Sure.", "label": True}
    with pytest.raises(DataError, match=r"row 1, column 'label'"):
        build([good, {**good, "label": None}])
    with pytest.raises(DataError, match=r"row 1, column 'label'.*got 2"):
        build([{**good, "label": 1}, {**good, "label": 2}])
    with pytest.raises(DataError, match=r"row 1, column 'completion'"):
        build([good, {**good, "completion": ""}])
    with pytest.raises(DataError, match=r"no column \['label'\]"):
        build([{"prompt": "Hi?", "completion": " Sure."}] * 2)
    # Paired data is checked before it is unpaired, so the error names the row of the dataset as given.
    pair = {"prompt": "Hi?", "chosen": " Sure.", "rejected": " No."}
    with pytest.raises(DataError, match=r"row 2, column 'rejected'"):
        build([pair, pair, {**pair, "rejected": None}])


def test_batch_size_one_and_random_sampling_are_refused(tiny_model_path, embedded_data, tmp_path):
    dataset = embedded_data("unpaired_preference", 4)
    with pytest.raises(ValueError, match="per_device_train_batch_size >= 2"):
        KTOTrainer(model=tiny_model_path, args=KTOConfig(**_args(tmp_path, per_device_train_batch_size=1)),
                   train_dataset=dataset)
    with pytest.raises(ValueError, match="sequential"):
        KTOTrainer(model=tiny_model_path, args=KTOConfig(**_args(tmp_path, train_sampling_strategy="random")),
                   train_dataset=dataset)
    # APO-zero has no KL term, hence neither constraint.
    trainer = KTOTrainer(model=tiny_model_path, train_dataset=dataset, args=KTOConfig(
        **_args(tmp_path, per_device_train_batch_size=1, loss_type="apo_zero_unpaired")))
    assert "KL_completion_ids" not in trainer.train_dataset.column_names
    with pytest.raises(ValueError, match="loss_type"):
        KTOConfig(**_args(tmp_path, loss_type="sigmoid"))


@pytest.mark.parametrize(
    ("n_desirable", "n_undesirable", "desirable_weight", "warns"),
    [(6, 6, 1.0, False), (3, 9, 1.0, True), (3, 9, 3.5, False), (6, 6, 2.0, True), (8, 6, 1.0, False)],
)
def test_imbalance_warning_follows_the_papers_range(n_desirable, n_undesirable, desirable_weight, warns,
                                                   tiny_model, tiny_tokenizer, tmp_path, caplog):
    """λD·nD / (λU·nU) must lie in [1, 4/3] (arXiv 2402.01306, eq. 8): 8/6 = 1.33 is in, 3/9 and 2·6/6 are not."""
    rows = [{"prompt": f"Q{i}?", "completion": " Sure." if i < n_desirable else " No.", "label": i < n_desirable}
            for i in range(n_desirable + n_undesirable)]
    args = KTOConfig(**_args(tmp_path, desirable_weight=desirable_weight))
    with caplog.at_level(logging.WARNING, logger="hf_align"):
        KTOTrainer(model=tiny_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    messages = [r.getMessage() for r in caplog.records if "4/3" in r.getMessage()]
    assert bool(messages) == warns, messages
    if n_desirable == 3 and warns:
        # EITHER λD in [1·9/3, 4/3·9/3] = [3, 4] OR λU in [3/(4/3·9), 3/9] = [0.25, 0.33].
        assert "desirable_weight in [3.00, 4.00]" in messages[0]
        assert "undesirable_weight in [0.25, 0.33]" in messages[0]


# ----------------------------------------------------------------------------------------------------- TRL parity


@pytest.fixture(scope="module")
def reference_state(tiny_model_path):
    """The tiny model's weights plus fixed-seed noise: a reference every completion scores lower under."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.fixture
def make_models(tiny_model_path, reference_state):
    def make():
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        reference.load_state_dict(reference_state)
        return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), reference

    return make


def _first_step(trainer, rows) -> dict[str, float]:
    """`compute_loss` on the collated `rows` in train mode: the loss and what the next log would report."""
    trainer.model.train()
    for values in trainer._metrics["train"].values():
        values.clear()
    if isinstance(trainer, KTOTrainer):
        trainer._metric_totals["train"].clear()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.compute_loss(trainer.model, batch)
    if isinstance(trainer, KTOTrainer):
        metrics = trainer.pending_metrics("train")
    else:
        metrics = {key: values[-1] for key, values in trainer._metrics["train"].items() if values}
    metrics["loss"] = loss.item()
    return metrics


PARITY_CASES = {
    "unpaired-text": dict(),
    "unpaired-conversational": dict(),
    "paired-text": dict(),
    "paired-conversational": dict(),
    "weighted": dict(desirable_weight=1.3, undesirable_weight=0.8, beta=0.5),
    "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired", beta=0.5),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_first_step_matches_trl(case, make_models, tiny_model_path, embedded_data, preference_data, tmp_path):
    if case == "unpaired-conversational":
        dataset, batch_size = _unpaired_conversational(preference_data, 8), 8
    elif case.startswith("paired"):
        # 6 pairs -> 12 rows (6 chosen, then 6 rejected): one per-device batch holds both kinds.
        dataset, batch_size = preference_data(case.split("-")[1], 6), 12
    else:
        dataset, batch_size = embedded_data("unpaired_preference", 8), 8
    args = _args(tmp_path, bf16=False, gradient_checkpointing=False, per_device_train_batch_size=batch_size,
                 **PARITY_CASES[case])
    policy, reference = make_models()
    theirs = trl.KTOTrainer(model=policy, ref_model=reference, args=trl.KTOConfig(**args), train_dataset=dataset,
                            processing_class=AutoTokenizer.from_pretrained(tiny_model_path))
    policy, reference = make_models()
    ours = KTOTrainer(model=policy, ref_model=reference, args=KTOConfig(**args), train_dataset=dataset,
                      processing_class=AutoTokenizer.from_pretrained(tiny_model_path))

    # Same rows, token ids and KL pairs, and the same collated batch.
    columns = ["prompt_ids", "completion_ids", "label"] + (["KL_completion_ids"] if ours.uses_kl else [])
    assert len(ours.train_dataset) == len(theirs.train_dataset) == batch_size
    for column in columns:
        assert ours.train_dataset[column] == theirs.train_dataset[column], column
    rows = list(range(batch_size))
    ours_batch = ours.data_collator([ours.train_dataset[i] for i in rows])
    theirs_batch = theirs.data_collator([theirs.train_dataset[i] for i in rows])
    for key, value in theirs_batch.items():
        assert torch.equal(ours_batch[key], value), key

    expected, actual = _first_step(theirs, rows), _first_step(ours, rows)
    required = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    if ours.uses_kl:
        required.append("kl")
        assert expected["kl"] > 0.1  # z0 is really estimated, not clamped to 0
    else:
        assert expected["kl"] == actual["kl"] == 0.0
    assert set(expected) == set(actual), set(expected) ^ set(actual)
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=REL, abs=1e-6), f"{case}: {key}"
    for key in required:
        assert abs(expected[key]) > 1e-3, f"{key}={expected[key]} too close to 0 to compare"
    diffs = {key: abs(actual[key] - expected[key]) / abs(expected[key]) for key in required}
    PARITY_MAX_REL[case] = max(diffs.values())
    print(f"[parity] {case}: " + ", ".join(f"{key} {diff:.1e}" for key, diff in diffs.items()))


def test_report_parity():
    """Prints the worst relative difference per case (run with `-s` to see it)."""
    if PARITY_MAX_REL:
        print("[parity] max relative difference vs TRL:", {k: f"{v:.1e}" for k, v in PARITY_MAX_REL.items()})
    assert all(v <= REL for v in PARITY_MAX_REL.values())


# ------------------------------------------------------------------------------------------ reference point z0


def test_z0_is_each_micro_batch_own_kl_under_gradient_accumulation(tiny_model_path, tiny_tokenizer, embedded_data,
                                                                    tmp_path):
    """Every micro-batch pairs its own rows (prompt i with completion i-1, the first with the last), and z0 is the
    clamped mean of `logp(y'|x) - ref(y'|x)` over that micro-batch, with no gradient."""
    args = KTOConfig(**_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                             learning_rate=1e-2, logging_steps=1, lr_scheduler_type="constant"))
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                         train_dataset=embedded_data("unpaired_preference", 16), processing_class=tiny_tokenizer)
    seen = []
    original = trainer.reference_point

    def checked_reference_point(kl_logps, reference):
        z0 = original(kl_logps, reference)
        assert not z0.requires_grad
        inputs = batches[-1]
        completions = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["completion_mask"])]
        mismatched = [ids[mask.bool()].tolist()
                      for ids, mask in zip(inputs["KL_input_ids"], inputs["KL_completion_mask"])]
        assert mismatched == completions[-1:] + completions[:-1]
        expected = _naive_logratios(trainer, inputs, prefix="KL_").mean().clamp(min=0)
        seen.append((z0.item(), expected.item()))
        return z0

    batches = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        batches.append(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.reference_point = checked_reference_point
    trainer.compute_loss = recording_compute_loss
    trainer.train()
    assert len(seen) == 4  # 2 optimizer steps x 2 micro-batches, one z0 each
    for z0, expected in seen:
        assert z0 == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert seen[-1][0] > 0  # after the first update the policy moved away from the reference: z0 is estimated
    assert [h["kl"] for h in trainer.state.log_history if "kl" in h][-1] == pytest.approx(
        (seen[2][0] + seen[3][0]) / 2, rel=1e-5)


def test_z0_is_the_mean_over_processes_clamped_at_zero(tiny_model, tiny_tokenizer, embedded_data, tmp_path):
    """The micro-batch's KL mean is averaged with the other processes' (as `accelerator.gather` returns them), then
    clamped at 0: simulated here with a second process whose mean is given."""
    trainer = KTOTrainer(model=tiny_model, args=KTOConfig(**_args(tmp_path)),
                         train_dataset=embedded_data("unpaired_preference", 8), processing_class=tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    own = torch.tensor(0.7)
    _, kl_logps = trainer.sequence_logps(trainer.model, batch)
    reference = {"ref_KL_logps": kl_logps - own}
    for other, expected in ((0.3, 0.5), (-2.0, 0.0), (-0.5, 0.1)):
        trainer.accelerator.gather = lambda t, other=other: torch.cat([t, t.new_tensor([other])])
        z0 = trainer.reference_point(kl_logps, reference)
        assert z0.item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- metrics


def test_one_kind_batches_log_finite_exact_means(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    """Paired data unpaired as TRL does gives all-desirable then all-undesirable batches (sequential sampling). No
    NaN is logged, each kind's metrics appear only where it was seen, and a log over several batches reports the
    exact mean over the examples (sums and counts), not a mean of batch means."""
    args = KTOConfig(**_args(tmp_path, per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                             learning_rate=1e-3))
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                         train_dataset=preference_data("preference", 8), processing_class=tiny_tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert len(logs) == 4
    for log in logs:
        assert all(math.isfinite(v) for v in log.values() if isinstance(v, float)), log
    assert all("rewards/chosen" in h and "rewards/rejected" not in h and "rewards/margins" not in h for h in logs[:2])
    assert all("rewards/rejected" in h and "rewards/chosen" not in h for h in logs[2:])

    # Exact means across batches of different composition: 4 desirable rows, then 1 desirable + 3 undesirable.
    trainer.model.train()
    for mode_metrics in (trainer._metrics["train"], trainer._metric_totals["train"]):
        mode_metrics.clear()
    rows = [[0, 1, 2, 3], [4, 8, 9, 10]]
    rewards, labels = [], []
    for batch_rows in rows:
        batch = trainer.data_collator([trainer.train_dataset[i] for i in batch_rows])
        trainer.compute_loss(trainer.model, batch)
        rewards.append(args.beta * _naive_logratios(trainer, batch))
        labels.append(batch["label"])
    rewards, labels = torch.cat(rewards), torch.cat(labels)
    metrics = trainer.pending_metrics("train")
    assert metrics["rewards/chosen"] == pytest.approx(rewards[labels].mean().item(), rel=1e-3, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(rewards[~labels].mean().item(), rel=1e-3, abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(
        (rewards[labels].mean() - rewards[~labels].mean()).item(), rel=1e-3, abs=1e-6)


# -------------------------------------------------------------------------------------------------- quickstart


@pytest.mark.parametrize("as_id", [True, False], ids=["model-id", "model-object"])
@pytest.mark.parametrize("kind", ["unpaired", "paired"])
def test_trl_quickstart_runs_with_import_swapped(as_id, kind, tiny_model_path, embedded_data, preference_data,
                                                  tmp_path):
    # TRL's documented quickstart, with `from trl import KTOConfig, KTOTrainer` replaced by the hf_align import.
    from hf_align import KTOConfig, KTOTrainer  # noqa: F811

    train_dataset = embedded_data("unpaired_preference", 12) if kind == "unpaired" else preference_data("preference", 6)
    if as_id:
        model, kwargs = tiny_model_path, {}
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        kwargs = {"processing_class": AutoTokenizer.from_pretrained(tiny_model_path)}
    training_args = KTOConfig(output_dir=str(tmp_path / "tiny-KTO"), **FAST)
    trainer = KTOTrainer(model=model, args=training_args, train_dataset=train_dataset, **kwargs)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 3
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert len(trainer.train_dataset) == 12


def test_default_args_and_lora_reference_is_the_base_model(tiny_model_path, embedded_data, tmp_path, monkeypatch):
    """`KTOTrainer(model=id, train_dataset=...)` as in TRL's docstring (default KTOConfig), and with a LoRA
    `peft_config`: no reference copy, the adapter is disabled to score the reference."""
    monkeypatch.chdir(tmp_path)
    dataset = embedded_data("unpaired_preference", 8)
    trainer = KTOTrainer(model=tiny_model_path, train_dataset=dataset)
    assert trainer.args.beta == 0.1 and trainer.args.learning_rate == 1e-6
    assert trainer.args.desirable_weight == trainer.args.undesirable_weight == 1.0
    assert trainer.args.loss_type == "kto" and trainer.args.output_dir.endswith("-KTO")

    args = KTOConfig(**_args(tmp_path, **{**FAST, "learning_rate": 1e-3}))
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = KTOTrainer(model=tiny_model_path, args=args, train_dataset=dataset, peft_config=peft_config)
    assert isinstance(trainer.model, PeftModel) and trainer.ref_model is None
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    expected = _naive_sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    torch.testing.assert_close(trainer.reference_logps(batch)["ref_logps"], expected, rtol=1e-5, atol=1e-4)


def test_precomputed_reference_matches_live_reference(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    train, test = embedded_data("unpaired_preference", 8), embedded_data("unpaired_preference", 6, split="test")

    def build(precompute: bool):
        args = KTOConfig(**_args(tmp_path, precompute_ref_log_probs=precompute, precompute_ref_batch_size=3,
                                 per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3))
        return KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args, train_dataset=train,
                          eval_dataset=test, processing_class=tiny_tokenizer)

    pre, live = build(True), build(False)
    assert pre.ref_model is None and live.ref_model is not None
    assert {"ref_logps", "ref_KL_logps"} <= set(pre.train_dataset.column_names) & set(pre.eval_dataset.column_names)
    for trainer in (pre, live):
        trainer.train()
    pre_losses = [h["loss"] for h in pre.state.log_history if "loss" in h]
    live_losses = [h["loss"] for h in live.state.log_history if "loss" in h]
    assert pre_losses == pytest.approx(live_losses, rel=1e-4)
    assert pre.evaluate()["eval_kl"] == pytest.approx(live.evaluate()["eval_kl"], rel=1e-4)
    with pytest.raises(ValueError, match="after training started"):
        pre.evaluate(embedded_data("unpaired_preference", 4, split="test"))


# ------------------------------------------------------------------------------------------ held-out learning


def _held_out_scores(trainer, batch) -> tuple[float, float]:
    """Implicit rewards r = β (logp - ref) of held-out rows: (fraction of desirable/undesirable row pairs ranked
    right, r_d > r_u; fraction of rows whose sign r > 0 gives the label)."""
    rewards = trainer.args.beta * _naive_logratios(trainer, batch)
    labels = batch["label"]
    ranking = (rewards[labels][:, None] > rewards[~labels][None, :]).float().mean().item()
    return ranking, ((rewards > 0) == labels).float().mean().item()


def test_kto_learns_held_out_labels(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    train, test = embedded_data("unpaired_preference"), embedded_data("unpaired_preference", split="test")
    args = KTOConfig(**_args(
        tmp_path, learning_rate=5e-4, max_steps=40, per_device_train_batch_size=8,
        per_device_eval_batch_size=len(test),  # one eval batch: logged means are over all held-out rows
        lr_scheduler_type="constant", logging_steps=10, seed=0,
    ))
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args, train_dataset=train,
                         processing_class=tiny_tokenizer)
    prepared = trainer.prepare_eval_dataset(test, "test")
    batch = trainer.data_collator([prepared[i] for i in range(len(prepared))])

    before = trainer.evaluate(test)  # a raw split: `evaluate` prepares it, as TRL's does
    ranking_before, sign_before = _held_out_scores(trainer, batch)
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 0
    assert ranking_before == 0.0 and sign_before == pytest.approx(0.5)

    trainer.train()
    after = trainer.evaluate(test)
    ranking_after, sign_after = _held_out_scores(trainer, batch)
    print(f"[learning] held-out margins {before['eval_rewards/margins']:.3f} -> {after['eval_rewards/margins']:.3f}, "
          f"loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}, ranking accuracy {ranking_before:.2f} -> "
          f"{ranking_after:.2f}, sign accuracy {sign_before:.2f} -> {sign_after:.2f}")
    assert after["eval_rewards/chosen"] > 0.3 and after["eval_rewards/rejected"] < -0.3, after
    assert after["eval_rewards/margins"] > 1.0, after
    assert after["eval_loss"] < before["eval_loss"] - 0.1, (before["eval_loss"], after["eval_loss"])
    assert after["eval_kl"] > 0  # the policy moved away from the reference on mismatched pairs too
    assert ranking_after > 0.95 and sign_after > 0.9, (ranking_after, sign_after)


# ------------------------------------------------------------------------------------------------------ example


def test_example_runs_on_the_embedded_dataset(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--max_steps", "20", "--eval_steps", "20", "--logging_steps",
                                      "10", "--output_dir", str(out)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert (out / "model.safetensors").exists() and (out / "training_metrics.png").exists()
    card = (out / "README.md").read_text()
    assert "KTOTrainer" in card and "2402.01306" in card
    assert "desirable_weight" in card
