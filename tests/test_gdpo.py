"""Distributional GDPO (arXiv 2412.20299): its loss terms against hand-computed values, the trainer's loss against an
independent computation from full logits, row validation, and learning on held-out questions of the embedded toy
survey (the belief distribution moves to the group's, and responses follow the belief they are given)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_align import DataError, DistributionalGDPOConfig, DistributionalGDPOTrainer, DPOConfig, DPOTrainer, losses
from hf_align.trainers.distributional_gdpo import jensen_shannon_distance

FAST = dict(max_steps=2, per_device_train_batch_size=4, report_to="none", save_strategy="no")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- loss functions


def test_belief_log_distribution_normalises_over_each_rows_candidates():
    # Row 0 has two candidates (log π = -1, -2; the third slot is padding), row 1 three equal ones.
    # q = softmax(-1, -2) = (1/(1+e^-1), e^-1/(1+e^-1)) = (0.7310585786300049, 0.2689414213699951).
    logps = t([-1.0, -2.0, 5.0], [-4.0, -4.0, -4.0])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    q = losses.belief_log_distribution(logps, mask).exp()
    torch.testing.assert_close(q, t([0.7310585786300049, 0.2689414213699951, 0.0], [1 / 3, 1 / 3, 1 / 3]))


def test_belief_calibration_kl_hand_values():
    logps = t([-1.0, -2.0, 5.0], [-4.0, -4.0, -4.0], [-0.5, -0.5, -9.0])
    group = t([0.7, 0.3, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    # Row 0: 0.7 ln(0.7/0.7310585786300049) + 0.3 ln(0.3/0.2689414213699951)
    #      = 0.7 · (-0.0434133) + 0.3 · 0.1092889 = -0.0303893 + 0.0327867 = 0.0023974
    row0 = 0.7 * math.log(0.7 / 0.7310585786300049) + 0.3 * math.log(0.3 / 0.2689414213699951)
    assert row0 == pytest.approx(0.0023974, abs=1e-7)
    # Row 1: p* is one-hot, q uniform over 3: KL = ln 3 (the 0 · log 0 terms are 0).
    # Row 2: p* = q = (1/2, 1/2): KL = 0.
    kl = losses.belief_calibration_kl(logps, group, mask)
    torch.testing.assert_close(kl, t(row0, math.log(3), 0.0), rtol=1e-12, atol=1e-12)


def test_belief_calibration_kl_gradient_ignores_padding_and_is_finite():
    logps = t([-1.0, -2.0, 5.0]).requires_grad_()
    mask = torch.tensor([[True, True, False]])
    losses.belief_calibration_kl(logps, t([0.7, 0.3, 0.0]), mask).sum().backward()
    grad = logps.grad[0]
    # dKL/dlogπ_k = q_k - p*_k: (0.7310585786300049 - 0.7, 0.2689414213699951 - 0.3), 0 on the padding.
    torch.testing.assert_close(grad, t(0.0310585786300049, -0.0310585786300049, 0.0), rtol=1e-12, atol=1e-12)


def test_sequence_mean_nll_hand_values():
    token_logps = t([-1.0, -2.0, -7.0], [-3.0, -5.0, -5.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    torch.testing.assert_close(losses.sequence_mean_nll(token_logps, mask), t(1.5, 3.0))


def test_jensen_shannon_distance_hand_values():
    mask = torch.tensor([[True, True], [True, True]])
    p, q = t([1.0, 0.0], [0.5, 0.5]), t([0.0, 1.0], [0.5, 0.5])
    # Disjoint supports: JS = ln 2, distance sqrt(ln 2) = 0.8325546111576977; equal distributions: 0.
    torch.testing.assert_close(jensen_shannon_distance(p, q, mask), t(0.8325546111576977, 0.0))


# ------------------------------------------------------------------------------------------------- data handling


def _row(i: int = 0, **changes) -> dict:
    row = {
        "prompt": f"Group: farmers\nQuestion: Should our town build a new park {i}?\nBelief:",
        "beliefs": [" Yes.", " No."],
        "belief_distribution": [0.8, 0.2],
        "belief": " Yes.",
        "chosen": " I support the new park.",
        "rejected": " I oppose the new park.",
    }
    return {**row, **changes}


def _rows(n: int = 4) -> list[dict]:
    return [_row(i) for i in range(n)]


def _with(index: int, **changes) -> list[dict]:
    rows = _rows()
    rows[index] = _row(index, **changes)
    return rows


def _build(dataset, tiny_model_path, tiny_tokenizer, tmp_path, eval_dataset=None, **config):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    args = DistributionalGDPOConfig(output_dir=str(tmp_path / "out"), **{**FAST, **config})
    return DistributionalGDPOTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                                     processing_class=tiny_tokenizer)


MALFORMED = {
    "missing-column": ([{k: v for k, v in r.items() if k != "belief_distribution"} for r in _rows()],
                       ["belief_distribution"]),
    "one-belief": (_with(2, beliefs=[" Yes."], belief_distribution=[1.0]), ["row 2", "'beliefs'", "at least 2"]),
    "belief-not-a-string": (_with(1, beliefs=[" Yes.", None]), ["row 1", "'beliefs', item 1", "None"]),
    "duplicate-beliefs": (_with(1, beliefs=[" Yes.", " Yes."]), ["row 1", "'beliefs'", "twice"]),
    "prefix-belief": (_with(3, beliefs=[" No", " Not sure."], belief=" No"), ["row 3", "'beliefs'", "prefix"]),
    "distribution-length": (_with(2, belief_distribution=[1.0]), ["row 2", "'belief_distribution'", "2 prob"]),
    "negative-probability": (_with(1, belief_distribution=[1.2, -0.2]), ["row 1", "'belief_distribution', item 1"]),
    "bool-probabilities": ([{**r, "belief_distribution": [True, False]} for r in _rows()],
                           ["row 0", "'belief_distribution', item 0", "True"]),
    "sum-not-one": (_with(0, belief_distribution=[0.5, 0.3]), ["row 0", "'belief_distribution'", "sum to 0.8"]),
    "belief-not-a-candidate": (_with(3, belief=" Maybe."), ["row 3", "'belief'", "not one of"]),
    "belief-with-zero-probability": (_with(2, belief_distribution=[0.0, 1.0]), ["row 2", "'belief'", "probability 0"]),
    "empty-chosen": (_with(1, chosen=" "), ["row 1", "'chosen'"]),
    "none-prompt": (_with(3, prompt=None), ["row 3", "'prompt'", "None"]),
    "conversational": ([{**r, "prompt": [{"role": "user", "content": "Q?"}]} for r in _rows()], ["conversational"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_rows_raise_before_training(case, tiny_model_path, tiny_tokenizer, tmp_path):
    rows, fragments = MALFORMED[case]
    with pytest.raises(DataError) as info:
        _build(Dataset.from_list(rows), tiny_model_path, tiny_tokenizer, tmp_path)
    message = str(info.value)
    assert "train" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_malformed_eval_dataset_names_the_eval_dataset(tiny_model_path, tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"eval dataset, row 2, column 'belief'"):
        _build(Dataset.from_list(_rows()), tiny_model_path, tiny_tokenizer, tmp_path,
               eval_dataset=Dataset.from_list(_with(2, belief=" Maybe.")))


def test_tokenization_and_ragged_collation(tiny_model_path, tiny_tokenizer, tmp_path):
    rows = [
        _row(0, belief_distribution=[0.795, 0.2]),  # rounded shares within tolerance: renormalised
        _row(1, beliefs=[" Yes.", " No.", " Unsure."], belief_distribution=[0.5, 0.3, 0.2], belief=" Unsure.",
             chosen=" I am not sure.", rejected=" I support it."),
    ]
    trainer = _build(Dataset.from_list(rows), tiny_model_path, tiny_tokenizer, tmp_path)
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token
    prepared = trainer.train_dataset
    first, second = prepared[0], prepared[1]
    # The pair is scored after prompt + the row's belief; each candidate belief after the prompt, with no eos.
    assert tok.decode(first["prompt_ids"]) == rows[0]["prompt"] + " Yes."
    assert tok.decode(first["chosen_ids"]) == " I support the new park." + eos
    assert tok.decode(second["belief_prompt_ids"]) == rows[1]["prompt"]
    assert [tok.decode(ids) for ids in second["belief_ids"]] == [" Yes.", " No.", " Unsure."]
    assert first["belief_distribution"] == pytest.approx([0.795 / 0.995, 0.2 / 0.995])
    assert (first["belief_index"], second["belief_index"]) == (0, 2)

    batch = trainer.data_collator([first, second])
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    assert batch["belief_input_ids"].shape[0] == 5  # 2 + 3 candidates, row by row
    assert batch["belief_mask"].tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(batch["belief_distribution"][1], torch.tensor([0.5, 0.3, 0.2]))
    assert batch["belief_distribution"][0, 2] == 0
    # Candidate 4 (row 1's third) is prompt + " Unsure." with only the belief's tokens in the completion mask.
    ids, mask = batch["belief_input_ids"][4], batch["belief_completion_mask"][4].bool()
    assert tok.decode(ids[mask]) == " Unsure."


def _naive_logps(model, input_ids, attention_mask, completion_mask):
    """Per-token completion log-probs from the full logits (independent of `hf_align.logprobs`): `[N, T-1]`."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logps * completion_mask[:, 1:]


def test_loss_is_weighted_sum_of_dpo_calibration_and_belief_nll(tiny_model_path, tiny_tokenizer, embedded_data,
                                                               tmp_path):
    rows = embedded_data("belief_preference", 6)
    trainer = _build(rows, tiny_model_path, tiny_tokenizer, tmp_path, beta=0.2, calibration_weight=0.7,
                     belief_nll_weight=0.3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from its reference, so the DPO term is not log 2
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()

    pair = _naive_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum(-1)
    ref = _naive_logps(trainer.ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum(-1)
    (chosen, rejected), (ref_chosen, ref_rejected) = pair.chunk(2), ref.chunk(2)
    dpo = -F.logsigmoid(0.2 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    token_logps = _naive_logps(trainer.model, batch["belief_input_ids"], batch["belief_attention_mask"],
                               batch["belief_completion_mask"])
    lengths = batch["belief_completion_mask"][:, 1:].sum(-1)
    kl, nll, start = [], [], 0
    for i, count in enumerate(batch["belief_mask"].sum(-1).tolist()):
        logps = token_logps[start:start + count].sum(-1)
        q = torch.softmax(logps, -1)
        p = batch["belief_distribution"][i, :count]
        kl.append(sum(pk * math.log(pk / qk) for pk, qk in zip(p.tolist(), q.tolist()) if pk > 0))
        own = start + batch["belief_index"][i].item()
        nll.append(-(token_logps[own].sum() / lengths[own]).item())
        start += count
    expected = dpo.item() + 0.7 * sum(kl) / len(kl) + 0.3 * sum(nll) / len(nll)
    assert abs(dpo.item() - math.log(2)) > 1e-3
    assert loss == pytest.approx(expected, rel=1e-4)
    metrics = trainer._metrics["train"]
    assert metrics["belief/kl"][-1] == pytest.approx(sum(kl) / len(kl), rel=1e-4)
    assert metrics["belief/nll"][-1] == pytest.approx(sum(nll) / len(nll), rel=1e-4)


def test_without_belief_terms_it_is_dpo_on_prompt_plus_belief(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    """The preference term is `DPOTrainer`'s (whose numbers match TRL's, tests/test_dpo_parity.py) on the pairs with
    the belief appended to the prompt."""
    rows = embedded_data("belief_preference", 8)
    gdpo = _build(rows, tiny_model_path, tiny_tokenizer, tmp_path / "gdpo", calibration_weight=0.0,
                  belief_nll_weight=0.0, learning_rate=1e-3, per_device_train_batch_size=8, logging_steps=1)
    pairs = rows.map(lambda row: {"prompt": row["prompt"] + row["belief"]}).select_columns(
        ["prompt", "chosen", "rejected"])
    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), processing_class=tiny_tokenizer,
                     train_dataset=pairs, args=DPOConfig(output_dir=str(tmp_path / "dpo"), learning_rate=1e-3,
                                                         logging_steps=1, **{**FAST, "per_device_train_batch_size": 8}))
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert gdpo.train_dataset[key] == dpo.train_dataset[key]
    for trainer in (gdpo, dpo):
        trainer.train()
    gdpo_losses, dpo_losses = ([h["loss"] for h in t.state.log_history if "loss" in h] for t in (gdpo, dpo))
    assert len(gdpo_losses) == 2 and gdpo_losses == pytest.approx(dpo_losses, rel=1e-5)


def test_precomputed_reference_matches_live_reference(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    rows = embedded_data("belief_preference", 8)
    pre = _build(rows, tiny_model_path, tiny_tokenizer, tmp_path / "pre", precompute_ref_log_probs=True,
                 precompute_ref_batch_size=3, learning_rate=1e-3, per_device_train_batch_size=8)
    live = _build(rows, tiny_model_path, tiny_tokenizer, tmp_path / "live", learning_rate=1e-3,
                  per_device_train_batch_size=8)
    assert pre.ref_model is None and {"ref_chosen_logps", "ref_rejected_logps"} <= set(pre.train_dataset.column_names)
    for trainer in (pre, live):
        trainer.train()
    pre_loss, live_loss = (t.state.log_history[-1]["train_loss"] for t in (pre, live))
    assert pre_loss == pytest.approx(live_loss, rel=1e-4)


def test_overlong_rows_are_dropped_and_counted(tiny_model_path, tiny_tokenizer, tmp_path):
    rows = _rows(6)
    rows[1] = _row(1, prompt="Group: farmers\nQuestion: " + "why " * 80 + "?\nBelief:")  # prompt alone too long
    long_belief = " No, " + "because it costs a lot " * 12 + "."
    rows[4] = _row(4, beliefs=[" Yes.", long_belief])  # the pair fits, the other candidate belief does not
    trainer = _build(Dataset.from_list(rows), tiny_model_path, tiny_tokenizer, tmp_path, max_length=64)
    assert trainer.dropped_rows["train"] == 2
    assert len(trainer.train_dataset) == 4
    trainer.train()
    assert trainer.state.global_step == 2


def test_model_card_names_the_paper_and_weights(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    trainer = _build(embedded_data("belief_preference", 4), tiny_model_path, tiny_tokenizer, tmp_path,
                     calibration_weight=2.0)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2412.20299" in card and "calibration_weight: 2.0" in card and "DistributionalGDPOTrainer" in card


# ---------------------------------------------------------------------------------------------- held-out learning


def test_gdpo_learns_group_belief_distribution_and_belief_conditioned_preferences(tiny_model_path, tiny_tokenizer,
                                                                                  embedded_data, tmp_path):
    """Held-out questions asked of the same five groups. Each held-out prompt appears twice, with two members who
    disagree and whose chosen/rejected are swapped: a model that ignores the belief gets exactly 50% pair accuracy."""
    train, test = embedded_data("belief_preference"), embedded_data("belief_preference", split="test")
    # β = 0.5 (not DPO's 0.1) so the belief-conditioned preference is learned within the 150 steps of this test.
    trainer = _build(train, tiny_model_path, tiny_tokenizer, tmp_path, learning_rate=1e-3, beta=0.5, max_steps=150,
                     per_device_train_batch_size=8, per_device_eval_batch_size=len(test), logging_steps=50, seed=0)
    prepared = trainer.prepare_eval_dataset(test, "test")
    batch = trainer.data_collator([prepared[i] for i in range(len(prepared))])
    group = batch["belief_distribution"]
    minority = group.gather(1, batch["belief_index"][:, None]).squeeze(1) < group.max(-1).values

    def probe():
        trainer.model.eval()
        with torch.no_grad():
            outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)[1]
            reference = trainer.reference_logps(batch)
        trainer._metrics["eval"].clear()
        q = losses.belief_log_distribution(outputs["belief_logps"], batch["belief_mask"]).exp()
        margin = (outputs["chosen_logps"] - reference["ref_chosen_logps"]) - (
            outputs["rejected_logps"] - reference["ref_rejected_logps"])
        kl = losses.belief_calibration_kl(outputs["belief_logps"], group, batch["belief_mask"]).mean().item()
        return kl, q[:, 0], margin

    kl_before, _, margin_before = probe()
    eval_before = trainer.evaluate(test)
    trainer.train()
    kl_after, q_yes, margin_after = probe()
    eval_after = trainer.evaluate(test)

    # (i) The model's belief distribution moves to the group's on unseen questions, group by group: not just the
    # average share, since P(" Yes.") follows each group's lean (farmers 0.8 ... artists 0.2).
    assert kl_after < kl_before / 20 and kl_after < 0.3, (kl_before, kl_after)
    assert eval_after["eval_belief/kl"] < eval_before["eval_belief/kl"] / 20
    assert eval_after["eval_belief/js_distance"] < eval_before["eval_belief/js_distance"] / 2
    p_yes = group[:, 0]
    correlation = torch.corrcoef(torch.stack([q_yes, p_yes]))[0, 1].item()
    assert correlation > 0.8, correlation
    farmers = torch.tensor(["farmers" in row["prompt"] for row in test])
    artists = torch.tensor(["artists" in row["prompt"] for row in test])
    assert q_yes[farmers].mean() > q_yes[artists].mean() + 0.3

    # (ii) Responses follow the belief they are given, minority beliefs included (a belief-blind model: 50%).
    assert (margin_before == 0).all() and eval_before["eval_rewards/accuracies"] == 0.0
    accuracy = (margin_after > 0).float().mean().item()
    assert accuracy > 0.85, accuracy
    assert (margin_after[minority] > 0).float().mean().item() > 0.75
    assert eval_after["eval_rewards/accuracies"] == pytest.approx(accuracy, abs=1.5 / len(test))
    assert eval_after["eval_rewards/margins"] > 0
    assert eval_after["eval_loss"] < eval_before["eval_loss"]


def test_example_runs_offline_on_the_embedded_default(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "distributional_gdpo.py"
    spec = importlib.util.spec_from_file_location("gdpo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(["--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--eval_steps", "3"])
    assert isinstance(trainer, DistributionalGDPOTrainer)
    assert trainer.state.global_step == 3
    assert (tmp_path / "out" / "README.md").is_file()
    assert any("eval_belief/kl" in entry for entry in trainer.state.log_history)
