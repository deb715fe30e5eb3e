"""hf_align's DPO / IPO against TRL 1.16's `DPOTrainer`: same weights, same data, same explicit reference model.

Both trainers get the same perturbed policy weights (so the policy differs from the reference and the rewards are
non-zero) and a separate copy of the unperturbed weights as `ref_model`. The first rows of the dataset, in order, are
collated by each trainer's own `data_collator` and passed to `trainer.compute_loss(trainer.model, batch)` in train
mode; the loss and the metrics each trainer logs in `_metrics["train"]` must agree to 2e-3 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_align

trl = pytest.importorskip("trl")

REL = 2e-3
N_ROWS = 8
KINDS = ("preference", "preference_conversational")
# Keys that must match and must be clearly non-zero (so a relative comparison means something).
REQUIRED = ("loss", "rewards/margins", "rewards/chosen", "logps/chosen")
MAX_REL_DIFF: dict[str, float] = {}  # loss type -> worst relative difference seen over REQUIRED keys


def _common_args(tmp_path, **kwargs) -> dict:
    return dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=N_ROWS,
        **kwargs,
    )


@pytest.fixture(scope="module")
def policy_state(tiny_model_path):
    """The tiny model's weights plus fixed-seed Gaussian noise: a policy that differs from the reference."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.fixture
def make_models(tiny_model_path, policy_state):
    """`make_models() -> (policy, reference)`: fresh objects, never shared between trainers."""

    def make():
        policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        policy.load_state_dict(policy_state)
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        return policy, reference

    return make


def _build_pair(make_models, tiny_model_path, dataset, args: dict, hf_config=hf_align.DPOConfig,
                hf_trainer=hf_align.DPOTrainer, trl_args: dict | None = None):
    policy, reference = make_models()
    trl_trainer = trl.DPOTrainer(
        model=policy, ref_model=reference, args=trl.DPOConfig(**(trl_args or args)), train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_path),
    )
    policy, reference = make_models()
    hf = hf_trainer(
        model=policy, ref_model=reference, args=hf_config(**args), train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_path),
    )
    return trl_trainer, hf


def _first_step(trainer, rows: list[int]) -> dict[str, float]:
    """`compute_loss` on the collated `rows` of the trainer's own train dataset, in train mode: loss + metrics."""
    trainer.model.train()
    for values in trainer._metrics["train"].values():
        values.clear()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.compute_loss(trainer.model, batch)  # with autograd on, as in a training step
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items() if values}
    metrics["loss"] = loss.item()
    return metrics


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _compare(expected: dict, actual: dict, label: str) -> float:
    """Every metric both log must match to `REL` (an absolute 1e-6 floor for values that are ~0 in both); the
    REQUIRED ones must be present and non-negligible. Returns the worst relative difference over REQUIRED."""
    for key in REQUIRED:
        assert key in expected and key in actual, f"{label}: {key} missing"
        assert abs(expected[key]) > 1e-3, f"{label}: {key}={expected[key]} too close to 0 to compare"
    shared = sorted(set(expected) & set(actual))
    assert {"rewards/rejected", "rewards/accuracies", "logps/rejected", "entropy", "num_tokens"} <= set(shared)
    for key in shared:
        assert actual[key] == pytest.approx(expected[key], rel=REL, abs=1e-6), (
            f"{label}: {key} TRL={expected[key]!r} hf_align={actual[key]!r}"
        )
    diffs = {key: _rel(expected[key], actual[key]) for key in REQUIRED}
    print(f"[parity] {label}: " + ", ".join(f"{key} {diff:.1e}" for key, diff in diffs.items()))
    return max(diffs.values())


# ------------------------------------------------------------------------------------------------------ token ids


@pytest.mark.parametrize("kind", KINDS)
def test_token_ids_and_batches_match_trl(kind, preference_data, make_models, tiny_model_path, tmp_path):
    """`prepare_dataset` gives TRL's prompt/chosen/rejected ids for every row of both splits, and the collators
    give the same padded batch."""
    for split in ("train", "test"):
        dataset = preference_data(kind, split=split)
        trl_trainer, hf = _build_pair(make_models, tiny_model_path, dataset, _common_args(tmp_path))
        assert len(hf.train_dataset) == len(trl_trainer.train_dataset) == len(dataset)
        assert hf.dropped_rows["train"] == 0
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ours, theirs = hf.train_dataset[column], trl_trainer.train_dataset[column]
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert a == b, f"{kind}/{split} row {i} {column}: hf_align {a} != TRL {b}"
            assert all(len(ids) > 0 for ids in ours)
        rows = list(range(N_ROWS))
        ours = hf.data_collator([hf.train_dataset[i] for i in rows])
        theirs = trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in rows])
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(ours[key], theirs[key]), key


# -------------------------------------------------------------------------------------------- first-step metrics

LOSSES = [
    pytest.param("sigmoid", 0.0, 0.1, id="sigmoid"),
    pytest.param("ipo", 0.0, 0.5, id="ipo"),
    pytest.param("hinge", 0.0, 0.5, id="hinge"),
    pytest.param("robust", 0.1, 0.1, id="robust"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("loss_type", "label_smoothing", "beta"), LOSSES)
def test_first_step_matches_trl(kind, loss_type, label_smoothing, beta, preference_data, make_models,
                                tiny_model_path, tmp_path):
    dataset = preference_data(kind, N_ROWS)
    args = _common_args(tmp_path, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    trl_trainer, hf = _build_pair(make_models, tiny_model_path, dataset, args)
    rows = list(range(N_ROWS))
    expected, actual = _first_step(trl_trainer, rows), _first_step(hf, rows)
    # The reference is a separate object in both trainers and the policy really differs from it.
    assert hf.ref_model is not None and hf.ref_model is not hf.model
    assert abs(expected["rewards/margins"]) > 1e-2
    worst = _compare(expected, actual, f"{kind}/{loss_type}")
    MAX_REL_DIFF[loss_type] = max(MAX_REL_DIFF.get(loss_type, 0.0), worst)


def test_hinge_and_ipo_are_not_sigmoid(preference_data, make_models, tiny_model_path, tmp_path):
    """Guards the parity test above against trivially passing: the loss types really give different losses."""
    dataset = preference_data("preference", N_ROWS)
    policy, reference = make_models()
    hf = hf_align.DPOTrainer(
        model=policy, ref_model=reference, args=hf_align.DPOConfig(**_common_args(tmp_path)), train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_path),
    )
    losses = {}
    for loss_type in ("sigmoid", "hinge", "ipo"):
        hf.args.loss_type = [loss_type]
        losses[loss_type] = _first_step(hf, list(range(N_ROWS)))["loss"]
    assert len({round(v, 4) for v in losses.values()}) == 3, losses


# ----------------------------------------------------------------------------------------- cDPO label smoothing


@pytest.mark.parametrize("kind", KINDS)
def test_sigmoid_label_smoothing_is_cdpo(kind, preference_data, make_models, tiny_model_path, tmp_path):
    """TRL 1.16 ignores `label_smoothing` for `sigmoid`; hf_align applies cDPO on purpose:
    loss = mean_i[-(1-ε) log σ(β h_i) - ε log σ(-β h_i)], with β h_i read from TRL's per-pair `rewards/margins`."""
    eps, beta = 0.1, 0.1
    dataset = preference_data(kind, N_ROWS)
    args = _common_args(tmp_path, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    trl_trainer, hf = _build_pair(make_models, tiny_model_path, dataset, args)
    # One pair per TRL batch, so its logged mean margin is that pair's β·h.
    per_pair = [_first_step(trl_trainer, [i]) for i in range(N_ROWS)]
    margins = torch.tensor([m["rewards/margins"] for m in per_pair], dtype=torch.float64)
    # TRL's own loss is plain DPO: -log σ(β h), whatever ε.
    for metrics, margin in zip(per_pair, margins):
        assert metrics["loss"] == pytest.approx(-F.logsigmoid(margin).item(), rel=1e-4)
    expected_cdpo = (-(1 - eps) * F.logsigmoid(margins) - eps * F.logsigmoid(-margins)).mean().item()
    expected_h = margins / beta
    ours = _first_step(hf, list(range(N_ROWS)))
    assert ours["loss"] == pytest.approx(expected_cdpo, rel=REL)
    assert ours["rewards/margins"] == pytest.approx(expected_h.mean().item() * beta, rel=REL)
    assert ours["logps/chosen"] == pytest.approx(sum(m["logps/chosen"] for m in per_pair) / N_ROWS, rel=REL)
    # ε really changes the loss (plain DPO on the same pairs differs).
    plain = (-F.logsigmoid(margins)).mean().item()
    assert abs(ours["loss"] - plain) > 1e-3
    print(f"[parity] {kind}/cdpo: rel diff {_rel(ours['loss'], expected_cdpo):.2e}")


# ---------------------------------------------------------------------------------------------------------- IPO


def test_ipo_config_defaults():
    config = hf_align.IPOConfig(output_dir="unused", report_to="none")
    assert config.loss_type == ["ipo"] and config.beta == 0.5
    assert issubclass(hf_align.IPOTrainer, hf_align.DPOTrainer)


@pytest.mark.parametrize("kind", KINDS)
def test_ipo_trainer_matches_trl_ipo(kind, preference_data, make_models, tiny_model_path, tmp_path):
    beta = 0.3
    dataset = preference_data(kind, N_ROWS)
    hf_args = _common_args(tmp_path, beta=beta)  # IPOConfig's own loss_type default: "ipo"
    trl_args = _common_args(tmp_path, beta=beta, loss_type="ipo")
    trl_trainer, hf = _build_pair(
        make_models, tiny_model_path, dataset, hf_args, hf_config=hf_align.IPOConfig, hf_trainer=hf_align.IPOTrainer,
        trl_args=trl_args,
    )
    assert hf.args.loss_type == ["ipo"]
    rows = list(range(N_ROWS))
    expected, actual = _first_step(trl_trainer, rows), _first_step(hf, rows)
    worst = _compare(expected, actual, f"{kind}/IPOTrainer")
    MAX_REL_DIFF["IPOTrainer"] = max(MAX_REL_DIFF.get("IPOTrainer", 0.0), worst)


def test_report_max_rel_diff():
    """Prints the worst relative difference per loss type seen above (run with `-s` to see it)."""
    if MAX_REL_DIFF:
        print("[parity] max relative difference vs TRL:", {k: f"{v:.2e}" for k, v in MAX_REL_DIFF.items()})
    assert all(v <= REL for v in MAX_REL_DIFF.values())
