"""The online loop's stages (`OnlineTrainer.make_rollout`): for every online trainer, a generation batch goes through
sample → score → estimate once each, in that order, and then the update (`compute_loss`) runs once per micro-batch;
each stage takes a `Rollout` (or the rows, for sampling) and returns one."""

from __future__ import annotations

import pytest

from hf_align import (GRPOConfig, GRPOTrainer, OnlineDPOConfig, OnlineDPOTrainer, PPOConfig, PPOTrainer, ReMaxConfig,
                      ReMaxTrainer, RLOOConfig, RLOOTrainer, TRPOConfig, TRPOTrainer)
from hf_align.rollout import Rollout

QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, bf16=False, logging_steps=1, max_steps=2,
             max_completion_length=4, learning_rate=1e-3, seed=0)


def length_reward(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


TRAINERS = {
    "GRPO": (GRPOTrainer, GRPOConfig, dict(num_generations=2, per_device_train_batch_size=4,
                                           gradient_accumulation_steps=2)),
    "RLOO": (RLOOTrainer, RLOOConfig, dict(num_generations=2, per_device_train_batch_size=4, beta=0.1)),
    "ReMax": (ReMaxTrainer, ReMaxConfig, dict(num_generations=1, per_device_train_batch_size=2)),
    "PPO": (PPOTrainer, PPOConfig, dict(per_device_train_batch_size=2, num_iterations=2)),
    "TRPO": (TRPOTrainer, TRPOConfig, dict(per_device_train_batch_size=2)),
    "OnlineDPO": (OnlineDPOTrainer, OnlineDPOConfig, dict(per_device_train_batch_size=2, max_new_tokens=4)),
}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_each_generation_batch_visits_each_stage_once_in_order(name, tiny_model_path, embedded_data,
                                                               fixed_completions, tmp_path):
    fixed_completions(lambda prompt_ids, row, tokenizer, model: [40 + row % 3] * (1 + row % 3))
    trainer_class, config_class, options = TRAINERS[name]
    settings = {**QUIET, **options}
    if name == "OnlineDPO":
        settings.pop("max_completion_length")
    args = config_class(output_dir=str(tmp_path), **settings)
    trainer = trainer_class(tiny_model_path, reward_funcs=length_reward, args=args,
                            train_dataset=embedded_data("prompts", 8))
    calls = []

    def recorded(stage, method):
        def run(argument, *rest, **kwargs):
            calls.append(stage)
            output = method(argument, *rest, **kwargs)
            if stage != "compute_loss":
                assert isinstance(output, Rollout), f"{stage} returned {type(output).__name__}"
                assert stage == "sample" or isinstance(argument, Rollout), f"{stage} took {type(argument).__name__}"
            return output
        return run

    for stage in ("sample", "score", "estimate"):
        setattr(trainer, stage, recorded(stage, getattr(trainer, stage)))
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, *a, **k: recorded("compute_loss", lambda i: compute_loss(
        model, i, *a, **k))(inputs)
    trainer.train()

    batches = []
    for stage in calls:
        if stage == "sample":
            batches.append([])
        batches[-1].append(stage)
    assert batches, "no generation batch was sampled"
    for batch in batches:
        assert batch[:3] == ["sample", "score", "estimate"], batch
        assert set(batch[3:]) <= {"compute_loss"}
    if name != "TRPO":  # TRPO's update is its trust-region step, not the Trainer's loss
        assert sum(batch.count("compute_loss") for batch in batches) >= trainer.state.global_step
