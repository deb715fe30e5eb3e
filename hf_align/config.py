"""The base Config every hf_align trainer's Config extends."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NONFINITE_STEPS = ("error", "skip")


def cuda_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class AlignConfig(TrainingArguments):
    """Fields every aligner shares, on top of `transformers.TrainingArguments`.

    Precision is chosen by `precision`: `"auto"` (default) trains in fp32 on a CPU and in bf16 on a CUDA device that
    supports it. bf16 on a CPU is never used: it runs hundreds of times slower than fp32 there, so an explicit
    `bf16=True` without a CUDA device is turned off with a warning.

    Defaults that differ from `TrainingArguments` and match TRL's trainers: `logging_steps=10`,
    `remove_unused_columns=False` (the trainer keeps the columns its collator reads). `gradient_checkpointing` keeps
    the transformers default (off): TRL turns it on, which costs ~20% speed for memory a small run does not need.

    A NaN or inf loss or gradient stops training with a `FloatingPointError` naming the global step and the quantity;
    `nonfinite_steps="skip"` instead leaves the parameters of such an optimizer step unchanged (the learning-rate
    schedule still advances), warns, and logs the running count as `skipped_steps`.
    """

    precision: str = field(
        default="auto",
        metadata={"help": "auto (fp32 on CPU, bf16 on CUDA devices that support it), fp32, bf16 or fp16."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Maximum tokens of prompt + completion; longer sequences are truncated (None: no limit)."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "keep_start (cut the end of the completion) or keep_end (cut the start of the prompt)."},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset tokenization."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when `model` is given as an id or path."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub. Off unless set."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the model (and reference)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept for TRL compatibility; the trainer selects the columns it needs."}
    )
    nonfinite_steps: str = field(
        default="error",
        metadata={"help": "What an optimizer step with a NaN/inf loss or gradient does: error (stop training with an "
                  "error naming the step and the quantity) or skip (no parameter update for that step, a warning, "
                  "and `skipped_steps` in the logs)."},
    )

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        if self.nonfinite_steps not in NONFINITE_STEPS:
            raise ValueError(f"nonfinite_steps must be one of {NONFINITE_STEPS}, got {self.nonfinite_steps!r}")
        if isinstance(self.model_init_kwargs, str):
            import json

            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        pad_multiple = getattr(self, "pad_to_multiple_of", None)
        if pad_multiple == "auto":  # TRL's default: a multiple of 128 on AWS Neuron only, no padding elsewhere
            self.pad_to_multiple_of = None
        elif isinstance(pad_multiple, str):  # from a command line or YAML, where TRL reads "none" / "null" as None
            self.pad_to_multiple_of = None if pad_multiple.lower() in ("none", "null") else int(pad_multiple)
        self._resolve_precision()
        self._resolve_cpu_deepspeed_backend()
        if getattr(self, "use_vllm", False):
            raise ValueError("`use_vllm=True` samples with vLLM, which needs the `vllm` package and a CUDA device; "
                             "hf_align samples with transformers' `generate` (leave `use_vllm` off).")
        if getattr(self, "activation_offloading", False) and (self.use_cpu or not torch.cuda.is_available()):
            raise ValueError("`activation_offloading=True` moves the activations saved for the backward pass from a "
                             "CUDA device to CPU memory: it needs a CUDA device, and this run trains on the CPU.")
        super().__post_init__()

    def _resolve_precision(self) -> None:
        on_cuda = torch.cuda.is_available() and not self.use_cpu
        if self.precision == "auto":
            if not (self.bf16 or self.fp16):
                self.bf16 = on_cuda and cuda_supports_bf16()
        elif self.precision == "fp32":
            self.bf16 = self.fp16 = False
        elif self.precision == "bf16":
            self.bf16, self.fp16 = True, False
        elif self.precision == "fp16":
            self.bf16, self.fp16 = False, True
        if (self.bf16 or self.fp16) and not on_cuda:
            warnings.warn(
                "bf16/fp16 was requested but no CUDA device is used: training in fp32, which on a CPU is far faster "
                "(bf16 matmuls run ~600x slower than fp32 here).",
                stacklevel=3,
            )
            self.bf16 = self.fp16 = False
        self.precision = "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def _resolve_cpu_deepspeed_backend(self) -> None:
        """Under `accelerate launch` with DeepSpeed over several processes on a machine with no CUDA device, names the
        gloo backend. Without one, accelerate lets DeepSpeed start its process group but counts a single process
        itself, so the `train_batch_size` transformers gives DeepSpeed misses the factor of the process count and
        DeepSpeed refuses it (TRL fails there)."""
        launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if (self.ddp_backend is None and launched and int(os.environ.get("WORLD_SIZE", "1")) > 1
                and not torch.cuda.is_available()):
            self.ddp_backend = "gloo"

    # `Trainer` pickles its args into `training_args.bin` next to every saved model and checkpoint, and
    # `push_to_hub` uploads that file: a pickle never holds `hub_token` (in-memory copies keep it).
    def __getstate__(self):
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    def __copy__(self):
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo):
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


@dataclass
class PackingArguments:
    """The packed-row options of the trainers that score completions of prompts (`hf_align.packing`): both keep every
    log-prob as it is in the completion's own `prompt + completion` row, and both need eager or sdpa attention."""

    prefix_sharing: bool = field(
        default=False, metadata={"help": "Run each prompt once for all of its completions in a batch (DPO's chosen "
                                 "and rejected, a group's samples) instead of once per completion."}
    )
    padding_free: bool = field(
        default=False, metadata={"help": "Pack a batch's sequences into one row with no padding (attention then "
                                 "costs the square of the packed row's length)."}
    )


@dataclass
class ReferenceArguments:
    """TRL's reference-model fields of the offline trainers that score completions against a reference (DPO and its
    variants, KTO), read by `AlignTrainer.setup_reference`."""

    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute reference log-probs once before training, then drop the reference."}
    )
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "Batch size of that pass."})


@dataclass
class PadTokenArguments:
    """TRL's (deprecated) `pad_token` field (`models.prepare_tokenizer`)."""

    pad_token: str | None = field(
        default=None, metadata={"help": "The padding token instead of the tokenizer's (or its eos when it has none); "
                                "it must be in the vocabulary. TRL deprecates it: setting `tokenizer.pad_token` "
                                "does the same."}
    )


@dataclass
class TokenizerArguments(PadTokenArguments):
    """TRL's fields that change the tokenizer (and the model's special tokens) before the data is tokenized
    (`models.apply_chat_template_and_eos`, `models.prepare_tokenizer`)."""

    chat_template_path: str | None = field(
        default=None, metadata={"help": "A Jinja chat template file (.jinja / .j2), or a tokenizer (folder or Hub id) "
                                "whose chat template, special tokens and eos are cloned (the embeddings resized)."}
    )
    eos_token: str | None = field(
        default=None, metadata={"help": "The token that ends a sequence or a turn instead of the tokenizer's eos (it "
                                "must be in the vocabulary); it becomes the model's eos too."}
    )


@dataclass
class ActivationOffloadingArguments:
    """TRL's activation offloading (`trl.models.activation_offloading`), for the trainers whose TRL Config has it."""

    activation_offloading: bool = field(
        default=False, metadata={"help": "Move the activations saved for the backward pass to CPU memory during the "
                                 "forward pass and back for the backward (needs a CUDA device)."}
    )


@dataclass
class VLLMArguments:
    """TRL's vLLM fields (`trl vllm-serve` server or colocated engine), accepted so that TRL configs load; they only
    act with `use_vllm=True`, which raises: hf_align samples with transformers' `generate`."""

    use_vllm: bool = field(default=False, metadata={"help": "Sample with vLLM (needs vllm and a CUDA device)."})
    vllm_mode: str = field(default="colocate", metadata={"help": "vLLM in the training processes ('colocate') or a "
                                                         "`trl vllm-serve` server ('server')."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vLLM's model implementation: vllm or "
                                                           "transformers."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "Offload the colocated engine's weights "
                                                                  "and cache between generations."})
    vllm_structured_outputs_regex: str | None = field(default=None, metadata={"help": "Regex constraining vLLM's "
                                                                              "samples."})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "The server's URL (instead of host and "
                                                                     "port)."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "The server's host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "The server's port."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Seconds to wait for the server."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Port of the weight-sync process group."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU memory share of the colocated "
                                                                      "engine."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "Context length of the colocated "
                                                                      "engine."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Tensor parallelism of the colocated "
                                                                "engine."})


@dataclass
class VLLMImportanceSamplingArguments:
    """TRL's correction for the mismatch between vLLM's sampling and the trainer's log-probs (GRPO); it only acts
    with `use_vllm=True`."""

    vllm_importance_sampling_correction: bool = field(default=True, metadata={"help": "Reweight by π_train/π_vLLM."})
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata={"help": "Per token or per sequence, "
                                                                                  "truncated or masked."})
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata={"help": "Upper bound of the "
                                                                                   "ratio."})
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata={"help": "Lower bound of the "
                                                                                    "ratio."})
    vllm_importance_sampling_cap: float | None = field(default=None, metadata={"help": "TRL's older name of the "
                                                                               "upper bound."})


@dataclass
class RouterAuxLossArguments:
    """TRL's `router_aux_loss_coef`: the weight of a Mixture-of-Experts model's load-balancing loss."""

    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Weight of a Mixture-of-Experts model's load-balancing loss, added to the "
                                "training loss (None: the model config's weight; 0: off). An error on a model "
                                "without experts."}
    )
