"""TR-DPO's reference updates (Gorbatovski et al., "Learn Your Reference Model for Real Good Alignment", arXiv
2404.09656): every τ optimizer steps the reference moves toward the policy, `θ_ref ← α θ + (1 - α) θ_ref` (a soft
update; α = 1 is the hard update, the reference becomes the policy).

TRL 1.16 offers it with the same three fields on DPO, KTO, GRPO and RLOO: a Config takes them from
`ReferenceSyncArguments`, and a trainer calls `ReferenceSync.attach(self)` once its reference model is built. The moved
reference is saved with each checkpoint (the trainer's `save_training_state`), so a resumed run goes on with it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from . import distributed, models

REFERENCE_STATE_NAME = "synced_reference.safetensors"  # in a checkpoint: the reference's parameters at that step


@dataclass
class ReferenceSyncArguments:
    """The TR-DPO fields of a Config (TRL's names and defaults); its `__post_init__` calls `check_reference_sync`."""

    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "TR-DPO (arXiv 2404.09656): every `ref_model_sync_steps` optimizer steps, move the reference "
                  "model toward the policy by `ref_model_mixup_alpha`. Needs a reference model of its own: not with "
                  "peft, nor with `precompute_ref_log_probs`."},
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={"help": "α of TR-DPO, in (0, 1]: each update sets the reference to α·policy + (1-α)·reference "
                  "(1: the reference becomes the policy). Used with `sync_ref_model`."},
    )
    ref_model_sync_steps: int = field(
        default=512,
        metadata={"help": "τ of TR-DPO: optimizer steps between two reference updates. Used with `sync_ref_model`."},
    )

    def check_reference_sync(self) -> None:
        """Raises a ValueError naming the field when the TR-DPO settings cannot work."""
        if not self.sync_ref_model:
            return
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in (0, 1] (the policy's share in each reference update), "
                             f"got {self.ref_model_mixup_alpha}.")
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be at least 1, got {self.ref_model_sync_steps}.")
        if getattr(self, "precompute_ref_log_probs", False):
            raise ValueError(
                "sync_ref_model=True cannot be combined with precompute_ref_log_probs=True: the reference changes "
                "during training, so log-probs computed before it would be stale. Turn one of them off."
            )


@contextmanager
def _gathered(accelerator, parameters: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Yields whether this process holds (and, with `modifier_rank`, may change) the whole `parameters`: under ZeRO-3
    they are gathered for the duration (changes made on `modifier_rank` are partitioned again afterwards); otherwise
    every process holds them whole already."""
    if distributed.zero_stage(accelerator) != 3:
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank):
        yield modifier_rank is None or accelerator.process_index == modifier_rank


class ReferenceSync(TrainerCallback):
    """Moves `reference` toward the policy after every `every`-th optimizer step (`on_step_end`, as TRL's
    `SyncRefModelCallback`): each parameter becomes `alpha · policy + (1 - alpha) · reference`, matched by name."""

    def __init__(self, accelerator, reference: torch.nn.Module, alpha: float, every: int):
        self.accelerator, self.reference, self.alpha, self.every = accelerator, reference, alpha, every

    @classmethod
    def attach(cls, trainer) -> ReferenceSync | None:
        """With `trainer.args.sync_ref_model`: checks that `trainer` has a reference of the policy's parameters to
        move, adds the callback and returns it; else None."""
        args = trainer.args
        if not args.sync_ref_model:
            return None
        if models.is_peft_model(trainer.model):
            # As TRL 1.16: the peft reference is the policy's base or a copy of its adapter, not a model of its own.
            raise NotImplementedError(
                "sync_ref_model=True is not supported with peft: the reference is then the policy with its adapter "
                "disabled (or a copy of its starting adapter), not a separate model to update. Set "
                "sync_ref_model=False, or train without peft."
            )
        if trainer.ref_model is None:
            raise ValueError(f"sync_ref_model=True needs a reference model, and {type(trainer).__name__} has none.")
        sync = cls(trainer.accelerator, trainer.ref_model, args.ref_model_mixup_alpha, args.ref_model_sync_steps)
        policy_shapes, reference_shapes = (
            {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in parameters.items()}
            for parameters in (sync._policy_parameters(trainer.model), sync._reference_parameters())
        )
        if policy_shapes != reference_shapes:
            differing = sorted(set(policy_shapes.items()) ^ set(reference_shapes.items()))[:3]
            raise ValueError(
                "sync_ref_model=True mixes the policy's parameters into the reference's, so `ref_model` must have "
                f"exactly the policy's parameter names and shapes; these differ: {differing}."
            )
        trainer.add_callback(sync)
        return sync

    @staticmethod
    def _policy_parameters(policy) -> dict[str, torch.nn.Parameter]:
        return dict(models.unwrap_causal_lm(policy).named_parameters())

    def _reference_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(models.unwrap_wrappers(self.reference).named_parameters())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.update(model)

    @torch.no_grad()
    def update(self, policy) -> None:
        """`reference ← alpha · policy + (1 - alpha) · reference`, every parameter."""
        policy_parameters, reference_parameters = self._policy_parameters(policy), self._reference_parameters()
        with (_gathered(self.accelerator, list(policy_parameters.values())),
              _gathered(self.accelerator, list(reference_parameters.values()), modifier_rank=0) as modify):
            if modify:
                for name, reference in reference_parameters.items():
                    mixed = policy_parameters[name].to(reference.dtype)
                    reference.mul_(1.0 - self.alpha).add_(mixed, alpha=self.alpha)

    def save(self, checkpoint: str) -> None:
        """Writes the reference's parameters into the `checkpoint` folder (call on every process)."""
        parameters = self._reference_parameters()
        with _gathered(self.accelerator, list(parameters.values())):
            tensors = {name: parameter.detach().cpu().contiguous() for name, parameter in parameters.items()}
        if self.accelerator.is_main_process:
            save_file(tensors, os.path.join(checkpoint, REFERENCE_STATE_NAME))

    @torch.no_grad()
    def load(self, checkpoint: str) -> None:
        """Restores what `save` wrote into `checkpoint` (call on every process)."""
        path = os.path.join(checkpoint, REFERENCE_STATE_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint was not saved with sync_ref_model=True, so "
                                    "the reference it trained against is unknown.")
        tensors = load_file(path)
        parameters = self._reference_parameters()
        with _gathered(self.accelerator, list(parameters.values()), modifier_rank=0) as modify:
            if modify:
                for name, parameter in parameters.items():
                    parameter.copy_(tensors[name])
