"""SPIN: Self-Play fIne-tuNing (Chen et al., arXiv 2401.01335).

SPIN improves a model from its SFT data alone. Round t = 0, 1, ... starts from the current policy θt: it samples one
response per prompt from θt, pairs it (`rejected`) with the ground-truth completion (`chosen`), and trains on the pairs
against the reference θt with the logistic loss `ℓ(λ·[log p(y|x)/pθt(y|x) - log p(y'|x)/pθt(y'|x)])` — DPO's
sigmoid loss with β = λ — for `num_train_epochs` (or `max_steps`); θt+1 is the result. At the fixed point the
policy is the data distribution and ground truth and samples can no longer be told apart.

A round's training is a DPO run: its pairs are tokenized as DPO's (`preference.prepare_preference_dataset`), batched by
DPO's collator and trained with DPO's loss, loss types and metrics (`DPOLoss`). What SPIN adds: the rounds, the
generation (`hf_align.generation`), and the reference: θt is the policy at the round's start, so its log-probs of the
round's pairs are computed then, once, with the policy itself — no copy of the weights is kept, for full fine-tuning
and peft alike (the adapter stays active: θt includes it). That is one no-gradient pass over the pairs per round,
cheaper than a frozen reference model (a copy in memory and a forward pass per step).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from transformers.trainer_utils import TrainOutput

from .. import checkpoints, data, distributed, preference
from ..generation import SamplingConfig, generate_completions
from ..sequence_logprobs import batch_logprobs
from ..preference import DataCollatorForPreference
from ..trainer import AlignTrainer
from .dpo import DPOConfig, DPOLoss, DPOTrainer

logger = logging.getLogger(__name__)

ROUND_STATE_NAME = "spin_round"  # in each checkpoint: the round's pairs with θt's log-probs, and the rounds before

SPIN_CITATION = """@inproceedings{chen2024self,
    title     = {{Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models}},
    author    = {Zixiang Chen and Yihe Deng and Huizhuo Yuan and Kaixuan Ji and Quanquan Gu},
    year      = 2024,
    booktitle = {Proceedings of the 41st International Conference on Machine Learning},
}"""


@dataclass
class SPINConfig(DPOConfig):
    """Configuration of `SPINTrainer`: `DPOConfig` plus the rounds and how responses are sampled.

    Defaults are the authors' (their released configs and generation script): β = λ = 0.1, learning rate 5e-7 with a
    10% warm-up, sampling at temperature 0.8 with top-p 0.95 and at most 256 new tokens. `temperature=0` samples
    greedily. `num_train_epochs` / `max_steps` and the learning-rate schedule apply to each round: each round is one
    `Trainer.train()` run with a fresh optimizer, as each SPIN iteration is a fresh fine-tuning run from θt."""

    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate of each round (the authors')."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warm-up of each round (a float < 1: a fraction)."})
    beta: float = field(default=0.1, metadata={"help": "λ of the SPIN loss (DPO's β)."})
    num_rounds: int = field(default=3, metadata={"help": "Self-play rounds: generate, then train against θt."})
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens of a generated response."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    generation_batch_size: int = field(default=32, metadata={"help": "Prompts per `generate` call."})

    def __post_init__(self):
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be at least 1, got {self.num_rounds}.")
        if self.precompute_ref_log_probs:
            raise ValueError(
                "SPIN always computes the reference log-probs itself, at the start of each round (the reference is "
                "the policy then): leave `precompute_ref_log_probs` unset."
            )
        if self.sync_ref_model:
            raise ValueError("SPIN's reference is the policy at the start of each round (θt): leave `sync_ref_model` "
                             "unset.")
        super().__post_init__()

    def sampling(self, seed: int, progress: bool = False) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            batch_size=self.generation_batch_size, seed=seed, progress=progress,
        )


def split_sft_row(row: dict, where: str, *, kind: str, conversational: bool) -> dict:
    """`{"prompt", "completion"}` of an SFT row (`prompt`/`completion`, or `messages` whose last turn is the
    assistant's), checked: `data.DataError` names `where` and the column."""
    if kind == "messages":
        data.check_value(row["messages"], f"{where}, column 'messages'", conversational=True)
        messages = row["messages"]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise data.DataError(
                f"{where}, column 'messages': SPIN needs a prompt and a final assistant turn (the ground truth), got "
                f"roles {[message['role'] for message in messages]}."
            )
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    for column in ("prompt", "completion"):
        data.check_value(row[column], f"{where}, column '{column}'", conversational=conversational)
    return {"prompt": row["prompt"], "completion": row["completion"]}


class SPINTrainer(AlignTrainer):
    """Self-play fine-tuning on SFT data (`prompt`/`completion`, text or conversational, or `messages`).

    `train()` runs `args.num_rounds` rounds. Each starts with `start_round`: one response per prompt is sampled from
    the current policy (`args.sampling`), the pairs (ground truth, sample) are tokenized as DPO pairs, and the
    policy's log-probs of them become the reference columns; `eval_dataset` prompts get pairs the same way. Then
    `Trainer.train()` runs the round with a fresh optimizer and schedule (its steps count from 0; checkpoints go to
    `output_dir/round-<t>/`). After all rounds, `state.log_history` holds every round's logs, each with its `round`
    and a `step` that keeps counting across rounds, and `round_history` holds one summary per round:
    `gap_start` / `eval_gap_start` (mean logp(ground truth) - logp(own sample), summed over tokens, under θt, on the
    round's train / eval pairs), `gap_end` (the train pairs under the policy after the round) and `train_loss`.
    The raw pairs of the current round are in `round_pairs` ("train", and "eval" or "eval_<key>"). Checkpoints also
    hold the round's pairs with θt's log-probs and the rounds before, so that `train(resume_from_checkpoint=...)`
    goes on from any of them.
    """

    config_class = SPINConfig
    algorithm = "SPIN"
    paper = {"title": "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
             "id": "2401.01335", "citation": SPIN_CITATION}
    dataset_columns = DPOTrainer.dataset_columns  # a round trains on DPO pairs with their reference columns

    def __init__(
        self,
        model,
        args: SPINConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if any(optimizer is not None for optimizer in optimizers):
            raise ValueError("SPIN makes a fresh optimizer and schedule for each round: `optimizers` cannot be given.")
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks,
            optimizers, peft_config=peft_config, quantization_config=quantization_config,
        )
        self.dpo_loss = DPOLoss(self)
        self.ref_model = None  # θt scores each round's pairs as it starts (`start_round`): no reference model
        # `prepare_dataset` checked the SFT rows; the Trainer's datasets are the pairs each round makes of them.
        self.sft_datasets = {"train": self.train_dataset, "eval": self.eval_dataset}
        self.train_dataset = self.eval_dataset = None
        self.round: int | None = None
        self.round_pairs: dict[str, Dataset] = {}
        self.round_history: list[dict] = []
        self.round_summary: dict = {}  # the current round's, until it ends
        self.rounds_log_history: list[dict] = []  # the finished rounds' logs, numbered across rounds
        self.rounds_steps = 0  # the finished rounds' steps

    # -- data ------------------------------------------------------------------------------------------------------
    def prepare_dataset(self, dataset, name, args):
        """Checks the SFT rows and keeps them as `prompt` / `completion` (the ground truth)."""
        columns = data.dataset_columns(dataset, name)
        kind = "messages" if "messages" in columns and "prompt" not in columns else "prompt-completion"
        data.check_columns(dataset, name, ["messages"] if kind == "messages" else ["prompt", "completion"])
        conversational = kind == "messages" or data.is_conversational_row(data.first_row(dataset, name), ["prompt"])

        tokenizer = self.tokenizer  # `process` captures no `self`: `datasets` hashes it and may send it to workers

        def process(row, index):
            where = f"{name} dataset, row {index}"
            pair = split_sft_row(row, where, kind=kind, conversational=conversational)
            # Each round renders the prompt to generate from and the ground truth after it: a row the chat template
            # cannot render fails now, not after a round's generation.
            data.tokenize_prompt_completions(tokenizer, pair, ("completion",), where, conversational=conversational)
            return pair

        kwargs = data.map_kwargs(dataset, f"Checking {name}", args.dataset_num_proc)
        return dataset.map(process, with_indices=True, remove_columns=columns, **kwargs)

    def prepare_eval_dataset(self, dataset, name):
        columns = data.dataset_columns(dataset, name)
        if "ref_chosen_logps" in columns:
            return dataset
        raise ValueError(
            "SPIN evaluates on the pairs it builds at the start of each round from `eval_dataset` (with θt as the "
            "reference): pass the held-out SFT rows as `eval_dataset` when building the trainer."
        )

    def default_collator(self, args):
        return DataCollatorForPreference.from_config(self.tokenizer.pad_token_id, args)

    # -- log-probs and loss ----------------------------------------------------------------------------------------
    def policy_logps(self, batch) -> dict[str, torch.Tensor]:
        """The batch's chosen and rejected log-probs (`DPOLoss.pair_logps`) under the current policy, no gradients."""
        with torch.no_grad():
            chosen, rejected = self.dpo_loss.pair_logps(batch_logprobs(self.model, batch))
        return {"chosen_logps": chosen, "rejected_logps": rejected}

    def reference_logps(self, batch) -> dict[str, torch.Tensor]:
        """θt's log-probs: called at the start of a round only, when the policy is θt."""
        return {f"ref_{key}": value for key, value in self.policy_logps(batch).items()}

    def _score(self, dataset, name: str, compute) -> Dataset:
        return self.precompute_reference(
            dataset, name, compute, self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self.dpo_loss(model, inputs)  # every batch of a round's pairs carries θt's log-probs
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _mean_gap(dataset, prefix: str = "") -> float:
        chosen = torch.tensor(list(dataset[f"{prefix}chosen_logps"]))
        rejected = torch.tensor(list(dataset[f"{prefix}rejected_logps"]))
        return (chosen - rejected).mean().item()

    # -- rounds ----------------------------------------------------------------------------------------------------
    def generate_responses(self, prompts: list) -> list:
        """One response per prompt from the current policy, each process sampling its share of the prompts; returned
        in the format of the prompts (a string, or a one-message assistant list)."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        sampling = self.args.sampling(seed=self.args.seed + self.round * world + rank,
                                      progress=not self.args.disable_tqdm and self.accelerator.is_local_main_process)
        with (self.accelerator.split_between_processes(prompts) as shard,
              distributed.gathered_for_generation(self.accelerator, self.model) as generator):
            texts = generate_completions(generator, self.tokenizer, shard, sampling).texts if shard else []
        texts = gather_object(texts)
        if data.is_conversational_row({"prompt": prompts[0]}, ["prompt"]):
            return [[{"role": "assistant", "content": text}] for text in texts]
        # A response of nothing but whitespace stopped at once: keep it, ended by the eos token it sampled.
        return [text if text.strip() else text + self.tokenizer.eos_token for text in texts]

    def build_pairs(self, sft_dataset, name: str) -> Dataset:
        """The round's DPO pairs for `sft_dataset`: ground truth vs a fresh sample of the policy, tokenized, with the
        policy's log-probs of both as the reference columns."""
        round_name = f"{name} (round {self.round})"
        prompts = list(sft_dataset["prompt"])
        pairs = Dataset.from_dict({
            "prompt": prompts, "chosen": list(sft_dataset["completion"]), "rejected": self.generate_responses(prompts),
        })
        self.round_pairs[name] = pairs
        prepared, self.dropped_rows[round_name] = preference.prepare_preference_dataset(
            pairs, self.tokenizer, round_name, self.args
        )
        return self._score(prepared, round_name, self.reference_logps)

    def start_round(self, round_index: int) -> dict:
        """Makes round `round_index`'s train (and eval) pairs from the current policy θt; returns their gaps."""
        self.round = round_index
        self.round_pairs = {}
        self.train_dataset = self.build_pairs(self.sft_datasets["train"], "train")
        summary = {"round": round_index, "gap_start": self._mean_gap(self.train_dataset, "ref_")}
        eval_sets = self.sft_datasets["eval"]
        if isinstance(eval_sets, dict):
            self.eval_dataset = {key: self.build_pairs(ds, f"eval_{key}") for key, ds in eval_sets.items()}
            for key, ds in self.eval_dataset.items():
                summary[f"eval_{key}_gap_start"] = self._mean_gap(ds, "ref_")
        elif eval_sets is not None:
            self.eval_dataset = self.build_pairs(eval_sets, "eval")
            summary["eval_gap_start"] = self._mean_gap(self.eval_dataset, "ref_")
        return summary

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """Runs the SPIN rounds (see the class docstring). `resume_from_checkpoint` (a checkpoint folder of any round,
        or True: the last one saved) goes on from there: that round with the pairs and reference log-probs it had, then
        the rounds after it, as the uninterrupted run would have. The returned `training_loss`, and the resumed
        round's `train_loss`, average the steps trained in this call (`Trainer.train`'s convention)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self.last_checkpoint()
        first_round, resumed_step = 0, 0
        if resume_from_checkpoint:
            resumed_step = self.resume_round(resume_from_checkpoint)
            first_round = self.round
        else:
            self.rounds_log_history, self.rounds_steps = [], 0
        trained_steps, trained_loss, output = 0, 0.0, None
        for round_index in range(first_round, self.args.num_rounds):
            resume = resume_from_checkpoint if round_index == first_round else None
            if not resume:
                self.round_summary = self.start_round(round_index)
            self.optimizer = None  # a fresh optimizer; `Trainer.train()` builds a fresh schedule for it
            output = super().train(resume_from_checkpoint=resume, trial=trial,
                                   ignore_keys_for_eval=ignore_keys_for_eval)
            summary = self.round_summary
            summary["gap_end"] = self._mean_gap(self._score(self.train_dataset, "gap", self.policy_logps))
            summary["train_loss"] = output.training_loss
            self.log(dict(summary))
            self.round_history.append(summary)
            logger.info("SPIN round %d: %s", round_index, summary)
            self.rounds_log_history += [
                {**entry, "round": round_index, "step": self.rounds_steps + entry.get("step", 0)}
                for entry in self.state.log_history
            ]
            self.rounds_steps += self.state.global_step
            steps = self.state.global_step - (resumed_step if resume else 0)
            trained_steps += steps
            trained_loss += output.training_loss * steps
        self.state.log_history = self.rounds_log_history
        self.state.global_step = self.rounds_steps
        training_loss = trained_loss / max(trained_steps, 1)
        return TrainOutput(self.rounds_steps, training_loss, {**output.metrics, "train_loss": training_loss})

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def round_datasets(self) -> dict[str, Dataset]:
        """The round's tokenized pairs with their reference columns, named as in `round_pairs`."""
        if isinstance(self.eval_dataset, dict):
            return {"train": self.train_dataset, **{f"eval_{key}": ds for key, ds in self.eval_dataset.items()}}
        return {"train": self.train_dataset, **({} if self.eval_dataset is None else {"eval": self.eval_dataset})}

    def save_training_state(self, checkpoint: str) -> None:
        # θt, which sampled the round's pairs and scored them as the reference, is gone by now: keep what it made.
        super().save_training_state(checkpoint)
        if not self.args.should_save:
            return
        folder = os.path.join(checkpoint, ROUND_STATE_NAME)
        for name, dataset in self.round_datasets().items():
            dataset.save_to_disk(os.path.join(folder, "pairs", name))
        for name, pairs in self.round_pairs.items():
            pairs.save_to_disk(os.path.join(folder, "raw_pairs", name))
        rounds = {"round": self.round, "step": self.state.global_step, "summary": self.round_summary,
                  "round_history": self.round_history, "log_history": self.rounds_log_history,
                  "steps": self.rounds_steps}
        with open(os.path.join(folder, "rounds.json"), "w") as file:
            json.dump(rounds, file)

    def resume_round(self, checkpoint: str) -> int:
        """Restores the round `checkpoint` was saved in (its pairs and reference log-probs) and the rounds before it;
        returns the round's step the checkpoint was saved at."""
        folder = os.path.join(checkpoint, ROUND_STATE_NAME)
        with open(os.path.join(folder, "rounds.json")) as file:
            rounds = json.load(file)
        self.round, self.round_summary, self.round_history = rounds["round"], rounds["summary"], rounds["round_history"]
        self.rounds_log_history, self.rounds_steps = rounds["log_history"], rounds["steps"]

        def load(kind: str) -> dict[str, Dataset]:
            names = sorted(os.listdir(os.path.join(folder, kind)))
            return {name: Dataset.load_from_disk(os.path.join(folder, kind, name), keep_in_memory=True)
                    for name in names}

        self.round_pairs = load("raw_pairs")
        datasets = load("pairs")
        self.train_dataset = datasets.pop("train")
        if isinstance(self.sft_datasets["eval"], dict):
            self.eval_dataset = {name.removeprefix("eval_"): dataset for name, dataset in datasets.items()}
        else:
            self.eval_dataset = datasets.get("eval")
        return rounds["step"]

    def last_checkpoint(self) -> str:
        """The last complete checkpoint of the last round that saved one (an interrupted save is skipped)."""
        for round_index in reversed(range(self.args.num_rounds)):
            folder = os.path.join(self.args.output_dir, f"round-{round_index}")
            checkpoint = checkpoints.last_complete_checkpoint(folder) if os.path.isdir(folder) else None
            if checkpoint:
                return checkpoint
        raise ValueError(f"No checkpoint found in {self.args.output_dir}/round-*/ to resume from.")

    def _get_output_dir(self, trial) -> str:
        # Each round's steps count from 0: its checkpoints get their own folder, or a later round would overwrite them.
        return os.path.join(super()._get_output_dir(trial), f"round-{self.round}")

    def card_hyperparameters(self) -> dict:
        return {**self.dpo_loss.card_hyperparameters(), "num_rounds": self.args.num_rounds,
                "max_new_tokens": self.args.max_new_tokens, "temperature": self.args.temperature}
