"""ORPOTrainer and SimPOTrainer, the reference-free pairwise trainers: their losses against hand-computed values
(including mean log-probs at and near 0), token ids, first-step loss, metrics and gradients against TRL 1.16's
`trl.experimental.orpo.ORPOTrainer` and `trl.experimental.cpo.CPOTrainer(loss_type="simpo", cpo_alpha=0)`, learning
on held-out pairs, and proof that no reference model is ever built.

Parity: both sides get the same perturbed weights; the first rows of the dataset are collated by each trainer's own
collator and passed to `trainer.compute_loss(trainer.model, batch)` in train mode; the loss and the metrics both log
agree to 2e-3 relative, and so do the gradients. `logits/chosen` and `logits/rejected` are left out on purpose: TRL's
ORPO/CPO average the logits over every position of the padded batch, hf_align over completion tokens (as its DPO).
"""

from __future__ import annotations

import copy
import gc
import inspect
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, concatenate_datasets
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

import hf_align
from hf_align import DataError, ORPOConfig, ORPOTrainer, SimPOConfig, SimPOTrainer, losses

N_ROWS = 8
REL = 2e-3
KINDS = ("preference", "preference_conversational")
FAST = dict(max_steps=3, per_device_train_batch_size=2, report_to="none", save_strategy="no")


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, t(*expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ loss functions
# Reference values: mpmath at 40 digits. log(1 - e^-1e-8) = -18.420680748952365..., log(1 - e^-1) =
# -0.45867514538708189, log(1 - e^-50) = -1.9287498479639178e-22, log(1 - e^-0.1) = -2.3521684610440908.


def test_log1mexp_hand_values():
    close(losses.log1mexp(t(-1e-8, -0.1, -math.log(2), -1.0, -50.0)),
          [-18.420680748952365, -2.3521684610440908, -math.log(2), -0.45867514538708189, -1.9287498479639178e-22])
    assert losses.log1mexp(t(-1000.0)).item() == 0.0  # e^-1000 underflows: log(1 - 0)
    assert losses.log1mexp(t(0.0)).item() == -math.inf


def test_log1mexp_gradient_is_finite_near_zero_in_float32():
    """TRL's `log1mexp` returns NaN gradients for ℓ ≳ -6e-8 in float32 (its unused branch sees log1p(-1)); here both
    branches only see inputs from their own side of -ln 2. d/dx log(1 - e^x) = -1/(e^-x - 1) ≈ -1/|x| near 0."""
    x = torch.tensor([-1e-8, -1e-6, -0.5, -0.7, -5.0, -200.0], requires_grad=True)
    losses.log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all(), x.grad
    expected = -1 / torch.expm1(-x.detach().double())
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-30)


def test_log_odds_hand_values():
    # ℓ = -1e-8: log-odds = ℓ - log(1 - e^ℓ) = 18.420680738952365; ℓ = -ln 2 (P = 1/2): even odds, 0;
    # ℓ = log 0.2: log(0.2/0.8) = -log 4 = -1.3862943611198906; ℓ = -50: ≈ -50 + 1.9e-22.
    close(losses.log_odds(t(-1e-8, -math.log(2), math.log(0.2), -50.0)),
          [18.420680738952365, 0.0, -1.3862943611198906, -50.0], tol=1e-11)
    # float32 near 0 stays finite, and so does ℓ very negative.
    out = losses.log_odds(torch.tensor([-1e-8, -1e-7, -1e4]))
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(18.420680738952365, rel=1e-6)
    assert out[2].item() == pytest.approx(-1e4)


def test_log_odds_of_a_certain_completion_is_finite_without_gradient():
    """ℓ = 0 exactly (every token certain, reachable in float32) has infinite odds: TRL gives inf (or NaN when both
    completions are certain); here the value is capped finite and no gradient flows through the cap."""
    for dtype in (torch.float32, torch.float64):
        chosen = torch.tensor([0.0, 0.0, -1e-8], dtype=dtype, requires_grad=True)
        rejected = torch.tensor([0.0, -3.0, -2.0], dtype=dtype, requires_grad=True)
        loss = losses.orpo_odds_ratio_loss(chosen, rejected)
        assert torch.isfinite(loss).all(), loss
        loss.sum().backward()
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
        assert chosen.grad[0] == 0 and chosen.grad[1] == 0
        assert loss[0].item() == pytest.approx(math.log(2))  # both certain: an even odds ratio


def test_orpo_odds_ratio_loss_and_orpo_loss_hand_values():
    # chosen P = 1/2 (log-odds 0), rejected P = 0.2 (log-odds -log 4): -log σ(log 4) = log(1 + 1/4) = log 1.25.
    chosen, rejected = t(-math.log(2), math.log(0.2)), t(math.log(0.2), -math.log(2))
    ratio = losses.orpo_odds_ratio_loss(chosen, rejected)
    # the swapped pair: -log σ(-log 4) = log(1 + 4) = log 5
    close(ratio, [0.22314355131420976, math.log(5)])
    # NLL 2.0, λ = 0.1: 2.0 + 0.1 · mean(log 1.25, log 5) = 2.0 + 0.05 · log 6.25
    close(losses.orpo_loss(t(2.0)[0], chosen, rejected, lam=0.1).reshape(1), [2.0 + 0.05 * math.log(6.25)])


def test_orpo_ratio_gradient_pushes_chosen_up_and_rejected_down():
    chosen = t(-1.0, -40.0).requires_grad_()
    rejected = t(-1.0, -40.0).requires_grad_()
    losses.orpo_odds_ratio_loss(chosen, rejected).sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    # d/dℓ logodds(ℓ) = 1/(1 - e^ℓ); at equal log-odds σ(-0) = 1/2: dL/dℓw = -1/(2(1 - e^-1)) = -0.79098835...
    assert chosen.grad[0].item() == pytest.approx(-0.5 / (1 - math.exp(-1.0)), rel=1e-12)


def test_simpo_loss_hand_values():
    # β = 2, γ = 0.5: β·(-1.0) - β·(-1.5) - γ = 0.5 -> -log σ(0.5) = 0.47407698418010668
    close(losses.simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5), [0.47407698418010668])
    # margin exactly γ: log 2; margin below γ: -log σ(-0.5) = 0.97407698418010668
    close(losses.simpo_loss(t(-1.0, -1.0), t(-1.25, -1.0), beta=2.0, gamma=0.5), [math.log(2), 0.97407698418010668])
    # ε = 0.1: 0.9 · 0.474076984 + 0.1 · 0.974076984 = 0.52407698418010668
    close(losses.simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5, label_smoothing=0.1), [0.52407698418010668])


def test_loss_functions_match_trl_on_a_grid():
    """The same numbers as TRL's own `ORPOTrainer.odds_ratio_loss` and `CPOTrainer.cpo_loss` (SimPO), called on a
    stand-in `self` (the settings, and a real `Accelerator`), over mean log-probs from near 0 (the expm1 branch) to very
    negative (the log1p branch)."""
    from accelerate import Accelerator
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

    grid = torch.tensor([-1e-4, -0.05, -0.3, -0.69, -0.7, -1.5, -4.0, -20.0, -200.0], dtype=torch.float64)
    chosen, rejected = torch.meshgrid(grid, grid, indexing="ij")
    chosen, rejected = chosen.reshape(-1), rejected.reshape(-1)
    accelerator = Accelerator()
    trl_orpo = SimpleNamespace(beta=0.1, accelerator=accelerator)
    trl_losses, *_ = TRLORPOTrainer.odds_ratio_loss(trl_orpo, chosen, rejected)  # computes in float32
    torch.testing.assert_close(losses.orpo_odds_ratio_loss(chosen.float(), rejected.float()), -trl_losses / 0.1,
                               rtol=1e-5, atol=1e-7)
    for beta, gamma, eps in ((2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.2)):
        trl_cpo = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps,
                                  accelerator=accelerator)
        expected, *_ = CPOTrainer.cpo_loss(trl_cpo, chosen, rejected)
        torch.testing.assert_close(losses.simpo_loss(chosen, rejected, beta, gamma, eps), expected, rtol=1e-12,
                                   atol=1e-12)


# ---------------------------------------------------------------------------------------- configs and signatures


def test_configs_and_constructors_match_trl():
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

    ours, theirs = ORPOConfig(), TRLORPOConfig(bf16=False)
    for name in ("beta", "learning_rate", "max_length", "padding_value", "disable_dropout", "dataset_num_proc",
                 "model_init_kwargs", "trust_remote_code", "logging_steps"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.beta == 0.1
    simpo, cpo = SimPOConfig(), CPOConfig(bf16=False, loss_type="simpo", cpo_alpha=0.0)
    for name in ("simpo_gamma", "label_smoothing", "learning_rate", "max_length", "logging_steps"):
        assert getattr(simpo, name) == getattr(cpo, name), name
    assert (simpo.beta, simpo.simpo_gamma) == (2.0, 0.5)  # the paper's defaults; TRL's CPOConfig has β = 0.1 (CPO's)
    # TRL's constructor parameters, in TRL's order (hf_align adds `quantization_config` at the end).
    for ours_cls, trl_cls in ((ORPOTrainer, TRLORPOTrainer), (SimPOTrainer, CPOTrainer)):
        trl_params = list(inspect.signature(trl_cls.__init__).parameters)
        assert list(inspect.signature(ours_cls.__init__).parameters)[: len(trl_params)] == trl_params
    with pytest.raises(ValueError, match="label_smoothing"):
        SimPOConfig(label_smoothing=0.5)


# ------------------------------------------------------------------------------------------- token ids vs TRL


def _trl_pair(algorithm: str, tiny_model_path, dataset, tmp_path, **config):
    """(TRL trainer, hf_align trainer) on the same dataset; TRL's SimPO is CPO with loss_type="simpo", cpo_alpha=0."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

    common = dict(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, gradient_checkpointing=False,
                  per_device_train_batch_size=N_ROWS, **config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    if algorithm == "orpo":
        trl_cls, trl_config, ours_cls, ours_config = TRLORPOTrainer, TRLORPOConfig(**common), ORPOTrainer, ORPOConfig
    else:
        trl_cls, ours_cls, ours_config = CPOTrainer, SimPOTrainer, SimPOConfig
        trl_config = CPOConfig(loss_type="simpo", cpo_alpha=0.0, **{"beta": 2.0, "simpo_gamma": 0.5, **common})
    return (
        trl_cls(model=_perturbed(tiny_model_path), args=trl_config, train_dataset=dataset, processing_class=tokenizer),
        ours_cls(model=_perturbed(tiny_model_path), args=ours_config(**common), train_dataset=dataset,
                 processing_class=tokenizer),
    )


_PERTURBED: dict[str, dict] = {}


def _perturbed(tiny_model_path) -> PreTrainedModel:
    """A fresh copy of the tiny model plus fixed-seed noise (the same weights on every call)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    if tiny_model_path not in _PERTURBED:
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        _PERTURBED[tiny_model_path] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(_PERTURBED[tiny_model_path])
    return model


@pytest.mark.parametrize("algorithm", ["orpo", "simpo"])
@pytest.mark.parametrize("kind", KINDS)
def test_token_ids_and_batches_match_trl(algorithm, kind, preference_data, tiny_model_path, tiny_tokenizer, tmp_path):
    """Every row of both splits: hf_align's prompt + completion ids and completion masks are TRL's ORPO/CPO
    `{chosen,rejected}_input_ids` and `labels != -100` (which add an EOS after a chat template's `<|im_end|>\\n`, unlike
    TRL's DPO), and the collated batches agree."""
    dataset = concatenate_datasets([preference_data(kind, split="train"), preference_data(kind, split="test")])
    trl_trainer, ours = _trl_pair(algorithm, tiny_model_path, dataset, tmp_path)
    assert len(ours.train_dataset) == len(dataset) and ours.dropped_rows["train"] == 0
    eos = tiny_tokenizer.eos_token_id
    for i in range(len(dataset)):
        row, theirs = ours.train_dataset[i], trl_trainer.train_dataset[i]
        for column in ("chosen", "rejected"):
            assert row["prompt_ids"] + row[f"{column}_ids"] == theirs[f"{column}_input_ids"], (i, column)
            completion = [label != -100 for label in theirs[f"{column}_labels"]]
            assert completion == [False] * len(row["prompt_ids"]) + [True] * len(row[f"{column}_ids"]), (i, column)
            assert row[f"{column}_ids"][-1] == eos
    rows = list(range(N_ROWS))
    batch = ours.data_collator([ours.train_dataset[i] for i in rows])
    trl_batch = trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in rows])
    trl_batch = trl_trainer.concatenated_inputs(trl_batch, padding_value=tiny_tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], trl_batch["concatenated_input_ids"])
    assert torch.equal(batch["attention_mask"], trl_batch["concatenated_attention_mask"])
    assert torch.equal(batch["completion_mask"].bool(), trl_batch["concatenated_labels"] != -100)


# ------------------------------------------------------------------------------------------- first step vs TRL


def _first_step(trainer, stored_metrics: dict) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """`compute_loss` + backward on the first `N_ROWS` rows, in train mode: (loss and logged metrics, gradients)."""
    trainer.model.train()
    trainer.model.zero_grad()
    stored_metrics.clear()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_ROWS)])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in stored_metrics.items() if values}
    metrics["loss"] = loss.item()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return metrics, grads


REQUIRED = {
    "orpo": ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "nll_loss", "log_odds_ratio",
             "log_odds_chosen"),
    "simpo": ("loss", "rewards/chosen", "rewards/margins", "logps/chosen"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("algorithm", "config"), [
    pytest.param("orpo", {}, id="orpo"),
    pytest.param("orpo", {"beta": 0.5}, id="orpo-lambda0.5"),
    pytest.param("simpo", {}, id="simpo"),
    pytest.param("simpo", {"beta": 2.5, "simpo_gamma": 1.4, "label_smoothing": 0.1}, id="simpo-smoothed"),
])
def test_first_step_matches_trl(algorithm, config, kind, preference_data, tiny_model_path, tmp_path, capsys):
    trl_trainer, ours = _trl_pair(algorithm, tiny_model_path, preference_data(kind, N_ROWS), tmp_path, **config)
    expected, expected_grads = _first_step(trl_trainer, trl_trainer._stored_metrics["train"])
    actual, grads = _first_step(ours, ours._metrics["train"])
    for key in REQUIRED[algorithm]:
        assert key in actual, key
        assert abs(expected[key]) > 1e-3, f"{key}={expected[key]} too close to 0 to compare"
    compared = set(expected) & set(actual) - {"logits/chosen", "logits/rejected"}
    assert {"rewards/rejected", "rewards/accuracies", "logps/rejected", *REQUIRED[algorithm]} <= compared
    for key in sorted(compared):
        assert actual[key] == pytest.approx(expected[key], rel=REL, abs=1e-6), (key, expected[key], actual[key])
    assert set(grads) == set(expected_grads)
    worst_grad = max(((grads[n] - expected_grads[n]).norm() / expected_grads[n].norm()).item() for n in grads)
    assert worst_grad < REL, worst_grad
    worst = max(abs(actual[k] - expected[k]) / abs(expected[k]) for k in REQUIRED[algorithm])
    with capsys.disabled():
        print(f"\n[parity] {algorithm}{config or ''}/{kind}: loss TRL {expected['loss']:.6f} hf_align "
              f"{actual['loss']:.6f}; worst relative difference: metrics {worst:.1e}, gradients {worst_grad:.1e}")


# ------------------------------------------------------------------------------------------------------ learning


def _learning_run(trainer_cls, config_cls, tiny_model_path, tiny_tokenizer, preference_data, tmp_path, **config):
    train, test = preference_data("preference", split="train"), preference_data("preference", split="test")
    args = config_cls(
        output_dir=str(tmp_path / "out"), learning_rate=5e-4, max_steps=40, per_device_train_batch_size=8,
        per_device_eval_batch_size=len(test),  # one eval batch: logged accuracy and margins are exact held-out means
        lr_scheduler_type="constant", logging_steps=10, report_to="none", save_strategy="no", seed=0, **config,
    )
    trainer = trainer_cls(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                          train_dataset=train, processing_class=tiny_tokenizer)
    before = trainer.evaluate(test)
    trainer.train()
    after = trainer.evaluate(test)
    assert trainer.state.global_step == 40
    return before, after


def test_orpo_learns_held_out_preferences(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    before, after = _learning_run(ORPOTrainer, ORPOConfig, tiny_model_path, tiny_tokenizer, preference_data, tmp_path)
    # A randomly initialised model barely separates the pairs; afterwards every held-out pair is ranked right.
    assert before["eval_rewards/accuracies"] < 0.8 and abs(before["eval_log_odds_chosen"]) < 0.1, before
    assert after["eval_rewards/accuracies"] == 1.0, after
    # The log odds ratio of held-out pairs rises by more than a nat, and the SFT term learns the chosen answers.
    assert after["eval_log_odds_chosen"] > before["eval_log_odds_chosen"] + 1.0
    assert after["eval_log_odds_ratio"] > before["eval_log_odds_ratio"]
    assert after["eval_nll_loss"] < before["eval_nll_loss"] - 1.0
    assert after["eval_logps/chosen"] > before["eval_logps/chosen"]
    assert after["eval_loss"] < before["eval_loss"]


def test_simpo_learns_held_out_preferences(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    before, after = _learning_run(SimPOTrainer, SimPOConfig, tiny_model_path, tiny_tokenizer, preference_data, tmp_path)
    gamma = SimPOConfig.simpo_gamma
    assert before["eval_rewards/accuracies"] < 0.8 and before["eval_rewards/margins"] < gamma, before
    assert after["eval_rewards/accuracies"] == 1.0, after
    # SimPO asks for a reward margin of γ: held-out pairs go from below it to well beyond it.
    assert after["eval_rewards/margins"] > 2 * gamma
    assert after["eval_loss"] < 0.5 * before["eval_loss"]


# --------------------------------------------------------------------------------------- no reference model


def _live_models() -> set[int]:
    with warnings.catch_warnings():  # isinstance() on some deprecated module objects warns
        warnings.simplefilter("ignore")
        return {id(obj) for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)}


@pytest.mark.parametrize("trainer_cls", [ORPOTrainer, SimPOTrainer], ids=["orpo", "simpo"])
def test_no_reference_model_is_built(trainer_cls, tiny_model_path, tiny_tokenizer, preference_data, tmp_path,
                                     monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a reference copy was made")

    real_deepcopy = copy.deepcopy

    def deepcopy_without_modules(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError(f"deep copy of a {type(obj).__name__}")
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(hf_align.models, "frozen_copy", refuse)
    monkeypatch.setattr(copy, "deepcopy", deepcopy_without_modules)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    policy_params = sum(p.numel() for p in policy.parameters())
    models_before = _live_models()
    args = trainer_cls.config_class(output_dir=str(tmp_path / "out"), learning_rate=1e-3, **FAST)
    trainer = trainer_cls(model=policy, args=args, train_dataset=preference_data("preference", 8),
                          processing_class=tiny_tokenizer)
    trainer.train()

    assert not hasattr(trainer, "ref_model") or trainer.ref_model is None
    assert _live_models() <= models_before  # no model object was created, by copy or by loading
    held = [value for value in vars(trainer).values() if isinstance(value, torch.nn.Module)]
    held += list(trainer.accelerator._models)
    parameters = {id(p): p.numel() for module in held for p in module.parameters()}
    assert sum(parameters.values()) == policy_params
    assert trainer.model is policy


# ---------------------------------------------------------------------------------------------- drop-in use


@pytest.mark.parametrize("trainer_cls", [ORPOTrainer, SimPOTrainer], ids=["orpo", "simpo"])
def test_quickstart_with_import_swapped_model_id_and_lora(trainer_cls, tiny_model_path, preference_data, tmp_path):
    """TRL's ORPO quickstart shape (`from trl.experimental.orpo import ...` -> `from hf_align import ...`), with a model
    id, conversational data and a LoRA adapter: the adapter trains, and still no reference exists."""
    args = trainer_cls.config_class(output_dir=str(tmp_path / "out"), learning_rate=1e-3, **FAST)
    trainer = trainer_cls(model=tiny_model_path, args=args, train_dataset=preference_data("conversational", 8),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name for name in lora)
    trainer.train()
    assert trainer.state.global_step == 3 and math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(lora[n], p.detach()) for n, p in trainer.model.named_parameters() if n in lora)
    assert getattr(trainer, "ref_model", None) is None


def test_model_init_is_refused(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    with pytest.raises(ValueError, match="model_init"):
        ORPOTrainer(model=tiny_model_path, args=ORPOConfig(output_dir=str(tmp_path), **FAST),
                    train_dataset=preference_data("preference", 4), processing_class=tiny_tokenizer,
                    model_init=lambda: None)


@pytest.mark.parametrize("trainer_cls", [ORPOTrainer, SimPOTrainer], ids=["orpo", "simpo"])
def test_malformed_row_raises_before_training(trainer_cls, tiny_model_path, tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f" Yes {i}.", "rejected": " No."} for i in range(5)]
    rows[3]["rejected"] = ""
    with pytest.raises(DataError, match=r"train dataset, row 3, column 'rejected'"):
        trainer_cls(model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                    args=trainer_cls.config_class(output_dir=str(tmp_path), **FAST),
                    train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)


def test_padding_value_pads_the_batch(tiny_model_path, tiny_tokenizer, preference_data, tmp_path):
    args = ORPOConfig(output_dir=str(tmp_path), padding_value=7, **FAST)
    trainer = ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                           train_dataset=preference_data("preference", 4), processing_class=tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == 7).all()
