"""Guards every trainer shares (through `AlignTrainer`): a NaN/inf loss or gradient stops training with an error naming
the global step and the quantity, or with `nonfinite_steps="skip"` leaves that optimizer step's parameters unchanged;
NaN and None rewards are left out as TRL 1.16 leaves them out; a dataset with no row left is an error, not a
zero-step run.

NaN is injected into chosen micro-batches (counted from 1 over training) of real runs of the tiny model: a NaN loss,
or a finite loss whose backward pass gives one parameter a NaN gradient."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from hf_align import (
    DataError,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    OnlineDPOConfig,
    OnlineDPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
    SPINConfig,
    SPINTrainer,
    StepDPOConfig,
    StepDPOTrainer,
    TRPOConfig,
    TRPOTrainer,
    losses,
    models,
)
from hf_align.rewards import RewardScorer

NAN = float("nan")
POISONED_PARAMETER = "model.layers.1.mlp.down_proj.weight"
QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
ONLINE = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=4)


class NaNGradient(torch.autograd.Function):
    """0 in the forward pass; a NaN gradient for its input in the backward pass."""

    @staticmethod
    def forward(ctx, weight):
        ctx.shape = weight.shape
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return grad.new_full(ctx.shape, NAN)


def poisoned(trainer_class, poison: dict[int, str]):
    """`trainer_class` whose training micro-batches numbered in `poison` (from 1) get a NaN loss ("loss") or a finite
    loss whose backward pass gives `POISONED_PARAMETER` a NaN gradient ("gradient")."""

    class Poisoned(trainer_class):
        micro_batches = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
            if not model.training:
                return loss
            self.micro_batches += 1
            kind = poison.get(self.micro_batches)
            if kind == "loss":
                return loss * NAN
            if kind == "gradient":
                weight = dict(models.unwrap_causal_lm(model).named_parameters())[POISONED_PARAMETER]
                return loss + NaNGradient.apply(weight)
            return loss

    return Poisoned


class ParameterChanges(TrainerCallback):
    """`changed[global step]`: whether that optimizer step changed any parameter."""

    def __init__(self):
        self.changed: dict[int, bool] = {}
        self.before: list[torch.Tensor] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.changed[state.global_step] = any(not torch.equal(a, p) for a, p in zip(self.before, model.parameters()))


def constant_reward(completions, **kwargs):
    return [float(len(str(c)) % 3) for c in completions]


# --------------------------------------------------------------------------------------------- non-finite: error


def _sft(tiny_model_path, embedded_data, tmp_path, poison, **config):
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-3, **{**QUIET, **config})
    return poisoned(SFTTrainer, poison)(tiny_model_path, args=args, train_dataset=embedded_data("sft", 32))


def test_nan_loss_under_gradient_accumulation_names_step_and_micro_batch(tiny_model_path, embedded_data, tmp_path):
    # Micro-batch 3 is the first of global step 2 (2 micro-batches per step).
    trainer = _sft(tiny_model_path, embedded_data, tmp_path, {3: "loss"}, max_steps=4, gradient_accumulation_steps=2)
    with pytest.raises(FloatingPointError, match=r"global step 2: the loss is nan \(micro-batch 1 of 2\)"):
        trainer.train()
    assert trainer.state.global_step == 1


def test_nan_gradient_with_a_finite_loss_names_the_parameter(tiny_model_path, embedded_data, tmp_path):
    # The gradient is checked before clipping (max_grad_norm=1 by default), which would spread the NaN everywhere.
    # Micro-batch 6 is the second of global step 3.
    trainer = _sft(tiny_model_path, embedded_data, tmp_path, {6: "gradient"}, max_steps=4,
                   gradient_accumulation_steps=2)
    message = rf"global step 3: the gradient norm is nan \(first in parameter '{POISONED_PARAMETER}'\)"
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()


def test_infinite_loss_stops_training(tiny_model_path, embedded_data, tmp_path):
    class InfiniteLoss(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch) * float("inf")

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, **QUIET)
    trainer = InfiniteLoss(tiny_model_path, args=args, train_dataset=embedded_data("sft", 8))
    with pytest.raises(FloatingPointError, match=r"global step 1: the loss is inf"):
        trainer.train()


@pytest.mark.parametrize("kind", ["dpo", "reward", "kto", "grpo"])
def test_every_kind_of_trainer_stops_on_a_nan_loss(kind, tiny_model_path, tiny_seqcls_path, preference_data,
                                                   embedded_data, tmp_path):
    common = dict(output_dir=str(tmp_path), max_steps=3, **QUIET)
    trainer_class, args, model, dataset, extra = {
        "dpo": lambda: (DPOTrainer, DPOConfig(per_device_train_batch_size=2, **common), tiny_model_path,
                        preference_data("preference", 8), {}),
        "reward": lambda: (RewardTrainer, RewardConfig(per_device_train_batch_size=2, **common), tiny_seqcls_path,
                           preference_data("preference", 8), {}),
        "kto": lambda: (KTOTrainer, KTOConfig(per_device_train_batch_size=4, **common), tiny_model_path,
                        embedded_data("unpaired_preference", 16), {}),
        # An online trainer: OnlineTrainer.training_step wraps AlignTrainer's.
        "grpo": lambda: (GRPOTrainer, GRPOConfig(**ONLINE, **common), tiny_model_path, embedded_data("prompts", 8),
                         {"reward_funcs": constant_reward}),
    }[kind]()
    trainer = poisoned(trainer_class, {2: "loss"})(model, args=args, train_dataset=dataset, **extra)
    with pytest.raises(FloatingPointError, match=r"global step 2: the loss is nan \(micro-batch 1 of 1\)"):
        trainer.train()


def test_trpo_own_training_step_is_guarded(tiny_model_path, embedded_data, tmp_path):
    """TRPO replaces `training_step` (trust-region step, then the critic's gradient step) and calls the guard itself."""

    class NaNCriticLoss(TRPOTrainer):
        def critic_step(self, model, rollout):
            return super().critic_step(model, rollout) * NAN

    args = TRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                      max_completion_length=4, **QUIET)
    trainer = NaNCriticLoss(tiny_model_path, constant_reward, args=args, train_dataset=embedded_data("prompts", 8))
    with pytest.raises(FloatingPointError, match=r"global step 1: the loss is nan"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- non-finite: skip


def test_skip_leaves_parameters_and_optimizer_state_unchanged_counts_and_logs(
    tiny_model_path, embedded_data, tmp_path, caplog
):
    # Step 2's first micro-batch has a NaN loss; step 4's second a NaN gradient (finite loss).
    trainer = _sft(tiny_model_path, embedded_data, tmp_path, {3: "loss", 8: "gradient"}, max_steps=5,
                   gradient_accumulation_steps=2, nonfinite_steps="skip")
    changes = ParameterChanges()
    trainer.add_callback(changes)
    with caplog.at_level(logging.WARNING, logger="hf_align.trainer"):
        trainer.train()

    assert trainer.skipped_steps == [2, 4]
    assert changes.changed == {1: True, 2: False, 3: True, 4: False, 5: True}
    # AdamW took 3 steps: the skipped ones moved no moment and no step count (and applied no weight decay).
    weight = dict(trainer.model.named_parameters())[POISONED_PARAMETER]
    assert trainer.optimizer.state[weight]["step"].item() == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = [entry["skipped_steps"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [0, 1, 1, 2, 2]
    assert "Skipped optimizer step 2: the loss is nan (micro-batch 1 of 2)" in caplog.text
    assert f"Skipped optimizer step 4: the gradient norm is nan (first in parameter '{POISONED_PARAMETER}')" \
        in caplog.text


def test_skip_works_for_an_online_trainer(tiny_model_path, embedded_data, tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=3, nonfinite_steps="skip", **ONLINE, **QUIET)
    trainer = poisoned(GRPOTrainer, {2: "gradient"})(tiny_model_path, constant_reward, args=args,
                                                      train_dataset=embedded_data("prompts", 8))
    changes = ParameterChanges()
    trainer.add_callback(changes)
    trainer.train()
    assert trainer.skipped_steps == [2] and changes.changed[2] is False and trainer.state.global_step == 3


def test_nonfinite_steps_must_be_error_or_skip(tmp_path):
    with pytest.raises(ValueError, match="nonfinite_steps must be one of"):
        SFTConfig(output_dir=str(tmp_path), nonfinite_steps="ignore", report_to="none")


# ------------------------------------------------------------------------------------------- NaN / None rewards


def test_nan_and_none_rewards_do_not_apply_and_a_sample_none_applies_to_warns(caplog):
    def nan_reward(completions, **kwargs):
        return [NAN, 1.0, NAN, None]

    def none_reward(completions, **kwargs):
        return [3.0, None, NAN, None]

    scorer = RewardScorer([nan_reward, none_reward], reward_weights=[1.0, 0.5])
    prompts = ["p0", "p1", "p2", "p3"]
    with caplog.at_level(logging.WARNING, logger="hf_align.rewards"):
        per_func = scorer.score(prompts, ["a", "b", "c", "d"], [[0]] * 4)
    assert torch.isnan(per_func).tolist() == [[True, False], [False, True], [True, True], [True, True]]
    # TRL 1.16: a weighted nansum over the functions that applied; NaN when none did.
    combined = scorer.combine(per_func)
    assert combined[:2].tolist() == [1.5, 1.0] and torch.isnan(combined[2:]).all()
    assert "Every reward function returned None or NaN for sample 2" in caplog.text and "'p2'" in caplog.text
    metrics = scorer.metrics(per_func)
    assert metrics["rewards/nan_reward/mean"] == 1.0 and math.isnan(metrics["rewards/nan_reward/std"])
    assert metrics["rewards/none_reward/mean"] == 3.0
    # Unscored samples get advantage 0 and are left out of their group's statistics.
    advantages = losses.group_relative_advantages(combined, group_size=2)
    assert advantages[:2].tolist() == pytest.approx([0.7071, -0.7071], abs=1e-3)
    assert advantages[2:].tolist() == [0.0, 0.0]


def test_infinite_reward_names_function_and_sample():
    def exploding(completions, **kwargs):
        return [1.0, float("-inf")]

    with pytest.raises(ValueError, match=r"'exploding' returned -inf for sample 1 \(prompt: 'q'\)"):
        RewardScorer(exploding).score(["p", "q"], ["a", "b"], [[0], [0]])


def test_grpo_trains_with_nan_and_none_rewards_without_a_nonfinite_step(tiny_model_path, embedded_data, tmp_path,
                                                                         caplog):
    def sometimes(completions, **kwargs):
        return [NAN if i % 3 == 0 else None if i % 3 == 1 else float(len(str(c)) % 5)
                for i, c in enumerate(completions)]

    def never(completions, **kwargs):
        return [None] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, **ONLINE, **QUIET)
    trainer = GRPOTrainer(tiny_model_path, [sometimes, never], args=args, train_dataset=embedded_data("prompts", 8))
    with caplog.at_level(logging.WARNING, logger="hf_align.rewards"):
        trainer.train()  # nonfinite_steps="error": a NaN reward reaching the loss would raise
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) and math.isfinite(entry["reward"]) for entry in logs)
    assert "Every reward function returned None or NaN" in caplog.text


# ------------------------------------------------------------------------------------------------ empty datasets

EMPTY = {
    "sft": (SFTTrainer, SFTConfig, ["prompt", "completion"], {}),
    "reward": (RewardTrainer, RewardConfig, ["chosen", "rejected"], {}),
    "dpo": (DPOTrainer, DPOConfig, ["prompt", "chosen", "rejected"], {}),
    "kto": (KTOTrainer, KTOConfig, ["prompt", "completion", "label"], {}),
    "step_dpo": (StepDPOTrainer, StepDPOConfig, ["prompt", "initial_reason_steps", "chosen", "rejected"], {}),
    "spin": (SPINTrainer, SPINConfig, ["prompt", "completion"], {}),
    "grpo": (GRPOTrainer, GRPOConfig, ["prompt"], {"reward_funcs": constant_reward}),
    "online_dpo": (OnlineDPOTrainer, OnlineDPOConfig, ["prompt"], {"reward_funcs": constant_reward}),
    "ppo": (PPOTrainer, PPOConfig, ["prompt"], {"reward_funcs": constant_reward}),
}


@pytest.mark.parametrize("kind", list(EMPTY))
def test_a_dataset_with_no_rows_is_an_error(kind, tiny_model_path, tiny_seqcls_path, tmp_path):
    trainer_class, config_class, columns, extra = EMPTY[kind]
    model = tiny_seqcls_path if kind == "reward" else tiny_model_path
    online = dict(per_device_train_batch_size=2, num_generations=2) if "reward_funcs" in extra else {}
    args = config_class(output_dir=str(tmp_path), max_steps=1, **online, **QUIET)
    with pytest.raises(DataError, match="The train dataset has no rows"):
        trainer_class(model, args=args, train_dataset=Dataset.from_dict({c: [] for c in columns}), **extra)


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo", "kto", "step_dpo"])
def test_a_dataset_filtered_to_no_rows_is_an_error(kind, tiny_model_path, tiny_seqcls_path, preference_data,
                                                   embedded_data, tmp_path):
    trainer_class, config_class, _, _ = EMPTY[kind]
    model = tiny_seqcls_path if kind == "reward" else tiny_model_path
    dataset = {"sft": lambda: embedded_data("sft", 8), "reward": lambda: preference_data("preference", 8),
               "dpo": lambda: preference_data("preference", 8), "kto": lambda: embedded_data("unpaired_preference", 8),
               "step_dpo": lambda: embedded_data("step_preference", 8)}[kind]()
    args = config_class(output_dir=str(tmp_path), max_steps=1, max_length=2, **QUIET)
    with pytest.raises(DataError, match="train dataset"):
        trainer_class(model, args=args, train_dataset=dataset)


def test_any_prepare_dataset_that_leaves_no_row_is_an_error(tiny_model_path, embedded_data, tmp_path):
    class FiltersEverything(GRPOTrainer):
        def prepare_dataset(self, dataset, name, args):
            return super().prepare_dataset(dataset, name, args).filter(lambda row: False)

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, **ONLINE, **QUIET)
    with pytest.raises(DataError, match="No row of the train dataset is left"):
        FiltersEverything(tiny_model_path, constant_reward, args=args, train_dataset=embedded_data("prompts", 8))


def test_an_empty_eval_dataset_is_an_error(tiny_model_path, preference_data, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, **QUIET)
    empty = preference_data("preference", 8).select([])
    with pytest.raises(DataError, match="The eval_held_out dataset has no rows"):
        DPOTrainer(tiny_model_path, args=args, train_dataset=preference_data("preference", 8),
                   eval_dataset={"held_out": empty})
    trainer = DPOTrainer(tiny_model_path, args=args, train_dataset=preference_data("preference", 8))
    with pytest.raises(DataError, match="The eval dataset has no rows"):
        trainer.evaluate(empty)
