"""CPOTrainer, and the options ORPO, CPO and SimPO share: the CPO losses against hand-computed values and TRL's own
`CPOTrainer.cpo_loss`; first-step loss, every metric both log and gradients against TRL 1.16's
`trl.experimental.cpo.CPOTrainer` for every loss type (the same Config keyword arguments on both sides: the import is
all that changes), and against `trl.experimental.orpo.ORPOTrainer` with `max_completion_length`; `generate_during_eval`;
and the errors of settings that cannot work.

Parity follows tests/test_orpo_simpo.py (same perturbed weights, the first rows collated by each trainer's own collator,
`compute_loss` + backward in train mode, 2e-3 relative; `logits/*` left out, see there). TRL 1.16 ignores
`max_completion_length` for decoder-only models, so its side gets its tokenized completions cut to that many tokens
by hand: the numbers TRL gives on the completions hf_align trains on.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

import hf_align
from hf_align import CPOConfig, CPOTrainer, ORPOConfig, ORPOTrainer, SimPOConfig, SimPOTrainer, losses, preference
from test_orpo_simpo import FAST, N_ROWS, REL, _first_step, _perturbed, close, t

PAIR_METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"}
# One-word answers: summed completion log-probs near -20, where TRL's `p^-α` with p = e^(sum) is still finite in
# float32 (the embedded pairs sum to about -110, where TRL's AlphaPO reward is -inf; see test_alphapo_reward_*).
SHORT_PAIRS = [
    {"prompt": f"Question: Is {thing} {quality}?\nAnswer:", "chosen": f" {yes}.", "rejected": f" {no}."}
    for thing, quality, yes, no in [
        ("fire", "hot", "Yes", "No"), ("ice", "hot", "No", "Yes"), ("the sea", "wet", "Yes", "No"),
        ("sand", "wet", "No", "Yes"), ("a whale", "big", "Yes", "No"), ("an ant", "big", "No", "Yes"),
        ("honey", "sweet", "Yes", "No"), ("salt", "sweet", "No", "Yes"),
    ]
]


# ------------------------------------------------------------------------------------------------ loss functions
# Reference values: mpmath at 30 digits.


def test_alphapo_reward_hand_values():
    # (1 - p^-α)/α with p = e^ℓ: α = 0.5, ℓ = -2: 2(1 - e) = -3.4365636569180905; α = -1, ℓ = -1: -(1 - 1/e).
    close(losses.alphapo_reward(t(-2.0), 0.5), [-3.43656365691809047])
    close(losses.alphapo_reward(t(-1.0), -1.0), [-0.632120558828557678])
    close(losses.alphapo_reward(t(-2.0, -0.3), 0.0), [-2.0, -0.3])  # α = 0: the log-prob itself
    # d/dℓ (1 - e^(-αℓ))/α = e^(-αℓ): e at α = 0.5, ℓ = -2.
    logp = t(-2.0).requires_grad_()
    losses.alphapo_reward(logp, 0.5).sum().backward()
    assert logp.grad.item() == pytest.approx(math.e, rel=1e-12)


def test_alphapo_reward_is_finite_where_trls_underflows():
    """ℓ = -200 (a long completion's summed log-prob), α = 0.1, float32: TRL's `(1 - exp(ℓ).pow(-α)) / α` takes
    e^-200 = 0 to the power -0.1 and gets -inf; `-expm1(-αℓ)/α` gives (1 - e^20)/0.1 = -4851651944.0979028."""
    logps = torch.tensor([-200.0, -3.0])
    trl_form = (1 - torch.exp(logps).pow(-0.1)) / 0.1
    assert trl_form[0].item() == -math.inf
    ours = losses.alphapo_reward(logps, 0.1)
    assert ours[0].item() == pytest.approx(-4851651944.0979028, rel=1e-6)
    assert ours[1].item() == pytest.approx(trl_form[1].item(), rel=1e-6)  # the same where TRL's is finite


def test_cpo_loss_hand_values():
    # sigmoid, β = 0.1, h = 10: -log σ(1) = 0.31326168751822283; ε = 0.2: 0.8·that + 0.2·(-log σ(-1)) = 0.5132616875...
    close(losses.cpo_loss("sigmoid", t(-10.0), t(-20.0), beta=0.1), [0.313261687518222834])
    close(losses.cpo_loss("sigmoid", t(-10.0), t(-20.0), beta=0.1, label_smoothing=0.2), [0.513261687518222834])
    # hinge, β = 0.1: relu(1 - βh) for h = 10, 5, -3
    close(losses.cpo_loss("hinge", t(-10.0, -10.0, -10.0), t(-20.0, -15.0, -7.0), beta=0.1), [0.0, 0.5, 1.3])
    # ipo, β = 0.5: (h - 1/(2β))² with h = -1.0 - (-1.4) = 0.4: 0.36
    close(losses.cpo_loss("ipo", t(-1.0), t(-1.4), beta=0.5), [0.36])
    # simpo, β = 2, γ = 0.5: -log σ(0.5) (tests/test_orpo_simpo.py)
    close(losses.cpo_loss("simpo", t(-1.0), t(-1.5), beta=2.0, simpo_gamma=0.5), [0.47407698418010668])
    # sigmoid with AlphaPO's α = 0.5, ℓw = -2, ℓl = -4: r = 2(1 - e), 2(1 - e²); h = 9.3415485409432100; β = 0.1
    close(losses.cpo_loss("sigmoid", t(-2.0), t(-4.0), beta=0.1, alpha=0.5), [0.331400682370449489])
    # AlphaPO (simpo + α = 0.25), β = 2, γ = 0.5, ℓw = -1, ℓl = -1.5: r = 4(1 - e^0.25), 4(1 - e^0.375)
    close(losses.cpo_loss("simpo", t(-1.0), t(-1.5), beta=2.0, simpo_gamma=0.5, alpha=0.25), [0.350589613189103377])


def test_cpo_loss_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="Unknown CPO loss_type 'kto_pair'"):
        losses.cpo_loss("kto_pair", t(-1.0), t(-2.0), beta=0.1)
    for loss_type in ("hinge", "ipo"):
        with pytest.raises(ValueError, match="label_smoothing"):
            losses.cpo_loss(loss_type, t(-1.0), t(-2.0), beta=0.1, label_smoothing=0.1)


@pytest.mark.parametrize("alpha", [0.0, 0.3, -0.4])
@pytest.mark.parametrize(("loss_type", "label_smoothing"),
                         [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.0),
                          ("simpo", 0.15)])
def test_cpo_loss_matches_trl_on_a_grid(loss_type, label_smoothing, alpha):
    """The same losses and rewards as TRL's own `CPOTrainer.cpo_loss`, called on a stand-in `self` (the settings, and
    a real `Accelerator`), in float64 over log-probs where TRL's AlphaPO form is finite."""
    from accelerate import Accelerator
    from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer

    grid = torch.tensor([-0.01, -0.4, -1.3, -3.0, -7.5, -25.0], dtype=torch.float64)
    chosen, rejected = (values.reshape(-1) for values in torch.meshgrid(grid, grid, indexing="ij"))
    settings = dict(beta=0.7, label_smoothing=label_smoothing, simpo_gamma=0.8, alpha=alpha)
    trl_self = SimpleNamespace(loss_type=loss_type, accelerator=Accelerator(), **settings)
    expected, expected_chosen_rewards, expected_rejected_rewards = TRLCPOTrainer.cpo_loss(trl_self, chosen, rejected)
    torch.testing.assert_close(losses.cpo_loss(loss_type, chosen, rejected, **settings), expected, rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(0.7 * losses.alphapo_reward(chosen, alpha), expected_chosen_rewards, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(0.7 * losses.alphapo_reward(rejected, alpha), expected_rejected_rewards, rtol=1e-12,
                               atol=1e-12)


# ---------------------------------------------------------------------------------------- configs and signatures


def test_cpo_config_has_trls_fields_and_defaults():
    from trl.experimental.cpo import CPOConfig as TRLCPOConfig
    from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig

    ours, theirs = CPOConfig(), TRLCPOConfig(bf16=False)
    # TRL turns gradient checkpointing on; hf_align keeps transformers' default (AlignConfig's docstring says why).
    differ = {"gradient_checkpointing", "output_dir", "logging_dir", "bf16", "remove_unused_columns"}
    for name in set(vars(theirs)) - differ:
        assert hasattr(ours, name), f"CPOConfig lacks TRL's field {name}"
    for name in ("learning_rate", "max_length", "max_completion_length", "beta", "label_smoothing", "loss_type",
                 "disable_dropout", "cpo_alpha", "simpo_gamma", "alpha", "generate_during_eval", "is_encoder_decoder",
                 "model_init_kwargs", "trust_remote_code", "dataset_num_proc", "logging_steps"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.beta, ours.loss_type, ours.cpo_alpha, ours.simpo_gamma, ours.alpha) == (0.1, "sigmoid", 1.0, 0.5, 0.0)
    for name in ("max_completion_length", "generate_during_eval", "is_encoder_decoder"):
        assert getattr(ORPOConfig(), name) == getattr(TRLORPOConfig(bf16=False), name), name
    # "alphapo" is TRL's shorthand: loss_type "simpo" and no NLL term, whatever cpo_alpha was.
    for config_class in (CPOConfig, TRLCPOConfig):
        alphapo = config_class(loss_type="alphapo", cpo_alpha=1.0, alpha=0.25, bf16=False)
        assert (alphapo.loss_type, alphapo.cpo_alpha, alphapo.alpha) == ("simpo", 0.0, 0.25)
    # SimPO is CPO with SimPO's defaults, nothing else.
    assert issubclass(SimPOConfig, CPOConfig) and issubclass(SimPOTrainer, CPOTrainer)
    assert SimPOTrainer.compute_loss is CPOTrainer.compute_loss
    simpo = SimPOConfig()
    assert (simpo.beta, simpo.loss_type, simpo.cpo_alpha, simpo.simpo_gamma) == (2.0, "simpo", 0.0, 0.5)
    trl_params = list(inspect.signature(TRLCPOTrainer.__init__).parameters)
    assert list(inspect.signature(CPOTrainer.__init__).parameters)[: len(trl_params)] == trl_params
    assert {"CPOConfig", "CPOTrainer"} <= set(hf_align.__all__)


SHARED_ERRORS = [
    ({"is_encoder_decoder": True}, "is_encoder_decoder=True: hf_align trains decoder-only"),
    ({"max_completion_length": 0}, "max_completion_length must be at least 1"),
]
CPO_ERRORS = [
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing=0.1 needs loss_type 'sigmoid' or 'simpo'"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing=0.1 needs loss_type 'sigmoid' or 'simpo'"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"loss_type": "kto_pair"}, "loss_type must be one of"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"cpo_alpha": -1.0}, "cpo_alpha, the weight of the NLL term, must be >= 0"),
]


@pytest.mark.parametrize(("config_class", "settings", "message"), [
    *[(config_class, *error) for config_class in (CPOConfig, SimPOConfig, ORPOConfig) for error in SHARED_ERRORS],
    *[(config_class, *error) for config_class in (CPOConfig, SimPOConfig) for error in CPO_ERRORS],
])
def test_settings_that_cannot_work_raise_at_config_time(config_class, settings, message):
    with pytest.raises(ValueError, match=message):
        config_class(**settings)


@pytest.mark.parametrize("config_class", [CPOConfig, ORPOConfig])
def test_generate_during_eval_needs_a_tracker_in_report_to(config_class, monkeypatch):
    monkeypatch.setattr(preference, "installed_sample_trackers", lambda: ["wandb"])
    with pytest.raises(ValueError, match=r"neither is in report_to=\[\]: add 'wandb' to report_to"):
        config_class(generate_during_eval=True, report_to="none")
    assert config_class(generate_during_eval=True, report_to=["wandb"]).generate_during_eval
    monkeypatch.setattr(preference, "installed_sample_trackers", lambda: [])
    with pytest.raises(ValueError, match="requires Weights and Biases or Comet to be installed"):
        config_class(generate_during_eval=True, report_to=["wandb"])


@pytest.mark.parametrize("trainer_cls", [CPOTrainer, ORPOTrainer], ids=["cpo", "orpo"])
def test_an_encoder_decoder_model_is_refused(trainer_cls, tiny_tokenizer, preference_data, tmp_path):
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tiny_tokenizer), d_model=8, d_ff=16, d_kv=4, num_layers=1,
                                             num_heads=2))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        trainer_cls(model=t5, args=trainer_cls.config_class(output_dir=str(tmp_path), **FAST),
                    train_dataset=preference_data("preference", 4), processing_class=tiny_tokenizer)


# ------------------------------------------------------------------------------------------- first step vs TRL


def _common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, gradient_checkpointing=False,
                per_device_train_batch_size=N_ROWS)


def _cut_trl_completions(trainer, max_completion_length: int) -> int:
    """Cuts each completion of TRL's tokenized train dataset to its first `max_completion_length` tokens (prompt
    labels are -100, before any padding). Returns how many completions were cut."""
    cut_count = 0

    def cut(row):
        nonlocal cut_count
        out = {}
        for side in ("chosen", "rejected"):
            keep = sum(label == -100 for label in row[f"{side}_labels"]) + max_completion_length
            cut_count += len(row[f"{side}_input_ids"]) > keep
            for key in ("input_ids", "attention_mask", "labels"):
                out[f"{side}_{key}"] = row[f"{side}_{key}"][:keep]
        return out

    trainer.train_dataset = trainer.train_dataset.map(cut)
    return cut_count


def _assert_first_step_matches(trl_trainer, ours, required: set, label: str, capsys) -> None:
    expected, expected_grads = _first_step(trl_trainer, trl_trainer._stored_metrics["train"])
    actual, grads = _first_step(ours, ours._metrics["train"])
    compared = set(expected) & set(actual) - {"logits/chosen", "logits/rejected"}
    assert required <= compared, required - compared
    for key in sorted(compared):
        assert math.isfinite(expected[key]), (key, expected[key])
        assert actual[key] == pytest.approx(expected[key], rel=REL, abs=1e-6), (key, expected[key], actual[key])
    assert set(grads) == set(expected_grads)
    worst_grad = max(((grads[n] - expected_grads[n]).norm() / expected_grads[n].norm()).item() for n in grads)
    assert worst_grad < REL, worst_grad
    worst = max(abs(actual[k] - expected[k]) / abs(expected[k]) for k in compared if abs(expected[k]) > 1e-6)
    with capsys.disabled():
        print(f"\n[parity] {label}: loss TRL {expected['loss']:.6f} hf_align {actual['loss']:.6f}; worst relative "
              f"difference: metrics {worst:.1e}, gradients {worst_grad:.1e}")


CPO_CASES = [
    pytest.param({}, "preference", id="sigmoid"),
    pytest.param({}, "preference_conversational", id="sigmoid-conversational"),
    pytest.param({"cpo_alpha": 0.0}, "preference", id="sigmoid-cpo_alpha0"),
    pytest.param({"label_smoothing": 0.2, "cpo_alpha": 0.5}, "preference", id="sigmoid-smoothed"),
    pytest.param({"alpha": 0.1}, "short", id="sigmoid-alpha0.1"),
    pytest.param({"alpha": -0.3, "beta": 0.3}, "short", id="sigmoid-alpha-0.3"),
    pytest.param({"loss_type": "hinge"}, "preference", id="hinge"),
    pytest.param({"loss_type": "ipo", "beta": 0.5}, "preference", id="ipo"),
    pytest.param({"loss_type": "simpo", "beta": 2.0}, "preference", id="simpo-cpo_alpha1"),
    pytest.param({"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 1.4, "cpo_alpha": 0.0, "label_smoothing": 0.1},
                 "preference_conversational", id="simpo-smoothed"),
    pytest.param({"loss_type": "alphapo", "alpha": 0.25, "beta": 2.5}, "preference", id="alphapo"),
]


@pytest.mark.parametrize(("config", "data"), CPO_CASES)
def test_cpo_first_step_matches_trl(config, data, preference_data, tiny_model_path, tmp_path, capsys):
    """The same Config keyword arguments on both sides."""
    from trl.experimental.cpo import CPOConfig as TRLCPOConfig
    from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer

    dataset = Dataset.from_list(SHORT_PAIRS) if data == "short" else preference_data(data, N_ROWS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    trl_args, args = TRLCPOConfig(**_common(tmp_path), **config), CPOConfig(**_common(tmp_path), **config)
    trl_trainer = TRLCPOTrainer(model=_perturbed(tiny_model_path), args=trl_args, train_dataset=dataset,
                                processing_class=tokenizer)
    ours = CPOTrainer(model=_perturbed(tiny_model_path), args=args, train_dataset=dataset, processing_class=tokenizer)
    with_nll = args.cpo_alpha != 0
    _assert_first_step_matches(trl_trainer, ours, PAIR_METRICS | ({"nll_loss"} if with_nll else set()),
                               f"cpo {config}/{data}", capsys)
    if not with_nll:  # TRL logs a constant nll_loss = 0 when the term is off; hf_align logs nothing then
        assert "nll_loss" not in ours._metrics["train"]


@pytest.mark.parametrize("algorithm", ["orpo", "cpo"])
def test_max_completion_length_matches_trl_on_cut_completions(algorithm, preference_data, tiny_model_path, tmp_path,
                                                              capsys):
    """hf_align keeps each completion's first `max_completion_length` tokens (the chosen answers here lose theirs and
    their EOS; the short rejected ones keep theirs): its ids, loss, metrics and gradients are TRL's on those ids."""
    from trl.experimental.cpo import CPOConfig as TRLCPOConfig
    from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

    limit = 8
    trl_classes, ours_classes = {"orpo": (TRLORPOTrainer, TRLORPOConfig), "cpo": (TRLCPOTrainer, TRLCPOConfig)}, {
        "orpo": (ORPOTrainer, ORPOConfig), "cpo": (CPOTrainer, CPOConfig)}
    dataset, tokenizer = preference_data("preference", N_ROWS), AutoTokenizer.from_pretrained(tiny_model_path)
    config = dict(**_common(tmp_path), max_completion_length=limit)
    (trl_cls, trl_config), (ours_cls, ours_config) = trl_classes[algorithm], ours_classes[algorithm]
    trl_trainer = trl_cls(model=_perturbed(tiny_model_path), args=trl_config(**config), train_dataset=dataset,
                          processing_class=tokenizer)
    ours = ours_cls(model=_perturbed(tiny_model_path), args=ours_config(**config), train_dataset=dataset,
                    processing_class=tokenizer)
    assert _cut_trl_completions(trl_trainer, limit) == N_ROWS  # every chosen answer is longer, no rejected one
    for i in range(N_ROWS):
        row, theirs = ours.train_dataset[i], trl_trainer.train_dataset[i]
        for side in ("chosen", "rejected"):
            assert len(row[f"{side}_ids"]) <= limit
            assert row["prompt_ids"] + row[f"{side}_ids"] == theirs[f"{side}_input_ids"], (i, side)
    required = PAIR_METRICS | {"nll_loss"} | ({"log_odds_ratio", "log_odds_chosen"} if algorithm == "orpo" else set())
    _assert_first_step_matches(trl_trainer, ours, required, f"{algorithm} max_completion_length={limit}", capsys)


# ------------------------------------------------------------------------------------------- generate_during_eval


@pytest.mark.parametrize("trainer_cls", [CPOTrainer, ORPOTrainer], ids=["cpo", "orpo"])
def test_generate_during_eval_logs_a_table_of_samples(trainer_cls, tiny_model_path, tiny_tokenizer, preference_data,
                                                      tmp_path, monkeypatch):
    """`evaluate()` samples completions (`max_completion_length` new tokens at most) for `eval_batch_size` random eval
    prompts and logs them as W&B's table `game_log` (Prompt, Policy), as TRL does: the real W&B client, offline, its
    `log` recorded on the way through; the trainer is built without W&B's callback (the test starts the run)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, generated = [], []
    generate = preference.generation.generate_completions

    def recorded_generate(model, tokenizer, prompts, sampling):
        generated.append((sampling, generate(model, tokenizer, prompts, sampling)))
        return generated[-1][1]

    monkeypatch.setattr(preference.generation, "generate_completions", recorded_generate)
    args = trainer_cls.config_class(output_dir=str(tmp_path), generate_during_eval=True, max_completion_length=5,
                                    per_device_eval_batch_size=3, **{**FAST, "report_to": ["wandb"]})
    args.report_to = []  # no WandbCallback
    eval_rows = preference_data("conversational", 4, split="test")
    trainer = trainer_cls(model=tiny_model_path, args=args, train_dataset=preference_data("conversational", 4),
                          eval_dataset=eval_rows, processing_class=tiny_tokenizer)
    trainer.args.report_to = ["wandb"]
    run = wandb.init(project="hf_align-test", dir=str(tmp_path))
    log = wandb.log  # the run's, set by `init`

    def recorded_log(values, *args, **kwargs):
        logged.append(values)
        return log(values, *args, **kwargs)

    monkeypatch.setattr(wandb, "log", recorded_log)
    try:
        metrics = trainer.evaluate()
        assert "game_log" in dict(run.summary)
    finally:
        run.finish()
    assert math.isfinite(metrics["eval_loss"])
    [entry] = logged
    table = entry["game_log"].get_dataframe()
    assert list(table.columns) == ["Prompt", "Policy"] and len(table) == 3
    rendered = {tiny_tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
                for row in eval_rows}
    assert set(table["Prompt"]) <= rendered
    [(sampling, completions)] = generated
    assert sampling.max_new_tokens == 5 and sampling.temperature == 1.0
    assert list(table["Policy"]) == completions.texts and (completions.lengths <= 5).all()
    assert completions.lengths.sum() > 0
