"""The models that run beside the policy, and generation from the policy, under each `accelerate` backend.

A frozen model (reference, reward model) is placed as the run places the policy: under DeepSpeed it becomes an
inference engine (ZeRO-3 keeps its parameters partitioned across processes; ZeRO-1/2 keep a full copy on each
device, so the engine runs at stage 0); under FSDP it is sharded like the policy; otherwise it moves to the process's
device (with the run's mixed-precision autocast). Generation needs every parameter of the policy at once:
`gathered_for_generation` gathers them under ZeRO-3 (unless told not to) and FSDP (v1) for the duration of the call.

`deepspeed` is imported only on the DeepSpeed paths: it is an optional dependency.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType

from . import models


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of the run, None when it does not use DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin.zero_stage


def inference_deepspeed_config(training_config: dict, model: torch.nn.Module) -> dict:
    """The DeepSpeed config of a frozen model in a run configured by `training_config`: no optimizer or scheduler
    (nothing to step), and ZeRO stage 3 kept (with the bucket sizes the run left to "auto" sized from the model's
    hidden size, as transformers sizes the policy's) or else stage 0. Batch sizes and precision stay the run's:
    DeepSpeed checks them even without an optimizer."""
    config = copy.deepcopy(training_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}
        return config
    zero.pop("offload_optimizer", None)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden_size is not None:
        sized = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
        zero.update({key: value for key, value in sized.items() if zero.get(key, "auto") == "auto"})
    return config


def prepare_frozen_model(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """`model` frozen (eval mode, no gradients) and placed for the run; returns the module to call: a DeepSpeed
    inference engine under DeepSpeed, an FSDP-sharded model under FSDP, else `model` on the process's device."""
    models.freeze(model)
    stage = zero_stage(accelerator)
    if stage is not None:
        import deepspeed

        config = inference_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, model)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # returns None, unlike `nn.Module.eval`
        return engine
    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.is_fsdp2:
            from accelerate.utils import fsdp2_prepare_model

            return fsdp2_prepare_model(accelerator, model).eval()
        # Not `evaluation_mode=True`: accelerate then skips the FSDP wrapping (and, under FSDP, the device placement).
        return accelerator.prepare_model(model).eval()
    return accelerator.prepare_model(model, evaluation_mode=True)


@contextmanager
def gathered_for_generation(accelerator, model: torch.nn.Module, gather_zero3_parameters: bool = True):
    """Yields the module to call `generate` on for `model` (the policy, possibly wrapped), without its DDP / compile
    wrappers. Under ZeRO-3 its parameters are gathered on every process for the duration (a partitioned model with no
    ZeRO hooks yet, e.g. before `train()`, cannot run otherwise; ZeRO's hooks, left in place, may partition a layer
    again after it runs and gather it at its next call). `gather_zero3_parameters=False` (TRL's
    `ds3_gather_for_generation=False`) gathers nothing: ZeRO's hooks then gather each layer as it runs, slower, but
    the whole model never has to fit on one device. Under FSDP v1 the root's own parameters (embeddings, head) are
    summoned: each wrapped layer gathers its own as it runs, and FSDP v2 modules gather theirs in their forward hooks.
    Otherwise nothing is gathered."""
    if zero_stage(accelerator) == 3 and gather_zero3_parameters:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield models.unwrap_wrappers(model)
        return
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        from torch.distributed.fsdp import FullyShardedDataParallel

        # A no-op before `train()` wraps the policy.
        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield models.unwrap_wrappers(model)
        return
    yield models.unwrap_wrappers(model)
