"""Every DPO loss type and option of TRL 1.16's `DPOTrainer`, against hand values and against TRL.

- Hand values: each pure loss of `hf_align.losses` (DPO section) on a tiny tensor, against its formula written out
  here with `math` (never TRL's code).
- First-step parity (`test_dpo_parity`'s pattern and helpers): for every loss type, a weighted combination of three,
  each f-divergence, WPO weighting, LD-DPO and DiscoPOP's τ, the loss and every metric both trainers log agree with
  TRL 1.16's to 2e-3 relative.
- Several steps of `Trainer.train()` (`test_parity_sweep.run_pair`): `bco_pair`, and TR-DPO's reference updates for
  DPO and KTO, whose references must end equal to TRL's and different from where they started. A run resumed from a
  checkpoint goes on with the moved reference.
- Bad settings raise at Config time naming the field; peft with `sync_ref_model` raises as in TRL.

Run with `-s` to see the worst relative difference per case.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import hf_align
from hf_align import losses
from hf_align.reference_sync import REFERENCE_STATE_NAME, ReferenceSync
from test_dpo_parity import N_ROWS, REL, _build_pair, _common_args, _compare, _first_step, _rel
from test_dpo_parity import make_models, policy_state  # noqa: F401 (fixtures, found by pytest through this import)
from test_parity_sweep import compare as compare_logs
from test_parity_sweep import run_pair
from test_resume import CHECKPOINT, STEPS, Case, assert_same_logs, assert_same_weights, step_logs
from test_resume import build  # noqa: F401 (a fixture)

trl = pytest.importorskip("trl")

MAX_REL_DIFF: dict[str, float] = {}  # case -> worst relative difference of the loss (every metric is checked too)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-9, atol=1e-12)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ============================================================================================= hand values, pure losses

R = (0.5, -1.0)  # log-ratios used below


def test_f_divergence_scores_hand_values():
    r = t(*R)
    close(losses.f_divergence_scores(r, "reverse_kl"), R)
    close(losses.f_divergence_scores(r, "forward_kl"), [1 - math.exp(-x) for x in R])
    close(losses.f_divergence_scores(r, "js_divergence"), [math.log(2) + log_sigmoid(x) for x in R])
    close(losses.f_divergence_scores(r, "alpha_divergence", 0.5), [(math.exp(-0.5 * x) - 1) / -0.5 for x in R])
    close(losses.f_divergence_scores(r, "alpha_divergence", 0.3), [(math.exp(-0.7 * x) - 1) / -0.7 for x in R])
    close(losses.f_divergence_scores(r, "alpha_divergence", 1.0), R)  # the limit a -> 1 is reverse KL
    # 0 where the policy is the reference, for every divergence.
    for kind in losses.F_DIVERGENCE_TYPES:
        close(losses.f_divergence_scores(t(0.0), kind), [0.0])
    # The exponent is capped: a huge log-ratio stays finite.
    assert torch.isfinite(losses.f_divergence_scores(torch.tensor([-1e4]), "alpha_divergence", 0.3)).all()
    with pytest.raises(ValueError, match="f_divergence_type"):
        losses.f_divergence_scores(r, "kl")


def test_length_normalized_logit_and_ipo_hand_values():
    h = losses.length_normalized_logit(t(3.0, -2.0), t(1.0, 4.0), t(3, 4), t(2, 0))
    close(h, [3 / 3 - 1 / 2, -2 / 4 - 4 / 1])  # a length of 0 counts as 1
    close(losses.ipo_loss(t(3.0), t(1.0), t(3), t(2), beta=0.5), [(0.5 - 1.0) ** 2])


def test_exo_pair_hand_values():
    beta, eps = 0.5, 0.1
    expected = []
    for h in (2.0, -1.0):
        qw, ql = sigmoid(beta * h), sigmoid(-beta * h)
        expected.append(qw * (math.log(qw) - math.log(1 - eps)) + ql * (math.log(ql) - math.log(eps)))
    close(losses.exo_pair_loss(t(2.0, -1.0), beta, eps), expected)
    # A KL: 0 when the policy's pair distribution is the label distribution, σ(βh) = 1 - ε.
    h_star = math.log((1 - eps) / eps) / beta
    close(losses.exo_pair_loss(t(h_star), beta, eps), [0.0])


def test_nca_bco_sppo_apo_hand_values():
    beta, (w, l) = 0.5, R  # chosen log-ratio 0.5, rejected -1.0
    cw, cl = t(w), t(l)
    close(losses.nca_pair_loss(cw, cl, beta),
          [-log_sigmoid(beta * w) - 0.5 * log_sigmoid(-beta * w) - 0.5 * log_sigmoid(-beta * l)])
    close(losses.bco_pair_loss(cw, cl, beta), [-log_sigmoid(beta * w) - log_sigmoid(-beta * l)])
    close(losses.sppo_hard_loss(cw, cl, beta), [(w - 1.0) ** 2 + (l + 1.0) ** 2])  # 1/(2β) = 1
    close(losses.apo_zero_loss(cw, cl, beta), [1 - sigmoid(beta * w) + sigmoid(beta * l)])
    close(losses.apo_down_loss(cw, cl, beta), [sigmoid(beta * w) + 1 - sigmoid(beta * (w - l))])


def test_aot_sorts_before_comparing():
    beta, eps = 0.5, 0.1
    # sorted: [1, 3] - [0, 2] = [1, 1], whatever the pairing of the inputs
    expected = [-(1 - eps) * log_sigmoid(beta) - eps * log_sigmoid(-beta)] * 2
    close(losses.aot_loss(t(3.0, 1.0), t(0.0, 2.0), beta, eps), expected)
    unsorted = losses.dpo_sigmoid_loss(t(3.0, 1.0) - t(0.0, 2.0), beta, eps)
    assert not torch.allclose(unsorted, torch.tensor(expected, dtype=torch.float64))


def test_discopop_hand_values_and_stability():
    beta, tau = 0.5, 0.05
    expected = []
    for h in (0.2, -0.3):
        z = beta * h
        m = sigmoid(z / tau)
        expected.append((1 - m) * -log_sigmoid(z) + m * math.exp(-z))
    close(losses.discopop_loss(t(0.2, -0.3), beta, tau), expected)
    # z = -200: the exponential term is 0 (e^200 · σ(-4000)), not NaN; the loss is the logistic one, 200.
    h = torch.tensor([-400.0], requires_grad=True)
    loss = losses.discopop_loss(h, beta, tau)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all()
    assert loss.item() == pytest.approx(200.0)


def test_length_desensitized_logps_hand_values():
    # chosen has 3 completion tokens (after one masked prompt position), rejected 2: the shared length is 2.
    chosen_tokens, chosen_mask = t(0.0, -1.0, -2.0, -4.0), t(0, 1, 1, 1)
    rejected_tokens, rejected_mask = t(-3.0, -5.0, 0.0, 0.0), t(1, 1, 0, 0)
    chosen, rejected = losses.length_desensitized_logps(
        chosen_tokens[None], chosen_mask[None], rejected_tokens[None], rejected_mask[None], alpha=0.25
    )
    close(chosen, [-1.0 - 2.0 + 0.25 * -4.0])
    close(rejected, [-3.0 - 5.0])
    full = losses.length_desensitized_logps(chosen_tokens[None], chosen_mask[None], rejected_tokens[None],
                                            rejected_mask[None], alpha=1.0)
    close(full[0], [-7.0])  # α = 1: plain sums


def test_wpo_weights_hand_values():
    token_logps = t(-1.0, -2.0, 0.0)[None]
    log_sum_sq = t(-0.5, -1.0, -9.0)[None]
    mask = t(1, 1, 0)[None]
    close(losses.wpo_weights(token_logps, log_sum_sq, mask), [math.exp(((-1.0 + 0.5) + (-2.0 + 1.0)) / 2)])


def test_dpo_loss_dispatches_every_type():
    """Each loss type reads the right inputs; the h-based ones take the f-divergence scores."""
    chosen, rejected = t(*R), t(0.2, 0.1)
    beta, eps, tau = 0.5, 0.1, 0.2
    lengths_c, lengths_r, margins, nll = t(2, 4), t(1, 1), t(1.0, -3.0), torch.tensor(2.5, dtype=torch.float64)
    kind = "js_divergence"
    sc, sr = losses.f_divergence_scores(chosen, kind), losses.f_divergence_scores(rejected, kind)
    expected = {
        "sigmoid": losses.dpo_sigmoid_loss(sc - sr, beta, eps),
        "hinge": losses.dpo_hinge_loss(sc - sr, beta),
        "ipo": losses.ipo_loss(sc, sr, lengths_c, lengths_r, beta),
        "exo_pair": losses.exo_pair_loss(sc - sr, beta, eps),
        "nca_pair": losses.nca_pair_loss(chosen, rejected, beta),
        "robust": losses.dpo_robust_loss(sc - sr, beta, eps),
        "bco_pair": losses.bco_pair_loss(chosen, rejected, beta),
        "sppo_hard": losses.sppo_hard_loss(chosen, rejected, beta),
        "aot": losses.aot_loss(chosen - rejected + margins, margins, beta, eps),
        "aot_unpaired": losses.aot_loss(chosen, rejected, beta, eps),
        "apo_zero": losses.apo_zero_loss(chosen, rejected, beta),
        "apo_down": losses.apo_down_loss(chosen, rejected, beta),
        "discopop": losses.discopop_loss(sc - sr, beta, tau),
        "sft": [2.5, 2.5],
        "sigmoid_norm": [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
                         for h in ((sc[0] / 2 - sr[0]).item(), (sc[1] / 4 - sr[1]).item())],
    }
    assert list(expected) == list(losses.DPO_LOSS_TYPES)
    for loss_type, value in expected.items():
        # The losses without an f-divergence form take the plain log-ratios.
        f_divergence = kind if loss_type in losses.F_DIVERGENCE_LOSS_TYPES else "reverse_kl"
        out = losses.dpo_loss(loss_type, chosen, rejected, beta=beta, label_smoothing=eps, chosen_lengths=lengths_c,
                              rejected_lengths=lengths_r, reference_margins=margins, chosen_nll=nll,
                              f_divergence_type=f_divergence, discopop_tau=tau)
        assert out.shape == (2,), loss_type
        close(out, value)
    with pytest.raises(ValueError, match="chosen_lengths"):
        losses.dpo_loss("sigmoid_norm", chosen, rejected, beta=beta)
    with pytest.raises(ValueError, match="f_divergence_type"):
        losses.dpo_loss("nca_pair", chosen, rejected, beta=beta, f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="Unknown DPO loss_type"):
        losses.dpo_loss("kto_pair", chosen, rejected, beta=beta)


def test_loss_types_are_trls():
    assert set(losses.DPO_LOSS_TYPES) == set(trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
                                             .split("Possible values are: ")[1].split(". If")[0]
                                             .replace("`", "").replace("'", "").replace(" ", "").split(","))


# ============================================================================================ first-step parity vs TRL

# (id, DPOConfig settings); β and ε chosen so that each loss is well away from 0 and its terms all matter.
LOSS_TYPE_CASES = [
    ("sigmoid", dict(loss_type="sigmoid")),
    ("hinge", dict(loss_type="hinge", beta=0.5)),
    ("ipo", dict(loss_type="ipo", beta=0.5)),
    ("exo_pair", dict(loss_type="exo_pair", beta=0.5, label_smoothing=0.1)),
    ("nca_pair", dict(loss_type="nca_pair", beta=0.5)),
    ("robust", dict(loss_type="robust", label_smoothing=0.1)),
    ("bco_pair", dict(loss_type="bco_pair", beta=0.5)),
    ("sppo_hard", dict(loss_type="sppo_hard", beta=0.5)),
    ("aot", dict(loss_type="aot", beta=0.5, label_smoothing=0.1)),
    ("aot_unpaired", dict(loss_type="aot_unpaired", beta=0.5, label_smoothing=0.1)),
    ("apo_zero", dict(loss_type="apo_zero", beta=0.5)),
    ("apo_down", dict(loss_type="apo_down", beta=0.5)),
    ("discopop", dict(loss_type="discopop", beta=0.5)),
    ("sft", dict(loss_type="sft")),
    ("sigmoid_norm", dict(loss_type="sigmoid_norm", beta=2.0)),
]
OPTION_CASES = [
    ("mpo-sigmoid+bco_pair+sft", dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])),
    *[(f"{kind}-{loss}", dict(loss_type=loss, beta=0.5, f_divergence_type=kind))
      for kind in ("forward_kl", "js_divergence", "alpha_divergence") for loss in ("sigmoid", "ipo")],
    ("alpha_divergence-0.3-hinge", dict(loss_type="hinge", beta=0.5, f_divergence_type="alpha_divergence",
                                        f_alpha_divergence_coef=0.3)),
    ("wpo-sigmoid", dict(loss_type="sigmoid", use_weighting=True)),
    # (TRL 1.16 fails on `sft` with `use_weighting`: it multiplies the expanded SFT loss in place.)
    ("wpo-apo_zero+bco_pair", dict(loss_type=["apo_zero", "bco_pair"], loss_weights=[1.0, 0.5], beta=0.5,
                                   use_weighting=True)),
    ("ld_alpha-0.5", dict(loss_type="sigmoid", ld_alpha=0.5)),
    ("ld_alpha-0-sft", dict(loss_type=["sigmoid", "sft"], ld_alpha=0.0)),
    ("discopop-tau-0.3", dict(loss_type="discopop", beta=0.5, discopop_tau=0.3)),
]


def first_steps(settings: dict, make_models, tiny_model_path, preference_data, tmp_path, kind="preference"):
    dataset = preference_data(kind, N_ROWS)
    trl_trainer, hf = _build_pair(make_models, tiny_model_path, dataset, _common_args(tmp_path, **settings))
    rows = list(range(N_ROWS))
    return _first_step(trl_trainer, rows), _first_step(hf, rows)


@pytest.mark.parametrize("settings", [s for _, s in LOSS_TYPE_CASES + OPTION_CASES],
                         ids=[i for i, _ in LOSS_TYPE_CASES + OPTION_CASES])
def test_first_step_matches_trl(settings, request, make_models, tiny_model_path, preference_data, tmp_path):
    label = request.node.callspec.id
    expected, actual = first_steps(settings, make_models, tiny_model_path, preference_data, tmp_path)
    _compare(expected, actual, label)
    MAX_REL_DIFF[label] = _rel(expected["loss"], actual["loss"])


@pytest.mark.parametrize("loss_type", ["aot", "discopop", "sigmoid_norm"])
def test_conversational_first_step_matches_trl(loss_type, make_models, tiny_model_path, preference_data, tmp_path):
    """A few loss types on chat-formatted pairs (other lengths, longer prompts)."""
    settings = dict(dict(LOSS_TYPE_CASES)[loss_type])
    expected, actual = first_steps(settings, make_models, tiny_model_path, preference_data, tmp_path,
                                   kind="preference_conversational")
    _compare(expected, actual, f"conversational/{loss_type}")
    MAX_REL_DIFF[f"conversational-{loss_type}"] = _rel(expected["loss"], actual["loss"])


def test_each_setting_changes_the_loss(make_models, tiny_model_path, preference_data, tmp_path):
    """Guards the parity tests against passing trivially: on the same batch, every loss type and every option above
    gives its own loss (no two cases coincide, none is the plain sigmoid loss), so a case wired to the wrong loss would
    differ from TRL's."""
    policy, reference = make_models()
    hf = hf_align.DPOTrainer(model=policy, ref_model=reference, args=hf_align.DPOConfig(**_common_args(tmp_path)),
                             train_dataset=preference_data("preference", N_ROWS),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_path))
    defaults = {name: getattr(hf.args, name) for name in ("loss_type", "loss_weights", "beta", "label_smoothing",
                                                         "f_divergence_type", "f_alpha_divergence_coef",
                                                         "use_weighting", "ld_alpha", "discopop_tau")}
    found = {}
    for label, settings in LOSS_TYPE_CASES + OPTION_CASES:
        for name, value in {**defaults, **settings}.items():
            setattr(hf.args, name, [value] if name == "loss_type" and isinstance(value, str) else value)
        found[label] = _first_step(hf, list(range(N_ROWS)))["loss"]
    rounded = {round(value, 5) for value in found.values()}
    assert len(rounded) == len(found), found


# ================================================================================ several steps of training vs TRL


def _perturbed_policy(tiny_model_path, policy_state):
    def make():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        model.load_state_dict(policy_state)
        return model

    return make


def _recorded_references(tiny_model_path) -> tuple[list, callable]:
    """`(made, make)`: `make()` loads a fresh reference (the unperturbed tiny model) and appends it to `made`."""
    made = []

    def make():
        made.append(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32))
        return made[-1]

    return made, make


def _loss_difference(theirs: list[dict], ours: list[dict]) -> float:
    return max(_rel(expected["loss"], actual["loss"]) for expected, actual in zip(theirs, ours))


def test_bco_pair_training_matches_trl(tiny_model_path, policy_state, embedded_data, preference_data, tmp_path):
    """TRL 1.16's `bco_pair` keeps no running reward mean: four optimizer steps log the same numbers."""
    _, reference = _recorded_references(tiny_model_path)
    theirs, ours = run_pair("DPO", _perturbed_policy(tiny_model_path, policy_state), tiny_model_path, embedded_data,
                            preference_data, tmp_path, ref_model=reference, loss_type="bco_pair", beta=0.5,
                            max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3)
    compare_logs(theirs, ours, 4, "bco_pair")
    MAX_REL_DIFF["bco_pair-4-steps"] = _loss_difference(theirs, ours)


def _parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in hf_align.models.unwrap_wrappers(model).named_parameters()}


@pytest.mark.parametrize("name", ["DPO", "KTO"])
def test_tr_dpo_training_matches_trl(name, tiny_model_path, policy_state, embedded_data, preference_data, tmp_path):
    """TR-DPO (α = 0.3, every 2 steps) for 5 steps: the same logs as TRL, and the reference moved, to TRL's (up to
    the optimizer's amplification of rounding differences: 1e-4 where the parameters moved by 0.1)."""
    made, reference = _recorded_references(tiny_model_path)
    start = _parameters(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32))
    theirs, ours = run_pair(name, _perturbed_policy(tiny_model_path, policy_state), tiny_model_path, embedded_data,
                            preference_data, tmp_path, ref_model=reference, max_steps=5, per_device_train_batch_size=4,
                            learning_rate=1e-2, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.3)
    compare_logs(theirs, ours, 5, f"TR-{name}")
    MAX_REL_DIFF[f"TR-{name}-5-steps"] = _loss_difference(theirs, ours)
    trl_reference, our_reference = (_parameters(model) for model in made)
    moved = max((our_reference[key] - value).abs().max().item() for key, value in start.items())
    assert moved > 5e-2, "the reference did not move"
    for key, value in trl_reference.items():
        torch.testing.assert_close(our_reference[key], value, rtol=0, atol=1e-3, msg=key)


def test_reference_update_is_the_mixture(tiny_model_path):
    """One update by hand: each reference parameter becomes α·policy + (1-α)·reference."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(1.0)
    before = _parameters(reference)

    ReferenceSync(SimpleNamespace(distributed_type=None), reference, alpha=0.25, every=3).update(policy)
    after, target = _parameters(reference), _parameters(policy)
    for key, value in before.items():
        torch.testing.assert_close(after[key], 0.25 * target[key] + 0.75 * value)


TR_DPO_RESUME = dict(per_device_train_batch_size=2, sync_ref_model=True, ref_model_sync_steps=1,
                     ref_model_mixup_alpha=0.5, learning_rate=1e-2)


@pytest.mark.parametrize("restore", [True, False], ids=["restored", "not-restored"])
def test_resumed_tr_dpo_goes_on_with_the_moved_reference(restore, build, tmp_path, monkeypatch):  # noqa: F811
    """A checkpoint holds the synced reference; resuming from it logs what the uninterrupted run logged. Without
    restoring it (the reference back at its start), the resumed run logs other numbers."""
    case = Case("DPOTrainer", "preference", TR_DPO_RESUME)
    uninterrupted = build(case, "uninterrupted")
    uninterrupted.train()
    checkpoint = tmp_path / "uninterrupted" / f"checkpoint-{CHECKPOINT}"
    assert (checkpoint / REFERENCE_STATE_NAME).exists()
    if not restore:
        monkeypatch.setattr(ReferenceSync, "load", lambda self, folder: None)
    resumed = build(case, "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    steps = range(CHECKPOINT + 1, STEPS + 1)
    if restore:
        assert_same_logs(step_logs(resumed), step_logs(uninterrupted), steps)
        assert_same_weights(resumed, uninterrupted)
        for key, value in _parameters(uninterrupted.ref_model).items():
            torch.testing.assert_close(_parameters(resumed.ref_model)[key], value, rtol=1e-5, atol=1e-7)
    else:
        with pytest.raises(AssertionError):
            assert_same_logs(step_logs(resumed), step_logs(uninterrupted), steps)


# ========================================================================================================= bad input


@pytest.mark.parametrize(("settings", "field"), [
    (dict(loss_type="kto_pair"), "loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
    (dict(f_divergence_type="kl"), "f_divergence_type"),
    (dict(loss_type=["sigmoid", "nca_pair"], f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(loss_type="exo_pair"), "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(sync_ref_model=True, precompute_ref_log_probs=True), "precompute_ref_log_probs"),
    (dict(sync_ref_model=True, ref_model_mixup_alpha=0.0), "ref_model_mixup_alpha"),
    (dict(sync_ref_model=True, ref_model_sync_steps=0), "ref_model_sync_steps"),
])
def test_bad_settings_raise_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        hf_align.DPOConfig(output_dir="unused", report_to="none", **settings)


def test_kto_and_spin_configs_check_the_sync_fields():
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        hf_align.KTOConfig(output_dir="unused", sync_ref_model=True, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="sync_ref_model"):
        hf_align.SPINConfig(output_dir="unused", sync_ref_model=True)
    config = hf_align.KTOConfig(output_dir="unused")
    assert (config.sync_ref_model, config.ref_model_mixup_alpha, config.ref_model_sync_steps) == (False, 0.6, 512)


@pytest.mark.parametrize("name", ["DPO", "KTO"])
def test_sync_with_peft_raises_as_trl(name, tiny_model_path, embedded_data, preference_data, tmp_path):
    dataset = preference_data("preference", 4) if name == "DPO" else embedded_data("unpaired_preference", 4)
    args = getattr(hf_align, f"{name}Config")(output_dir=str(tmp_path), report_to="none", sync_ref_model=True,
                                              per_device_train_batch_size=2)
    with pytest.raises(NotImplementedError, match="sync_ref_model=True is not supported with peft"):
        getattr(hf_align, f"{name}Trainer")(tiny_model_path, args=args, train_dataset=dataset,
                                            peft_config=LoraConfig(r=4, target_modules=["q_proj"]))


def test_sync_needs_a_reference_of_the_policys_shape(tiny_model_path, preference_data, tmp_path):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    config = policy.config.__class__(**{**policy.config.to_dict(), "num_hidden_layers": 1})
    args = hf_align.DPOConfig(output_dir=str(tmp_path), report_to="none", sync_ref_model=True)
    with pytest.raises(ValueError, match="same|exactly the policy's parameter"):
        hf_align.DPOTrainer(policy, ref_model=LlamaForCausalLM(config), args=args,
                            train_dataset=preference_data("preference", 4),
                            processing_class=AutoTokenizer.from_pretrained(tiny_model_path))


def test_report_max_rel_diff():
    """Prints the worst relative difference of the loss per case seen above (run with `-s` to see it)."""
    if MAX_REL_DIFF:
        print("[parity] max relative difference vs TRL:", {k: f"{v:.1e}" for k, v in MAX_REL_DIFF.items()})
    assert all(v <= REL for v in MAX_REL_DIFF.values())
