"""Resuming from a checkpoint, for every trainer: a fresh trainer given `train(resume_from_checkpoint=...)` at the
checkpoint of step K logs the same losses and metrics after step K, and ends with the same weights (the PPO / TRPO
critic included), as the run that saved the checkpoint and went on (same seed: the online trainers sample from the
restored RNG state). Covered besides: reference log-probs precomputed before training, a checkpoint inside a
buffered generation batch, a run resumed in a later epoch (the prompt order of that epoch), PPO's adaptive β and
separate critic, SPIN resumed inside its first and its second round, and a run that really crashed after saving."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

import hf_align
from hf_align import SPINConfig, SPINTrainer, models

STEPS, CHECKPOINT = 4, 2
COMMON = dict(max_steps=STEPS, save_strategy="steps", save_steps=CHECKPOINT, logging_steps=1, learning_rate=1e-3,
              report_to="none", disable_tqdm=True, seed=0)
OFFLINE = dict(per_device_train_batch_size=2)
ONLINE = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=4, beta=0.1)
ONLINE_DPO = dict(per_device_train_batch_size=4, max_new_tokens=4, max_length=64)
PPO = dict(ONLINE, num_generations=1)


def distinct_tokens(completion_ids, **kwargs) -> list[float]:
    return [float(len(set(ids))) for ids in completion_ids]


@dataclass
class Case:
    trainer: str  # class name in hf_align
    dataset: str  # embedded dataset
    config: dict = field(default_factory=dict)
    rows: int = 8  # the dataset's first rows
    reward_model: bool = False  # the model trained is the one-label sequence classifier
    online: bool = False  # takes `reward_funcs`
    separate_critic: bool = False  # `value_model`: the sequence classifier


CASES = {
    "sft": Case("SFTTrainer", "sft", OFFLINE),
    "reward": Case("RewardTrainer", "preference", OFFLINE, reward_model=True),
    "dpo": Case("DPOTrainer", "preference", OFFLINE),
    # 2 steps per epoch: steps 3 and 4 are the second epoch, in the order the uninterrupted run drew for it.
    "dpo-second-epoch": Case("DPOTrainer", "preference", OFFLINE, rows=4),
    "dpo-precomputed-reference": Case("DPOTrainer", "preference", dict(OFFLINE, precompute_ref_log_probs=True)),
    "ipo": Case("IPOTrainer", "preference", OFFLINE),
    "kto": Case("KTOTrainer", "unpaired_preference", OFFLINE),
    "orpo": Case("ORPOTrainer", "preference", OFFLINE),
    "simpo": Case("SimPOTrainer", "preference", OFFLINE),
    "step_dpo": Case("StepDPOTrainer", "step_preference", OFFLINE),
    "gdpo-distributional": Case("DistributionalGDPOTrainer", "belief_preference", OFFLINE),
    "grpo": Case("GRPOTrainer", "prompts", ONLINE, online=True),
    # 4 micro-batches per generation batch: the checkpoint after the second falls inside it.
    "grpo-inside-generation-batch": Case("GRPOTrainer", "prompts",
                                         dict(ONLINE, per_device_train_batch_size=2, steps_per_generation=4),
                                         online=True),
    "rloo": Case("RLOOTrainer", "prompts", ONLINE, online=True),
    "remax": Case("ReMaxTrainer", "prompts", ONLINE, online=True),
    "reinforce": Case("ReinforceTrainer", "prompts", ONLINE, online=True),
    "reinforce_pp": Case("ReinforcePPTrainer", "prompts", ONLINE, online=True),
    "gdpo-decoupled": Case("GDPOTrainer", "prompts", ONLINE, online=True),
    "online_dpo": Case("OnlineDPOTrainer", "prompts", ONLINE_DPO, online=True),
    "online_dpo-inside-generation-batch": Case("OnlineDPOTrainer", "prompts", dict(ONLINE_DPO, steps_per_generation=4),
                                               online=True),
    # Two PPO epochs per rollout; the value head trains with the policy.
    "ppo": Case("PPOTrainer", "prompts", dict(PPO, num_iterations=2), online=True),
    # A rollout every step: β, adapted after each, weighs the KL in the next.
    "ppo-adaptive-kl": Case("PPOTrainer", "prompts", dict(PPO, num_iterations=1, adaptive_kl=True, target_kl=0.01,
                                                        kl_horizon=10),
                            online=True),
    # 4 PPO epochs (the default) per rollout: the checkpoint falls inside one.
    "ppo-separate-critic": Case("PPOTrainer", "prompts", PPO, online=True, separate_critic=True),
    # 2 rollouts per epoch: steps 3 and 4 are the second epoch, whose prompt order the resumed run draws too.
    "trpo": Case("TRPOTrainer", "prompts", dict(PPO, beta=0.0), online=True),
}


class Interrupted(Exception):
    pass


class InterruptAfterSaving(TrainerCallback):
    """Stops the run as a crash would, once the checkpoint folder `checkpoint` has been written."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint

    def on_save(self, args, state, control, **kwargs):
        if self.checkpoint.exists():
            raise Interrupted


@pytest.fixture
def build(tiny_model_path, tiny_seqcls_path, embedded_data, tmp_path):
    def make(case: Case, folder: str, callbacks=()):
        trainer_cls = getattr(hf_align, case.trainer)
        args = trainer_cls.config_class(output_dir=str(tmp_path / folder), **{**COMMON, **case.config})
        kwargs = {"reward_funcs": distinct_tokens} if case.online else {}
        if case.separate_critic:
            kwargs["value_model"] = tiny_seqcls_path
        return trainer_cls(tiny_seqcls_path if case.reward_model else tiny_model_path, args=args,
                           train_dataset=embedded_data(case.dataset, case.rows), callbacks=list(callbacks), **kwargs)

    return make


def step_logs(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


def assert_same_logs(got: dict, expected: dict, steps) -> None:
    for step in steps:
        assert got[step].keys() == expected[step].keys(), step
        for key, value in expected[step].items():
            assert math.isclose(got[step][key], value, rel_tol=1e-5, abs_tol=1e-7), (step, key, got[step][key], value)


def assert_same_weights(resumed, uninterrupted) -> None:
    got, expected = (models.unwrap_wrappers(t.model).state_dict() for t in (resumed, uninterrupted))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_run_continues_the_uninterrupted_one(name, build, tmp_path):
    # The checkpoint the uninterrupted run writes at step K is the one a run stopped there leaves (the last test).
    case = CASES[name]
    uninterrupted = build(case, "uninterrupted")
    uninterrupted.train()
    resumed = build(case, "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "uninterrupted" / f"checkpoint-{CHECKPOINT}"))

    expected, got = step_logs(uninterrupted), step_logs(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    assert_same_logs(got, expected, range(CHECKPOINT + 1, STEPS + 1))
    assert_same_weights(resumed, uninterrupted)


def test_without_the_restored_rng_the_sampling_differs(build, tmp_path, monkeypatch):
    """The comparison above sees the sampling RNG: with Trainer's RNG state left unrestored, the resumed GRPO run
    samples other completions and logs other numbers."""
    case = CASES["grpo"]
    uninterrupted = build(case, "uninterrupted")
    uninterrupted.train()
    monkeypatch.setattr(Trainer, "_load_rng_state", lambda self, checkpoint: None)
    resumed = build(case, "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "uninterrupted" / f"checkpoint-{CHECKPOINT}"))
    with pytest.raises(AssertionError):
        assert_same_logs(step_logs(resumed), step_logs(uninterrupted), range(CHECKPOINT + 1, STEPS + 1))


@pytest.mark.parametrize("round_index, step", [(0, 1), (0, 2), (1, 1)], ids=["round-0-middle", "round-0-end",
                                                                             "round-1-middle"])
def test_spin_resumed_in_a_round_goes_on_with_its_pairs_and_the_later_rounds(round_index, step, tiny_model_path,
                                                                              embedded_data, tmp_path):
    def spin(folder: str, callbacks=()) -> SPINTrainer:
        args = SPINConfig(output_dir=str(tmp_path / folder), **{**COMMON, "max_steps": 2, "save_steps": 1},
                          num_rounds=2, max_new_tokens=6, temperature=1.0, per_device_train_batch_size=4)
        return SPINTrainer(tiny_model_path, args=args, train_dataset=embedded_data("sft", 8),
                           eval_dataset=embedded_data("sft", 4, split="test"), callbacks=list(callbacks))

    uninterrupted = spin("uninterrupted")
    uninterrupted.train()
    checkpoint = tmp_path / "crashed" / f"round-{round_index}" / f"checkpoint-{step}"
    with pytest.raises(Interrupted):
        spin("crashed", [InterruptAfterSaving(checkpoint)]).train()
    if round_index == 1:  # a later save killed half-way (no state files yet) is skipped
        partial = checkpoint.with_name(f"checkpoint-{step + 1}")
        partial.mkdir()
        (partial / "config.json").write_text("{}")
    resumed = spin("crashed")
    resumed.train(resume_from_checkpoint=True)  # the last complete checkpoint of the last round that saved one

    expected, got = step_logs(uninterrupted), step_logs(resumed)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    assert_same_logs(got, expected, range(2 * round_index + step + 1, 5))
    assert len(resumed.round_history) == 2
    for got_round, expected_round in zip(resumed.round_history, uninterrupted.round_history):
        # A resumed round's `train_loss` averages the steps trained after resuming (Trainer's convention).
        resumed_round = got_round["round"] == round_index
        for key, value in expected_round.items():
            if not (resumed_round and key == "train_loss"):
                assert math.isclose(got_round[key], value, rel_tol=1e-5), (got_round["round"], key)
    assert resumed.round_pairs["train"]["rejected"] == uninterrupted.round_pairs["train"]["rejected"]
    assert math.isclose(resumed.evaluate()["eval_loss"], uninterrupted.evaluate()["eval_loss"], rel_tol=1e-5)
    assert_same_weights(resumed, uninterrupted)


def test_a_run_that_crashed_after_saving_resumes_exactly(build, tmp_path):
    case = CASES["grpo-inside-generation-batch"]
    uninterrupted = build(case, "uninterrupted")
    uninterrupted.train()
    with pytest.raises(Interrupted):
        build(case, "crashed", [InterruptAfterSaving(tmp_path / "crashed" / f"checkpoint-{CHECKPOINT}")]).train()
    resumed = build(case, "crashed")
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint in output_dir
    assert_same_logs(step_logs(resumed), step_logs(uninterrupted), range(CHECKPOINT + 1, STEPS + 1))
    assert_same_weights(resumed, uninterrupted)
