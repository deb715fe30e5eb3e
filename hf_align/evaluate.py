"""Evaluating a model against its reference: preference accuracy and implicit-reward margins on held-out pairs,
reward-model scores and win rate of its completions, perplexity on held-out text and completion length.

`evaluate(model, tokenizer, ...)` computes whichever metrics its inputs allow, under these names (`METRICS`):

- `preference_accuracy`, `reward_margin` (from `pairs`): the fraction of pairs whose chosen completion gets a higher
  implicit reward than the rejected one (strictly, as DPO's `rewards/accuracies`), and the mean difference of the two
  rewards (DPO's `rewards/margins`). The implicit reward is β · (log π − log π_ref), summed over the completion's
  tokens; with no reference, the policy's summed log-prob.
- `reward_score` (from `prompts` and `reward_model`): the mean reward of the model's completions to the prompts.
- `win_rate` (from `prompts`, a reference, and `judge` or `reward_model`): how often the model's completion beats the
  reference's completion to the same prompt, ties counting 1/2.
- `perplexity` (from `texts`): exp of the negative log-likelihood per token over all the texts (token-weighted).
- `completion_length` (from `prompts`): the mean number of tokens of the model's completions, stop token included;
  when it climbs with the reward, the model may be winning by length (length hacking).

The functions behind them are usable alone (`prepare_pairs`, `pair_logps`, `implicit_rewards`, `preference_metrics`,
`perplexity`, `generation_metrics`, `score_completions`, `score_win_rate`, `judge_win_rate`). `EvaluationCallback`
runs `evaluate` during training and logs the metrics as `eval_<name>`; `hf-align eval` (`main`) runs it from the
command line and prints them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from . import data, defaults, models, preference
from .generation import Completions, SamplingConfig, generate_completions
from .logprobs import completion_logprobs
from .rewards import RewardScorer, loading_args

__all__ = [
    "METRICS",
    "EvaluationCallback",
    "evaluate",
    "generation_metrics",
    "has_reference",
    "implicit_rewards",
    "judge_win_rate",
    "pair_logps",
    "perplexity",
    "preference_metrics",
    "prepare_pairs",
    "score_completions",
    "score_win_rate",
]

METRICS = {
    "preference_accuracy": "fraction of pairs whose chosen completion has the higher implicit reward (strictly)",
    "reward_margin": "mean implicit reward of the chosen completion minus that of the rejected one",
    "reward_score": "mean reward of the model's completions to the prompts",
    "win_rate": "fraction of prompts where the model's completion beats the reference's, ties counting 1/2",
    "perplexity": "exp(negative log-likelihood per token) over the texts",
    "completion_length": "mean tokens of the model's completions to the prompts, stop token included",
}
DEFAULT_MAX_LENGTH = 1024  # AlignConfig's


@contextmanager
def _evaluating(model):
    """`model` in eval mode without gradients, back in its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def has_reference(model, reference) -> bool:
    """Whether `model` is evaluated against a reference: `reference` itself, or a peft model's base model."""
    return reference is not None or models.is_peft_model(model)


# ---------------------------------------------------------------------------------------------------- pairs


def prepare_pairs(pairs, tokenizer, max_length: int | None = DEFAULT_MAX_LENGTH) -> Dataset:
    """Pairs in any of DPO's formats (a `Dataset` or a list of rows: prompt explicit or implicit, text or
    conversational) validated and tokenized as `DPOTrainer` does; a dataset that already holds `prompt_ids` is
    returned as it is."""
    if isinstance(pairs, list):
        pairs = Dataset.from_list(pairs)
    if "prompt_ids" in pairs.column_names:
        return pairs
    args = SimpleNamespace(max_length=max_length, truncation_mode="keep_start", dataset_num_proc=None)
    prepared, _ = preference.prepare_preference_dataset(pairs, tokenizer, "pairs", args)
    return prepared


def pair_logps(model, tokenizer, pairs: Dataset, *, max_length: int | None = DEFAULT_MAX_LENGTH,
               batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs `[P]` (CPU) of the chosen and of the rejected completion of each prepared pair
    (`prepare_pairs`) under `model`."""
    collator = preference.DataCollatorForPreference(tokenizer.pad_token_id, max_length)
    device = _device(model)
    chosen, rejected = [], []
    with _evaluating(model):
        for batch in DataLoader(pairs, batch_size=batch_size, collate_fn=collator):
            batch = {key: value.to(device) for key, value in batch.items()}
            logps = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            batch_chosen, batch_rejected = logps.sum.cpu().chunk(2)
            chosen.append(batch_chosen)
            rejected.append(batch_rejected)
    return torch.cat(chosen), torch.cat(rejected)


def implicit_rewards(model, tokenizer, pairs, *, reference=None, beta: float = 0.1,
                     max_length: int | None = DEFAULT_MAX_LENGTH, batch_size: int = 16
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards `[P]` of each pair's chosen and rejected completions, β · (log π − log π_ref) summed over
    the completion tokens, against `reference` (see `evaluate`); with no reference, the summed log-probs log π."""
    pairs = prepare_pairs(pairs, tokenizer, max_length)
    chosen, rejected = pair_logps(model, tokenizer, pairs, max_length=max_length, batch_size=batch_size)
    if not has_reference(model, reference):
        return chosen, rejected
    with models.reference_model(model, reference) as reference_module:
        ref_chosen, ref_rejected = pair_logps(reference_module, tokenizer, pairs, max_length=max_length,
                                              batch_size=batch_size)
    return beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """`preference_accuracy` (chosen strictly above rejected, as DPO's `rewards/accuracies`) and `reward_margin`."""
    return {
        "preference_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
    }


# ---------------------------------------------------------------------------------------------------- texts


def perplexity(model, tokenizer, texts: list, *, max_length: int | None = DEFAULT_MAX_LENGTH,
               batch_size: int = 16) -> float:
    """exp(−Σ log p / tokens) over every token of every text but its first (nothing predicts it), each text
    tokenized as `SFTTrainer` tokenizes a language-modeling row (eos appended to a string; a message list through the
    chat template) and cut to its first `max_length` tokens."""
    if not texts:
        raise ValueError("`texts` is empty: no token to score.")
    conversational = data.is_conversational_row({"text": texts[0]}, ["text"])
    rows = []
    for index, text in enumerate(texts):
        data.check_value(text, f"texts[{index}]", conversational=conversational)
        ids = data.tokenize_sequence(tokenizer, {}, text, conversational=conversational)["input_ids"]
        rows.append(torch.tensor(data.truncate(ids, max_length, "keep_start")))
    device = _device(model)
    total_logp, total_tokens = 0.0, 0
    with _evaluating(model):
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            input_ids = data.pad(batch, tokenizer.pad_token_id).to(device)
            attention_mask = data.pad([torch.ones_like(ids) for ids in batch], 0).to(device)
            logps = completion_logprobs(model, input_ids, attention_mask, attention_mask)
            total_logp += logps.sum.sum().item()
            total_tokens += int(logps.lengths.sum().item())
    return math.exp(-total_logp / total_tokens)


# ---------------------------------------------------------------------------------------------------- completions


def _completions_for_scoring(prompts: list, texts: list[str]) -> list:
    """Completions as reward functions and judges take them: text, or one assistant message for conversational
    prompts (TRL's format)."""
    if data.is_conversational_row({"prompt": prompts[0]}, ["prompt"]):
        return [[{"role": "assistant", "content": text}] for text in texts]
    return list(texts)


def score_completions(scorer: RewardScorer, prompts: list, completions: Completions,
                      columns: dict[str, list] | None = None) -> torch.Tensor:
    """The weighted reward `[N]` (CPU) of one completion per prompt under `scorer`'s reward models and functions
    (NaN where none applies). `columns`: other dataset columns for reward functions, one value per prompt."""
    completion_ids = [ids[:length].tolist() for ids, length in zip(completions.completion_ids, completions.lengths)]
    per_func = scorer.score(prompts, _completions_for_scoring(prompts, completions.texts), completion_ids, columns)
    return scorer.combine(per_func)


def score_win_rate(scores: torch.Tensor, reference_scores: torch.Tensor) -> float:
    """The fraction of samples whose score beats the reference's score, a tie counting 1/2; a sample that either
    side left unscored (NaN) is left out."""
    scored = ~(scores.isnan() | reference_scores.isnan())
    wins = (scores > reference_scores).float() + 0.5 * (scores == reference_scores).float()
    return wins[scored].mean().item()


def judge_win_rate(judge, prompts: list, completions: list, reference_completions: list) -> float:
    """The model's win rate by a pairwise `judge` (`rank(prompts, completions_a, completions_b) -> list[int]`, 0 when
    A is preferred, e.g. `hf_align.verifiers.JudgeReward`). Each pair is judged in both orders and scores the share of
    the two verdicts that prefer the model's completion: 1, 1/2 (a tie, or a judge that always favours one position)
    or 0."""
    model_first = judge.rank(prompts, completions, reference_completions)
    reference_first = judge.rank(prompts, reference_completions, completions)
    wins = [((a == 0) + (b == 1)) / 2 for a, b in zip(model_first, reference_first)]
    return sum(wins) / len(wins)


def _prompts_and_columns(prompts) -> tuple[list, dict[str, list] | None]:
    """A list of prompts, or a dataset's `prompt` column and its other columns (for reward functions)."""
    if isinstance(prompts, Dataset):
        data.check_columns(prompts, "prompts", ["prompt"])
        return list(prompts["prompt"]), {key: list(prompts[key]) for key in prompts.column_names if key != "prompt"}
    return list(prompts), None


def generation_metrics(model, tokenizer, prompts, sampling: SamplingConfig, *, reference=None, reward_model=None,
                       judge=None) -> dict[str, float]:
    """`completion_length`, and with a reward model `reward_score`, and with a reference and a judge or a reward model
    `win_rate`, of one completion per prompt from `model` and from the reference, generated with `sampling`."""
    prompts, columns = _prompts_and_columns(prompts)
    completions = generate_completions(model, tokenizer, prompts, sampling)
    metrics = {"completion_length": completions.lengths.float().mean().item()}
    scorer = reward_model
    if scorer is not None and not isinstance(scorer, RewardScorer):
        scorer = RewardScorer(scorer, device=_device(model))
    if scorer is not None:
        scores = score_completions(scorer, prompts, completions, columns)
        metrics["reward_score"] = torch.nanmean(scores).item()
    if has_reference(model, reference) and (judge is not None or scorer is not None):
        with models.reference_model(model, reference) as reference_module:
            reference_completions = generate_completions(reference_module, tokenizer, prompts, sampling)
        if judge is not None:
            metrics["win_rate"] = judge_win_rate(judge, prompts, _completions_for_scoring(prompts, completions.texts),
                                                 _completions_for_scoring(prompts, reference_completions.texts))
        else:
            reference_scores = score_completions(scorer, prompts, reference_completions, columns)
            metrics["win_rate"] = score_win_rate(scores, reference_scores)
    return metrics


# ---------------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model,
    tokenizer,
    *,
    reference=None,
    pairs=None,
    prompts=None,
    texts: list | None = None,
    reward_model=None,
    judge=None,
    beta: float = 0.1,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = 0,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    batch_size: int = 16,
) -> dict[str, float]:
    """The metrics of `METRICS` that the inputs allow, for `model` (a causal LM, possibly a peft model) and its
    `tokenizer`, without gradients:

    - `reference`: the model compared against (an object, or an id / path loaded onto the model's device), sharing
      the model's tokenizer. None: a peft model is compared against its reference adapter (the starting one a
      trainer kept) or else its base (adapter disabled), as the trainers do; any other model against nothing
      (`win_rate` is left out, and the implicit rewards are summed log-probs).
    - `pairs`: preference pairs in any of DPO's formats (or already prepared by `prepare_pairs`): gives
      `preference_accuracy` and `reward_margin`, with implicit rewards β · (log π − log π_ref).
    - `prompts`: a list of prompts (strings or message lists) or a dataset with a `prompt` column (its other columns
      go to reward functions): gives `completion_length`; with `reward_model`, `reward_score`; with a reference and
      `judge` or `reward_model`, `win_rate` (by the judge when there is one).
    - `texts`: strings or message lists: gives `perplexity`.
    - `reward_model`: a reward model (one-label sequence classifier, or its id / path), a reward function with TRL's
      signature, a list of them, or a `RewardScorer` of them (build one once to evaluate repeatedly). `judge`: a
      pairwise judge (`rank(prompts, completions_a, completions_b)`, e.g. `verifiers.JudgeReward`).

    Completions are greedy (`temperature=0`) unless `temperature` is set; sampling is then reproducible from `seed`.
    Sequences are cut to `max_length` tokens; `batch_size` sequences (or prompts) are scored (or generated) at once.
    """
    tokenizer = models.prepare_tokenizer(tokenizer, models.unwrap_causal_lm(model))
    if isinstance(reference, str):
        reference = models.freeze(models.load_model(reference, loading_args(None))).to(_device(model))
    metrics = {}
    if pairs is not None:
        rewards = implicit_rewards(model, tokenizer, pairs, reference=reference, beta=beta, max_length=max_length,
                                   batch_size=batch_size)
        metrics.update(preference_metrics(*rewards))
    if prompts is not None:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                  batch_size=batch_size)
        metrics.update(generation_metrics(model, tokenizer, prompts, sampling, reference=reference,
                                          reward_model=reward_model, judge=judge))
    if texts is not None:
        metrics["perplexity"] = perplexity(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return metrics


class EvaluationCallback(TrainerCallback):
    """Runs `evaluate` on `trainer`'s model before the first step and every `every_n_steps` optimizer steps, and logs
    the metrics named `eval_<metric>` (e.g. `eval_preference_accuracy`) through the trainer's log, so they reach
    `report_to` and `trainer.state.log_history`.

    `evaluate_kwargs` are `evaluate`'s (`pairs`, `prompts`, `texts`, `reward_model`, `judge`, `beta`, ...); pass
    `beta=args.beta` to match a DPO-style trainer's `rewards/*`. Unless `reference` is given, the reference is the
    trainer's: its `ref_model`; with none, a peft model's reference adapter or base; otherwise none (a reference-free
    trainer, or `precompute_ref_log_probs` without `ref_model`). Pairs are prepared and reward models loaded once,
    here. Add it with `trainer.add_callback(EvaluationCallback(trainer, ...))`. Under
    several processes, each evaluates the whole data."""

    def __init__(self, trainer: Trainer, every_n_steps: int, **evaluate_kwargs):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        kwargs = {"reference": getattr(trainer, "ref_model", None), **evaluate_kwargs}
        if kwargs.get("pairs") is not None:
            max_length = kwargs.get("max_length", DEFAULT_MAX_LENGTH)
            kwargs["pairs"] = prepare_pairs(kwargs["pairs"], self.tokenizer, max_length)
        reward_model = kwargs.get("reward_model")
        if reward_model is not None and not isinstance(reward_model, RewardScorer):
            kwargs["reward_model"] = RewardScorer(reward_model, device=trainer.accelerator.device)
        self.evaluate_kwargs = kwargs

    def _evaluate_and_log(self, control) -> None:
        with self.trainer.compute_loss_context_manager():  # the trainer's mixed precision
            metrics = evaluate(self.trainer.model, self.tokenizer, **self.evaluate_kwargs)
        should_log = control.should_log
        # `Trainer.log` itself: hf_align's (and TRL's) trainers add the training metrics gathered since their last log
        # to any log, and clear them, which would move them into this entry.
        Trainer.log(self.trainer, {f"eval_{name}": value for name, value in metrics.items()})
        # Logging clears `should_log`, which the trainer's own log at this step may still need.
        control.should_log = should_log

    def on_train_begin(self, args, state, control, **kwargs):
        self._evaluate_and_log(control)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._evaluate_and_log(control)


# ---------------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """`hf-align eval`: evaluates a model (by default the embedded tiny one) against `--ref_model` on the held-out
    split of a pairwise dataset (by default the embedded pairs' test split): its pairs, its prompts and its
    prompt + chosen texts, and prints the metrics as JSON."""
    from .scripts import ScriptArguments, load_data

    parser = argparse.ArgumentParser(
        prog="hf-align eval",
        description="Evaluates a model against a reference on the held-out split of a pairwise dataset (its pairs, "
                    "completions to its prompts, and its prompt + chosen texts for perplexity) and prints the metrics "
                    "as JSON: " + "; ".join(f"{name}: {text}" for name, text in METRICS.items()) + ".",
    )
    parser.add_argument("--model_name_or_path", default=defaults.DEFAULT_MODEL_NAME,
                        help="Hub id or local path of the model (default: the embedded tiny chat model)")
    parser.add_argument("--ref_model", default=None, help="the reference model (default: none)")
    parser.add_argument("--dataset_name", default=None, help="pairwise dataset, Hub id or local .json/.jsonl/.parquet "
                        "file, in any of DPO's formats (default: the embedded pairs)")
    parser.add_argument("--dataset_config", default=None, help="dataset configuration name")
    parser.add_argument("--dataset_test_split", default="test", help="the held-out split (default: test)")
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate on the first N rows only")
    parser.add_argument("--reward_model", default=None, help="reward model id or path, for reward_score and win_rate")
    parser.add_argument("--beta", type=float, default=0.1, help="β of the implicit rewards (default: 0.1)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens per completion at most (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling (temperature > 0)")
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per sequence at most")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences scored or generated at once")
    args = parser.parse_args(argv)

    script_args = ScriptArguments(dataset_name=args.dataset_name, dataset_config=args.dataset_config,
                                  dataset_test_split=args.dataset_test_split)
    _, held_out = load_data(script_args, "preference")
    if held_out is None:
        print(f"hf-align eval: error: {args.dataset_name!r} has no split {args.dataset_test_split!r}; name the "
              "held-out split with --dataset_test_split.", file=sys.stderr)
        return 2
    if args.max_samples is not None:
        held_out = held_out.select(range(min(args.max_samples, len(held_out))))
    try:
        held_out = data.extract_implicit_prompt(held_out, "held-out")
        held_out = data.check_rows(held_out, "held-out", ("prompt", "chosen", "rejected"))
    except data.DataError as error:
        print(f"hf-align eval: error: {error}", file=sys.stderr)
        return 2
    model = models.load_model(args.model_name_or_path, loading_args(None))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = models.load_tokenizer(model, loading_args(None))
    texts = [prompt + chosen for prompt, chosen in zip(held_out["prompt"], held_out["chosen"])]
    metrics = evaluate(
        model, tokenizer, reference=args.ref_model, pairs=held_out, prompts=held_out["prompt"], texts=texts,
        reward_model=args.reward_model, beta=args.beta, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, max_length=args.max_length, batch_size=args.batch_size,
    )
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
