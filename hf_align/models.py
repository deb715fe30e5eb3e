"""Loading models and tokenizers, unwrapping wrappers, and the reference model."""

from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager, nullcontext

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import defaults
from .optional import import_optional


def _is_peft_model_instance(model) -> bool:
    # peft is optional and takes seconds to import: a model can only be a PeftModel once peft has been imported.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def is_peft_model(model) -> bool:
    return _is_peft_model_instance(unwrap_wrappers(model))


def unwrap_wrappers(model):
    """Strips DDP / DeepSpeed / torch.compile wrappers (anything holding the real model in `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def unwrap_causal_lm(model) -> PreTrainedModel:
    """The `PreTrainedModel` inside any DDP / peft wrapping (its LoRA layers stay in place)."""
    model = unwrap_wrappers(model)
    return model.get_base_model() if _is_peft_model_instance(model) else model


def resolve_model_name(name: str, auto_class=AutoModelForCausalLM) -> str:
    """Maps the embedded default's symbolic name to its local path (the one-label sequence classifier when
    `auto_class` loads sequence classifiers, else the causal LM); anything else is a Hub id or a path."""
    if not defaults.is_default_model_name(name):
        return name
    return defaults.default_model_path("seq-cls" if "SequenceClassification" in auto_class.__name__ else "causal-lm")


def load_model(name: str, args, auto_class=AutoModelForCausalLM, **overrides) -> PreTrainedModel:
    """Loads `name` with `args.model_init_kwargs`; weights in fp32 unless the user picks a dtype (mixed precision
    autocasts), safetensors only, and remote code only when `args.trust_remote_code` is set."""
    kwargs = {"dtype": torch.float32, **(args.model_init_kwargs or {}), **overrides}
    if getattr(kwargs.get("quantization_config"), "quant_method", None) == "bitsandbytes":
        import_optional("bitsandbytes", "quantization", "Loading a model with a BitsAndBytesConfig")
    if isinstance(kwargs["dtype"], str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    kwargs.setdefault("use_safetensors", True)
    return auto_class.from_pretrained(resolve_model_name(name, auto_class), **kwargs)


def load_tokenizer(model: PreTrainedModel, args):
    name = model.config._name_or_path
    if not name:
        raise ValueError("`processing_class` is required: the model was built in memory and names no tokenizer.")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(name), trust_remote_code=args.trust_remote_code)
    return tokenizer


def _require_in_vocabulary(tokenizer, token: str, field: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ValueError(f"`{field}={token!r}` is not in the vocabulary of the tokenizer ({type(tokenizer).__name__}): "
                         "add it to the tokenizer (and resize the model's embeddings) first.")


def apply_chat_template_and_eos(model: PreTrainedModel, tokenizer, chat_template_path: str | None,
                                eos_token: str | None) -> tuple[PreTrainedModel, list]:
    """TRL's `chat_template_path` and `eos_token`, applied to `tokenizer` (in place) and `model`, in TRL's order.

    `chat_template_path`: a Jinja file (`.jinja` / `.j2`) becomes the chat template as it is; anything else is a
    tokenizer (folder or Hub id) whose template, special tokens and eos are cloned (`trl.clone_chat_template`, which
    resizes the embeddings). `eos_token` (in the vocabulary) becomes the tokenizer's and the model's eos, and the
    first of the generation config's. Returns `(model, tokens the template added)`: with peft those must train."""
    added_tokens = []
    if chat_template_path is not None:
        if os.path.isfile(chat_template_path) and chat_template_path.endswith((".jinja", ".j2")):
            with open(chat_template_path, encoding="utf-8") as file:
                tokenizer.chat_template = file.read()
        else:
            from trl.chat_template_utils import clone_chat_template

            model, _, added_tokens = clone_chat_template(model, tokenizer, chat_template_path)
    if eos_token is not None:
        _require_in_vocabulary(tokenizer, eos_token, "eos_token")
        tokenizer.eos_token = eos_token
        model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            ids = generation_config.eos_token_id
            ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
            if tokenizer.eos_token_id not in ids:
                generation_config.eos_token_id = [tokenizer.eos_token_id, *ids]
    return model, added_tokens


def router_aux_loss_weight(model: PreTrainedModel, coef: float | None) -> float:
    """The weight of a Mixture-of-Experts model's load-balancing loss under TRL's `router_aux_loss_coef` (`coef`;
    None: the model config's own), 0 for a model without experts. As TRL, the model's config is set to compute the
    loss in its forward exactly when the weight is not 0 (`CompletionLogProbs.aux_loss`); `coef` set on a model
    without experts is an error, as in TRL."""
    config = unwrap_causal_lm(model).config.get_text_config()
    if not hasattr(config, "output_router_logits"):
        if coef not in (None, 0.0):
            raise ValueError(f"`router_aux_loss_coef={coef}` weights a Mixture-of-Experts load-balancing loss, and "
                             f"{type(unwrap_causal_lm(model)).__name__} has no experts: leave it None.")
        return 0.0
    weight = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
    config.output_router_logits = weight != 0.0
    if hasattr(config, "router_aux_loss_coef"):
        config.router_aux_loss_coef = weight
    return weight


def prepare_tokenizer(tokenizer, model: PreTrainedModel, pad_token: str | None = None):
    """Gives the tokenizer a pad token (`pad_token` if given, else its own, else its eos) and tells the model which id
    pads."""
    if pad_token is not None:
        _require_in_vocabulary(tokenizer, pad_token, "pad_token")
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token; set `tokenizer.pad_token`.")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def apply_peft(model: PreTrainedModel, peft_config, args, trainable_tokens=()):
    """Wraps `model` with a new adapter; quantized bases get their norms upcast and input grads enabled.
    `trainable_tokens`: ids whose embeddings train too (tokens a cloned chat template added), as TRL does."""
    if peft_config is None:
        return model
    peft = import_optional("peft", "peft", "Training with a `peft_config`")
    if trainable_tokens:
        peft_config = copy.copy(peft_config)
        indices = peft_config.trainable_token_indices or {}
        # A list names tokens of the input embeddings, like the "embed_tokens" entry of a dict.
        indices = dict(indices) if isinstance(indices, dict) else {"embed_tokens": list(indices)}
        indices["embed_tokens"] = [*indices.get("embed_tokens", []), *trainable_tokens]
        peft_config.trainable_token_indices = indices
    if isinstance(model, peft.PeftModel):
        raise ValueError(
            "`model` is already a PeftModel and a `peft_config` was given too: merge the existing adapter first, or "
            "pass the PeftModel without `peft_config` to keep training its adapter."
        )
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized:
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        )
    elif args.gradient_checkpointing:
        model.enable_input_require_grads()
    return peft.get_peft_model(model, peft_config)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """An in-memory, frozen, eval-mode copy of `model` (TRL reloads from `config._name_or_path`, which fails for a
    model built or modified in memory)."""
    reference = copy.deepcopy(unwrap_causal_lm(model))
    return freeze(reference)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


REFERENCE_ADAPTER = "ref"  # TRL's name for the frozen copy of the starting adapter


def adapter_is_identity(peft_model) -> bool:
    """Whether the active adapter of `peft_model` leaves the base model's outputs unchanged: a plain LoRA adapter
    (no DoRA) whose B matrices are all zero, as `get_peft_model` makes one by default. Anything else may not be."""
    config = peft_model.peft_config[peft_model.active_adapter]
    from peft import PeftType  # a peft model is given: peft is installed

    if config.peft_type != PeftType.LORA or getattr(config, "use_dora", False):
        return False
    marker = f".{peft_model.active_adapter}."
    return all(not parameter.any() for name, parameter in peft_model.named_parameters()
               if marker in name and ("lora_B" in name or "lora_embedding_B" in name))


def add_reference_adapter(policy) -> None:
    """Makes the peft `policy`'s reference (`reference_model`) its starting state: unless its active adapter is the
    identity (`adapter_is_identity`; disabling it then gives the same model), adds a frozen copy of that adapter named
    `REFERENCE_ADAPTER`, as TRL does for an adapter trained in an earlier run. Costs one more adapter's weights."""
    peft_model = unwrap_wrappers(policy)
    if REFERENCE_ADAPTER in peft_model.peft_config or adapter_is_identity(peft_model):
        return
    active = peft_model.active_adapter
    peft_model.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(peft_model.peft_config[active]))
    parameters = dict(peft_model.named_parameters())
    marker = f".{active}."
    with torch.no_grad():
        for name, parameter in parameters.items():
            if marker in name:
                reference = parameters[name.replace(marker, f".{REFERENCE_ADAPTER}.")]
                reference.copy_(parameter)
                reference.requires_grad_(False)


@contextmanager
def _reference_adapter_active(peft_model):
    """`peft_model` runs with its reference adapter for the duration; the active adapter and every parameter's
    `requires_grad` are restored afterwards (peft's `set_adapter` marks the adapter it activates trainable)."""
    previous = peft_model.active_adapter
    trainable = [(parameter, parameter.requires_grad) for parameter in peft_model.parameters()]
    peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)


@contextmanager
def reference_model(policy, ref_model):
    """Yields the module that computes reference log-probs, without gradients: `ref_model` when there is one, else
    the peft policy running its reference adapter (`add_reference_adapter`; with none, its adapter disabled), else
    the policy itself (valid only before the first update: precomputing the reference)."""
    if ref_model is not None:
        context = nullcontext(ref_model)
    elif is_peft_model(policy):
        peft_model = unwrap_wrappers(policy)
        if REFERENCE_ADAPTER in peft_model.peft_config:
            context = _reference_adapter_active(peft_model)
        else:
            context = peft_model.disable_adapter()
    else:
        context = nullcontext()
    with torch.no_grad(), context:
        yield ref_model if ref_model is not None else policy


def check_one_label_classifier(model, role: str, remedy: str) -> PreTrainedModel:
    """The sequence classifier inside `model` (peft / DDP wrappers removed), if it has one output (a reward model, a
    critic); else a ValueError naming `role` (e.g. "RewardTrainer needs") and ending with `remedy`."""
    classifier = unwrap_causal_lm(model)
    if "ForSequenceClassification" not in type(classifier).__name__ or classifier.config.num_labels != 1:
        raise ValueError(f"{role} a sequence classifier with num_labels=1, got {type(classifier).__name__} with "
                         f"num_labels={classifier.config.num_labels}. {remedy}")
    return classifier

