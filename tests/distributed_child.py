"""Trains hf_align trainers for a few steps in whatever `accelerate launch` set up (DeepSpeed ZeRO, DDP, or nothing),
and writes each run's logs to JSON: the child process of `tests/test_deepspeed.py`.

    accelerate launch --config_file zero2.yaml tests/distributed_child.py OUT_DIR MODEL SEQCLS RUN [RUN ...]

Each RUN (a key of `RUNS`) writes `OUT_DIR/RUN.json`: `{"logs": [...loss entries...], "ref": <type of the reference
module>, "weights_moved": bool}`. The online runs with fixed completions give every row of a generation batch tokens
fixed by its prompt (no sampling), so runs under different backends can be compared step by step.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import hf_align  # noqa: E402
import hf_align.rollout  # noqa: E402
from hf_align import models  # noqa: E402
from hf_align.data import pad  # noqa: E402
from hf_align.defaults import load_default_dataset  # noqa: E402
from hf_align.generation import Completions, encode_prompts  # noqa: E402

try:
    from deepspeed import zero as deepspeed_zero
except ImportError:  # the run without DeepSpeed does not need it
    deepspeed_zero = None
RealGatheredParameters = deepspeed_zero.GatheredParameters if deepspeed_zero else None

STEPS = 4
COMMON = dict(max_steps=STEPS, logging_steps=1, learning_rate=5e-3, report_to="none", disable_tqdm=True, seed=0,
              save_strategy="no", bf16=False)
ONLINE = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=6, beta=0.1)

# name: (trainer class, embedded dataset, rows, config, reward: "function" / "model" / None, fixed completions)
RUNS = {
    "dpo": ("DPOTrainer", "preference", 16, dict(per_device_train_batch_size=4), None, False),
    "kto": ("KTOTrainer", "unpaired_preference", 16, dict(per_device_train_batch_size=4), None, False),
    "sft": ("SFTTrainer", "sft", 16, dict(per_device_train_batch_size=4), None, False),
    "reward": ("RewardTrainer", "preference", 16, dict(per_device_train_batch_size=4), None, False),
    "grpo": ("GRPOTrainer", "prompts", 16, ONLINE, "model", False),
    "grpo-fixed": ("GRPOTrainer", "prompts", 16, dict(ONLINE, num_iterations=2), "function", True),
    # ZeRO-3's hooks gather each layer as generation runs it, instead of the whole policy at once
    "grpo-nogather": ("GRPOTrainer", "prompts", 16, dict(ONLINE, ds3_gather_for_generation=False), "function", False),
    "rloo": ("RLOOTrainer", "prompts", 16, ONLINE, "function", False),
    "online_dpo": ("OnlineDPOTrainer", "prompts", 16,
                   dict(per_device_train_batch_size=4, max_new_tokens=6, max_length=64, beta=0.1), "model", False),
    "ppo": ("PPOTrainer", "prompts", 16, dict(ONLINE, num_generations=1, num_iterations=2), "function", False),
}


def even_tokens(completion_ids, **kwargs) -> list[float]:
    return [float(sum(token % 2 == 0 for token in ids)) for ids in completion_ids]


def fixed_generation(model, tokenizer, prompts, sampling) -> Completions:
    """Row i's completion: 2 to 6 tokens fixed by its prompt ids and i, eos-terminated on most rows."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    rows = []
    for i, ids in enumerate(prompt_ids):
        total = int(sum(ids))
        tokens = [(total * (i + 1) + 17 * k) % 200 + 10 for k in range(2 + (total + 3 * i) % 5)]
        rows.append(torch.tensor(tokens if i % 4 == 3 else tokens + [tokenizer.eos_token_id]))
    return Completions(prompt_ids=prompt_ids, completion_ids=pad(rows, tokenizer.pad_token_id),
                       completion_mask=pad([torch.ones_like(row) for row in rows], 0),
                       texts=tokenizer.batch_decode(rows, skip_special_tokens=True))


def frozen_module_facts(module) -> dict | None:
    """What the run needs of a frozen model (reference or reward model): its wrapper type, the ZeRO stage it runs at
    (None outside DeepSpeed), whether it is in eval mode and free of gradients."""
    if module is None:
        return None
    stage = module.zero_optimization_stage() if hasattr(module, "zero_optimization_stage") else None
    # A DeepSpeed engine's `eval()` sets its module's mode, not its own `training`.
    return {"type": type(module).__name__, "zero_stage": stage, "training": getattr(module, "module", module).training,
            "requires_grad": any(param.requires_grad for param in module.parameters())}


class CountedGatheredParameters(RealGatheredParameters or object):
    """DeepSpeed's own `GatheredParameters`, counting the calls and the parameters it holds gathered."""

    calls: list[int] = []

    def __init__(self, params, *args, **kwargs):
        CountedGatheredParameters.calls.append(len(list(params)))
        super().__init__(params, *args, **kwargs)


def parameters(trainer) -> list[torch.Tensor]:
    """The policy's parameters, whole (gathered under ZeRO-3, where a parameter outside a forward is an empty
    partition)."""
    params = list(models.unwrap_wrappers(trainer.model).parameters())
    if deepspeed_zero is None or not any(hasattr(param, "ds_id") for param in params):
        return [param.detach().clone() for param in params]
    with RealGatheredParameters(params):
        return [param.detach().clone() for param in params]


def run(name: str, model_path: str, seqcls_path: str, out_dir: str) -> None:
    trainer_name, dataset, rows, config, reward, fixed = RUNS[name]
    trainer_cls = getattr(hf_align, trainer_name)
    args = trainer_cls.config_class(output_dir=os.path.join(out_dir, name), **{**COMMON, **config})
    kwargs = {}
    if reward is not None:
        kwargs["reward_funcs"] = seqcls_path if reward == "model" else even_tokens
    original_generation = hf_align.rollout.generate_completions
    if fixed:
        hf_align.rollout.generate_completions = fixed_generation
    CountedGatheredParameters.calls.clear()
    try:
        trainer = trainer_cls(seqcls_path if trainer_name == "RewardTrainer" else model_path, args=args,
                              train_dataset=load_default_dataset(dataset).select(range(rows)), **kwargs)
        before = parameters(trainer)
        trainer.train()
    finally:
        hf_align.rollout.generate_completions = original_generation
    after = parameters(trainer)
    scorer = getattr(trainer, "reward_scorer", None)
    reward_modules = list(scorer.model_modules.values()) if scorer is not None else []
    result = {
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "world_size": trainer.accelerator.num_processes,
        "reference": frozen_module_facts(getattr(trainer, "ref_model", None)),
        "reward_model": frozen_module_facts(reward_modules[0]) if reward_modules else None,
        "weights_moved": any(not torch.equal(b, a) for b, a in zip(before, after)),
        # Parameter counts held gathered by each `GatheredParameters` call during training (the generation ones).
        "gathered": list(CountedGatheredParameters.calls),
        "num_parameters": len(before),
    }
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as file:
            json.dump(result, file)


def main(argv: list[str]) -> None:
    out_dir, model_path, seqcls_path, *names = argv
    if deepspeed_zero is not None:
        deepspeed_zero.GatheredParameters = CountedGatheredParameters
    for name in names:
        run(name, model_path, seqcls_path, out_dir)
    if torch.distributed.is_initialized():  # not at exit, where gloo's threads can abort (pytorch/pytorch#190489)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
