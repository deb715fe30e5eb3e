"""The base Trainer every hf_align trainer extends: model and tokenizer loading, peft, metrics, model cards, and
reference log-probs precomputed once."""

from __future__ import annotations

import contextlib

import json
import logging
import os
from collections import defaultdict
from importlib.metadata import version

import torch
from datasets import Dataset
from huggingface_hub import ModelCard, ModelCardData
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import checkpoints, defaults, distributed, models
from .checkpoints import TRAINING_STATE_NAME
from .config import AlignConfig, PackingArguments
from .data import DataError

logger = logging.getLogger(__name__)


def _zero_totals() -> torch.Tensor:
    return torch.zeros(2, dtype=torch.float64)  # (sum, count) of a `record_sum` metric


def nonfinite_gradient(model: torch.nn.Module) -> str | None:
    """None when the norm of `model`'s gradients is finite; else the norm and the first parameter whose gradient is
    not finite (or that none is: finite gradients whose norm overflows)."""
    named = [(name, p.grad) for name, p in models.unwrap_wrappers(model).named_parameters() if p.grad is not None]
    if not named:
        return None
    norms = [torch.linalg.vector_norm(grad.detach()) for _, grad in named]
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([norm.to(device, torch.float32) for norm in norms]))
    if torch.isfinite(total):
        return None
    culprit = next((name for (name, _), norm in zip(named, norms) if not torch.isfinite(norm)), None)
    where = f"first in parameter '{culprit}'" if culprit else "every gradient is finite but their norm overflows"
    return f"the gradient norm is {total.item()} ({where})"


class AlignTrainer(Trainer):
    """Shared constructor and bookkeeping. Subclasses set the class attributes below and implement
    `prepare_dataset(dataset, name)` and `compute_loss`.

    `model` may be a `PreTrainedModel`, a `PeftModel`, or a model id / local path (loaded with
    `args.model_init_kwargs`; `quantization_config` applies then). `processing_class` defaults to the tokenizer saved
    with the model. A `peft_config` wraps the model in a new adapter."""

    config_class: type[AlignConfig] = AlignConfig
    auto_model_class = AutoModelForCausalLM
    algorithm: str = ""  # short name, used in default output dirs and tags
    paper: dict = {}  # {"title", "id", "citation"}
    dataset_columns: tuple[str, ...] = ()  # columns the collator reads after `prepare_dataset`
    loss_is_scaled_for_ga = False  # losses are batch means; Trainer divides by gradient accumulation steps
    model_init_overrides: dict = {}  # `from_pretrained` arguments the algorithm requires (a reward model's one label)

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: AlignConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        quantization_config=None,
        preprocess_logits_for_metrics=None,
        optimizer_cls_and_kwargs=None,
    ):
        self.model_name = model if isinstance(model, str) else model.config._name_or_path
        if args is None:
            args = self.config_class(output_dir=f"{os.path.basename(self.model_name.rstrip('/')) or 'model'}-{self.algorithm}")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        model = self._load_model(model, args, quantization_config)
        # Only the trainers whose Config has TRL's field add the load-balancing loss (`add_router_aux_loss`).
        self.router_aux_loss_weight = (models.router_aux_loss_weight(model, args.router_aux_loss_coef)
                                       if hasattr(args, "router_aux_loss_coef") else 0.0)
        if self.router_aux_loss_weight and isinstance(args, PackingArguments) and (
                args.prefix_sharing or args.padding_free):
            raise ValueError("A Mixture-of-Experts load-balancing loss is computed over a batch's rows, which packed "
                             "rows (prefix_sharing / padding_free) do not have: turn those off, or set "
                             "`router_aux_loss_coef=0.0`.")
        if processing_class is None:
            processing_class = models.load_tokenizer(model, args)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        model, added_tokens = models.apply_chat_template_and_eos(
            model, tokenizer, getattr(args, "chat_template_path", None), getattr(args, "eos_token", None))
        self.tokenizer = models.prepare_tokenizer(tokenizer, model, getattr(args, "pad_token", None))
        model = models.apply_peft(model, peft_config, args, trainable_tokens=added_tokens)
        if args.disable_dropout:
            models.disable_dropout(model)
        self.dropped_rows: dict[str, int] = {}
        train_dataset = self.prepare_nonempty_dataset(train_dataset, "train", args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: self.prepare_nonempty_dataset(ds, f"eval_{key}", args)
                            for key, ds in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self.prepare_nonempty_dataset(eval_dataset, "eval", args)
        self.skipped_steps: list[int] = []  # global steps whose update `nonfinite_steps="skip"` dropped
        self._nonfinite: str | None = None  # what was not finite in the optimizer step under way
        self._micro_batch = 0  # micro-batches of the optimizer step under way so far
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._metric_totals = {"train": defaultdict(_zero_totals), "eval": defaultdict(_zero_totals)}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator if data_collator is not None else self.default_collator(args),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.activation_offloading = contextlib.nullcontext()
        if getattr(args, "activation_offloading", False):  # the Config checked there is a CUDA device
            from trl.models.activation_offloading import get_act_offloading_ctx_manager

            self.activation_offloading = get_act_offloading_ctx_manager(model=self.model)
        unwrapped = models.unwrap_wrappers(self.model)
        if hasattr(unwrapped, "add_model_tags"):
            unwrapped.add_model_tags(self.tags)

    # -- hooks for subclasses --------------------------------------------------------------------------------------
    def prepare_dataset(self, dataset, name: str, args):
        """Validates and tokenizes `dataset`; rows dropped go in `self.dropped_rows[name]`."""
        raise NotImplementedError

    def default_collator(self, args):
        raise NotImplementedError

    def prepare_nonempty_dataset(self, dataset, name: str, args):
        """`prepare_dataset`, raising `DataError` when the dataset has no row, or none is left after it: a run with
        nothing to train or evaluate on is a mistake, not zero steps. (A stream's rows are not counted.)"""
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise DataError(f"The {name} dataset has no rows.")
        dataset = self.prepare_dataset(dataset, name, args)
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise DataError(f"No row of the {name} dataset is left after preparing it; nothing to train on.")
        return dataset

    def _set_signature_columns_if_needed(self):
        # With `remove_unused_columns=True`, Trainer keeps only these columns (not the model's forward arguments).
        if self._signature_columns is None:
            self._signature_columns = list(self.dataset_columns)

    # -- model loading ---------------------------------------------------------------------------------------------
    def _load_model(self, model, args, quantization_config):
        if isinstance(model, str):
            overrides = dict(self.model_init_overrides)
            if quantization_config is not None:
                overrides["quantization_config"] = quantization_config
            if quantization_config is not None and not torch.cuda.is_available():
                overrides["device_map"] = "cpu"
            return models.load_model(model, args, self.auto_model_class, **overrides)
        if quantization_config is not None:
            raise ValueError("`quantization_config` applies only when `model` is given as an id or path.")
        if args.model_init_kwargs:
            logger.warning("`model_init_kwargs` is ignored: the model is already loaded.")
        return model

    # -- metrics ---------------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return "train" if self.model.training else "eval"

    def record_metric(self, name: str, values: torch.Tensor, reduction: str = "mean") -> None:
        """Gathers `values` (per example, or a scalar) from every process and records their `reduction` ("mean",
        "min" or "max") for the next log, which averages what was recorded since the last one."""
        values = values.detach().float().reshape(-1)
        gathered = self.accelerator.gather_for_metrics(values)
        if gathered.numel():
            self._metrics[self.mode][name].append(getattr(gathered, reduction)().item())

    def record_value(self, name: str, value: float) -> None:
        """Records a number computed from values already gathered from every process (the same on each)."""
        self._metrics[self.mode][name].append(float(value))

    def add_router_aux_loss(self, loss: torch.Tensor, policy, scale: float = 1.0) -> torch.Tensor:
        """`loss` plus the weighted load-balancing loss of the policy's forward (`policy`: its `CompletionLogProbs`)
        times `scale`, logged as `aux_loss` (TRL's metric); `loss` itself for a model without one."""
        if not self.router_aux_loss_weight:
            return loss
        self.record_metric("aux_loss", policy.aux_loss.detach())
        return loss + self.router_aux_loss_weight * scale * policy.aux_loss

    def record_token_mean(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Records `sum(values * mask) / sum(mask)` over every process (a token-weighted mean)."""
        totals = torch.stack([(values.detach().float() * mask).sum(), mask.sum().float()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        if totals[1] > 0:
            self._metrics[self.mode][name].append((totals[0] / totals[1]).item())

    def record_tokens(self, attention_mask: torch.Tensor) -> None:
        """Adds the batch's tokens, over every process, to the running `num_tokens` count (training only)."""
        if self.mode == "train":
            self._total_train_tokens = getattr(self, "_total_train_tokens", 0)
            self._total_train_tokens += int(self.accelerator.reduce(attention_mask.sum(), reduction="sum").item())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def record_sum(self, name: str, values: torch.Tensor) -> None:
        """Adds the sum and the count of `values` (`[N]`, N may be 0), over every process, to `name`'s running totals.
        The next log reports total / count, the exact mean over every example since the last log, and leaves `name`
        out while the count is 0 (a batch with no example of a kind logs nothing for it, never NaN)."""
        values = values.detach().float().reshape(-1)
        totals = torch.stack([values.sum(), values.new_tensor(values.numel())])
        self._metric_totals[self.mode][name] += self.accelerator.reduce(totals, reduction="sum").cpu()

    def pending_metrics(self, mode: str) -> dict[str, float]:
        """What the next log of `mode` ("train" or "eval") reports, without its prefix: the average of each metric's
        recorded values, and total / count of each `record_sum` metric."""
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        for key, (total, count) in self._metric_totals[mode].items():
            if count > 0:
                metrics[key] = (total / count).item()
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = self.mode
        prefix = "eval_" if mode == "eval" else ""
        for key, value in self.pending_metrics(mode).items():
            logs[f"{prefix}{key}"] = value
        if mode == "train" and self.args.nonfinite_steps == "skip":
            logs["skipped_steps"] = len(self.skipped_steps)
        self._metrics[mode].clear()
        self._metric_totals[mode].clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`; a dataset passed here in its raw form (e.g. a held-out split) is validated and tokenized
        first, as TRL's trainers do. (`Trainer.evaluate` calls back here once per dataset of a dict.)"""
        if eval_dataset is not None and not isinstance(eval_dataset, (str, dict)):
            eval_dataset = self.prepare_eval_dataset(eval_dataset, metric_key_prefix)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def prepare_eval_dataset(self, dataset, name: str):
        """A dataset given to `evaluate`: `prepare_nonempty_dataset` unless it already holds the first of
        `dataset_columns` (it was prepared before, e.g. `trainer.eval_dataset`)."""
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise DataError(f"The {name} dataset has no rows.")
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        if self.dataset_columns and self.dataset_columns[0] in columns:
            return dataset
        return self.prepare_nonempty_dataset(dataset, name, self.args)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation runs `compute_loss` (the batches carry no `labels` for `Trainer` to find)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- non-finite losses and gradients ---------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.activation_offloading:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.check_finite_step(model, loss)
        return loss

    def check_finite_step(self, model, loss: torch.Tensor) -> None:
        """Runs after each micro-batch's backward pass (an override of `training_step` that does not call this class's
        must call it). A non-finite loss, or at the optimizer step's last micro-batch a non-finite gradient norm,
        raises `FloatingPointError` naming the global step and the quantity; with `nonfinite_steps="skip"`, the
        step's gradients are dropped instead, so that the optimizer leaves every parameter as it is."""
        self._micro_batch += 1
        if self._nonfinite is None and not torch.isfinite(loss).all():
            self._nonfinite = (f"the loss is {loss.item()} (micro-batch {self._micro_batch} of "
                               f"{self.current_gradient_accumulation_steps})")
        last_micro_batch = self.accelerator.sync_gradients
        # fp16's GradScaler skips the steps whose scaled gradients overflow: that is how it picks its scale.
        if last_micro_batch and self._nonfinite is None and self.accelerator.scaler is None:
            self._nonfinite = nonfinite_gradient(model)
        step = self.state.global_step + 1
        if self._nonfinite is not None and self.args.nonfinite_steps == "error":
            raise FloatingPointError(
                f"Non-finite value at global step {step}: {self._nonfinite}. Lower the learning rate, set "
                "`max_grad_norm`, check this step's data and loss settings, or set `nonfinite_steps=\"skip\"` to skip "
                "such optimizer steps."
            )
        if not last_micro_batch:
            return
        problem, self._nonfinite, self._micro_batch = self._nonfinite, None, 0
        if self.args.nonfinite_steps != "skip":
            return
        # Every process skips the step when any process found a problem, so that their parameters stay equal.
        flagged = torch.tensor(float(problem is not None), device=self.accelerator.device)
        if self.accelerator.reduce(flagged, reduction="sum").item() == 0:
            return
        self.optimizer.zero_grad(set_to_none=True)  # an optimizer leaves parameters without a gradient untouched
        self.skipped_steps.append(step)
        logger.warning("Skipped optimizer step %d: %s (%d step(s) skipped so far).", step,
                       problem or "another process found a non-finite value", len(self.skipped_steps))

    # -- reference model -------------------------------------------------------------------------------------------
    # For trainers scored against a frozen reference, whose Config has `precompute_ref_log_probs` and
    # `precompute_ref_batch_size`; `compute(batch) -> {column: Tensor[rows]}` scores a collated batch with it.
    def build_reference(self, ref_model, copy_policy: bool = True):
        """The reference model: `ref_model` (a model, or an id / path to load), frozen and placed for the run
        (`distributed.prepare_frozen_model`); else, with a peft policy, None (its starting adapter is the reference:
        `models.add_reference_adapter`); else, with `copy_policy`, a frozen in-memory copy of the policy (under
        ZeRO-3, the policy's weights loaded again from its name or path, as TRL does); else None."""
        if ref_model is not None and any(ref_model is m for m in (self.model, models.unwrap_causal_lm(self.model))):
            raise ValueError("`model` and `ref_model` must be different objects; omit `ref_model` to get a frozen copy.")
        if isinstance(ref_model, str):
            ref_model = models.load_model(ref_model, self.args, self.auto_model_class)
        if ref_model is None and models.is_peft_model(self.model):
            models.add_reference_adapter(self.model)
        if ref_model is None and copy_policy and not models.is_peft_model(self.model):
            if distributed.zero_stage(self.accelerator) == 3:
                # The policy's parameters may already be partitioned (zero.Init): a copy would hold empty tensors.
                ref_model = models.load_model(models.unwrap_causal_lm(self.model).name_or_path, self.args,
                                              self.auto_model_class)
            else:
                ref_model = models.frozen_copy(self.model)
        if ref_model is None:
            return None
        if self.args.disable_dropout:
            models.disable_dropout(ref_model)
        return distributed.prepare_frozen_model(self.accelerator, ref_model)

    def setup_reference(self, ref_model, compute) -> None:
        """Sets `self.ref_model` (`build_reference`; no copy of the policy when reference log-probs are precomputed).
        With `precompute_ref_log_probs`, then adds `compute`'s columns to the train and eval datasets, before the
        first update (the policy is still the reference then)."""
        precompute = self.args.precompute_ref_log_probs
        self.ref_model = self.build_reference(ref_model, copy_policy=not precompute)
        if not precompute:
            return
        train_batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        eval_batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        self.train_dataset = self.precompute_reference(self.train_dataset, "train", compute, train_batch_size)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                key: self.precompute_reference(dataset, key, compute, eval_batch_size)
                for key, dataset in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = self.precompute_reference(self.eval_dataset, "eval", compute, eval_batch_size)

    def precompute_eval_reference(self, dataset, name: str, compute, column: str):
        """For `prepare_eval_dataset`: with `precompute_ref_log_probs`, adds `compute`'s columns to a dataset given to
        `evaluate` that lacks `column`. Raises once training has started with no reference left to score it."""
        if not self.args.precompute_ref_log_probs or column in (dataset.column_names or []):
            return dataset
        # With no reference model and no adapter to disable, the reference is the policy before its first update.
        if self.ref_model is None and not models.is_peft_model(self.model) and self.state.global_step > 0:
            raise ValueError(
                "Cannot compute reference log-probs for a dataset passed to `evaluate()` after training started: "
                "`precompute_ref_log_probs=True` without `ref_model` keeps no reference. Pass it as "
                "`eval_dataset` when building the trainer, give a `ref_model`, or disable precomputation."
            )
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        return self.precompute_reference(dataset, name, compute, batch_size)

    # -- reference log-probs ---------------------------------------------------------------------------------------
    def precompute_reference(self, dataset: Dataset, name: str, compute, batch_size: int) -> Dataset:
        """Adds the columns returned by `compute(batch) -> {column: Tensor[rows]}` to `dataset`, in order, running the
        collator over it once without gradients. Every process computes the whole dataset (same values everywhere)."""
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        columns = defaultdict(list)
        was_training = self.model.training
        self.model.eval()
        disable = self.args.disable_tqdm or not self.accelerator.is_local_main_process
        for batch in tqdm(loader, desc=f"Reference log-probs for {name}", disable=disable):
            batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self.compute_loss_context_manager():
                for column, values in compute(batch).items():
                    columns[column].append(values.float().cpu())
        self.model.train(was_training)
        for column, values in columns.items():
            dataset = dataset.add_column(column, torch.cat(values).tolist())
        return dataset

    # -- model card ------------------------------------------------------------------------------------------------
    # hf_align's BibTeX entry, cited in every model card next to the algorithm's paper.
    library_citation = (
        "@software{hf_align,\n"
        "  title   = {{hf\\_align: LLM alignment trainers as transformers.Trainer subclasses}},\n"
        "  author  = {{hf\\_align contributors}},\n"
        "  license = {Apache-2.0},\n"
        "  year    = {2026}\n"
        "}"
    )

    @property
    def tags(self) -> list[str]:
        return ["hf_align", self.algorithm.lower()]

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **_):
        """Writes README.md to `output_dir` in the shape of TRL's model cards: a quick start that loads the result
        (a text-generation pipeline; a text-classification one for a reward model), the training procedure (trainer,
        paper, key hyper-parameters, the W&B / trackio run when one was logged to), framework versions and
        citations. Never includes tokens or the full TrainingArguments."""
        import sys  # only to find tracker modules already imported: importing one here would start nothing

        if not self.is_world_process_zero():
            return
        # Only a Hub id names a base model: local paths and the embedded default do not exist there.
        base_model = self.model_name
        if not base_model or os.path.isdir(base_model) or defaults.is_default_model_name(base_model):
            base_model = None
        trainer_name = type(self).__name__
        name = model_name or os.path.basename(os.path.abspath(self.args.output_dir))
        model_id = self.args.hub_model_id or self.args.output_dir
        peft_used = models.is_peft_model(self.model)
        # A reward model (a sequence classifier) scores text; every other trainer's result generates it.
        is_classifier = "ForSequenceClassification" in type(models.unwrap_causal_lm(self.model)).__name__
        paper = self.paper

        wandb, trackio = sys.modules.get("wandb"), sys.modules.get("trackio")
        wandb_url = wandb.run.url if wandb is not None and getattr(wandb, "run", None) is not None else None
        trackio_run = trackio.context_vars.current_run.get() if trackio is not None else None
        trackio_url = None
        if trackio_run is not None and getattr(trackio_run, "_space_id", None):
            # The Space's URL as TRL's `get_trackio_space_url` writes it.
            trackio_url = (f"https://{trackio_run._space_id.replace('/', '-')}.hf.space?project={trackio_run.project}"
                           f"&runs={trackio_run.name}&sidebar=collapsed")

        card_tags = list(dict.fromkeys([*(tags or []), *self.tags, "trl-compatible"]))
        if trackio_url:
            card_tags.append(f"trackio:{trackio_url}")
        data = ModelCardData(
            base_model=base_model, library_name="peft" if peft_used else "transformers", tags=card_tags,
            datasets=[dataset_name] if dataset_name else None, model_name=model_name,
            pipeline_tag="text-classification" if is_classifier else "text-generation",
        )

        origin = f"a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})" if base_model \
            else "a fine-tuned model"
        lines = [
            f"# Model Card for {name}",
            "",
            f"This model is {origin}"
            + (f" on the [{dataset_name}](https://huggingface.co/datasets/{dataset_name}) dataset" if dataset_name
               else "")
            + f". It has been trained with **{trainer_name}** from hf_align ({self.algorithm}), a drop-in for "
              "[TRL](https://github.com/huggingface/trl)'s trainers.",
            "",
            "## Quick start",
            "",
            "```python",
            "from transformers import pipeline",
            "",
        ]
        if is_classifier:
            lines += [
                'text = "Question: What is the capital of France?\\nAnswer: Paris."',
                f'reward_model = pipeline("text-classification", model="{model_id}", function_to_apply="none")',
                'print(reward_model(text)[0]["score"])  # the reward: higher is preferred',
            ]
        else:
            lines += [
                'question = "If you had a time machine, but could only go to the past or the future once and never '
                'return, which would you choose and why?"',
                f'generator = pipeline("text-generation", model="{model_id}", device_map="auto")',
                'output = generator([{"role": "user", "content": question}], max_new_tokens=128, '
                'return_full_text=False)[0]',
                'print(output["generated_text"])',
            ]
        lines += ["```", "", "## Training procedure", ""]
        if wandb_url:
            lines += [f"[Visualize in Weights & Biases]({wandb_url})", ""]
        if trackio_url:
            lines += [f"[Visualize in Trackio]({trackio_url})", ""]
        method = f"This model was trained with {trainer_name} ({self.algorithm})"
        if paper:
            method += f", a method introduced in [{paper['title']}](https://arxiv.org/abs/{paper['id']})"
        lines += [method + ".", "", "### Training hyper-parameters", ""]
        hyper = {
            "learning_rate": self.args.learning_rate,
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "num_train_epochs": self.args.num_train_epochs,
            "max_steps": self.args.max_steps,
            "precision": self.args.precision,
            "seed": self.args.seed,
            **self.card_hyperparameters(),
        }
        lines += [f"- {key}: {value}" for key, value in hyper.items()]
        lines += ["", "### Framework versions", ""]
        packages = ["hf_align", "trl", "transformers", "torch", "datasets", "tokenizers", *(["peft"] if peft_used else [])]
        for package in packages:
            try:
                lines.append(f"- {package}: {version(package.replace('_', '-'))}")
            except Exception:  # noqa: BLE001 - a package missing from metadata only leaves out one line
                continue
        lines += ["", "## Citations", ""]
        if paper.get("citation"):
            lines += [f"Cite {trainer_name} ({self.algorithm}) as:", "", "```bibtex", paper["citation"].strip(), "```",
                      ""]
        lines += ["Cite hf_align as:", "", "```bibtex", self.library_citation, "```"]
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def card_hyperparameters(self) -> dict:
        """Algorithm-specific settings shown in the model card."""
        return {}

    # -- checkpoints -----------------------------------------------------------------------------------------------
    staging_folder: str | None = None  # while `_save_checkpoint` runs: the folder Trainer writes the checkpoint under
    reference_sync = None  # a trainer's TR-DPO reference updates (`reference_sync.ReferenceSync`), when it has them

    def save_training_state(self, checkpoint: str) -> None:
        """Writes into the `checkpoint` folder, on every process, what a resumed run needs beyond what Trainer saved
        there (weights, optimizer, scheduler, RNG, `TrainerState`) to go on exactly as if it had never stopped;
        `load_training_state` reads it back. Here: the `num_tokens` count, the skipped steps and a reference model
        moved by `reference_sync`."""
        if self.args.should_save:
            with open(os.path.join(checkpoint, TRAINING_STATE_NAME), "w") as file:
                json.dump({"num_tokens": getattr(self, "_total_train_tokens", 0), "skipped_steps": self.skipped_steps},
                          file)
        if self.reference_sync is not None:
            self.reference_sync.save(checkpoint)

    def load_training_state(self, checkpoint: str) -> None:
        """Restores what `save_training_state` wrote into `checkpoint`, before training resumes from it."""
        with open(os.path.join(checkpoint, TRAINING_STATE_NAME)) as file:
            state = json.load(file)
        self._total_train_tokens, self.skipped_steps = state["num_tokens"], state["skipped_steps"]
        if self.reference_sync is not None:
            self.reference_sync.load(checkpoint)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`; `resume_from_checkpoint=True` takes the last complete checkpoint in `output_dir`
        (`checkpoints.last_complete_checkpoint`), and resuming also restores what `save_training_state` wrote there."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoints.last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self.load_training_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint and `save_training_state`'s files, written under `checkpoints.STAGING_FOLDER` and
        renamed to `checkpoint-N` once every process has written its part: a folder with a checkpoint's name is
        complete."""
        self.create_model_card()
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        checkpoint = os.path.join(self._get_output_dir(trial), name)
        staging_folder = os.path.join(super()._get_output_dir(trial), checkpoints.STAGING_FOLDER)
        if self.args.should_save:
            checkpoints.clear_for_save(staging_folder, checkpoint)
        self.accelerator.wait_for_everyone()  # nothing is written into a folder being cleared
        self.staging_folder = staging_folder
        try:
            staged = os.path.join(self._get_output_dir(trial), name)
            super()._save_checkpoint(model, trial)
        finally:
            self.staging_folder = None
        self.save_training_state(staged)
        if self.state.best_model_checkpoint == staged:  # Trainer names the best checkpoint where it wrote it
            self.state.best_model_checkpoint = checkpoint
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            checkpoints.publish(staging_folder, staged, checkpoint)
            checkpoints.rotate(os.path.dirname(checkpoint), self.args.save_total_limit,
                               keep=(checkpoint, self.state.best_model_checkpoint))
        if self.args.push_to_hub:
            self._push_from_checkpoint(checkpoint)

    def _get_output_dir(self, trial) -> str:
        """Trainer's run folder; the staging folder while `_save_checkpoint` runs (Trainer writes there)."""
        return self.staging_folder or super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer pushes from inside `_save_checkpoint`, before the checkpoint is complete: it is pushed once published.
        if self.staging_folder is None:
            super()._push_from_checkpoint(checkpoint_folder)
