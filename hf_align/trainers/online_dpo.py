"""Online DPO (Guo et al., "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792). A drop-in for
`trl.experimental.online_dpo.OnlineDPOTrainer` / `OnlineDPOConfig`: same constructor (argument order included),
dataset format (`prompt`, text or conversational, plus any columns the reward functions read), Config field names
and defaults, loss and logged metric names.

For each prompt, two completions are sampled from the current policy and ranked: by reward functions / reward models
(the higher weighted sum is chosen, the first sample on a tie, `missing_eos_penalty` subtracted from completions
without a stop token), or, with `judge=`, by a pairwise judge (RLAIF, Constitutional AI, arXiv 2212.08073), e.g.
`hf_align.verifiers.JudgeReward`. The loss is DPO's on the pair against the reference, from summed log-probs:
`-log σ(β h)` (`sigmoid`) or `(h - 1/(2β))²` (`ipo`), `h = [logp(yw) - ref(yw)] - [logp(yl) - ref(yl)]`.

Where it differs from TRL 1.16:

- `per_device_train_batch_size` (and `per_device_eval_batch_size`) counts completions, two per prompt, as in every
  hf_align online trainer and TRL's GRPOConfig; TRL's OnlineDPOConfig counts prompts. The defaults (16) are TRL's
  (8 prompts).
- `objective/kl`, `objective/non_score_reward`, `objective/rlhf_reward` and `objective/entropy` sum over each
  completion's tokens; TRL's sums also take the padding after a completion's stop token.
- `judge` is hf_align's (TRL 1.16's trainer takes no judge). Generation runs on transformers, without vLLM,
  `min_p`, `repetition_penalty`, `generation_kwargs` or `cache_implementation`. Reward functions get each
  completion's ids without padding. A list of β picks one per epoch (TRL's indexing by the float epoch fails).
- IPO uses summed log-ratios, as TRL's OnlineDPOTrainer does; hf_align's offline IPO divides them by length.
- Evaluation works: it samples pairs for the eval prompts and logs the same metrics with an `eval_` prefix.
- `reward_model_path`, inert in TRL's trainer, is loaded as the reward model when the trainer is given neither
  `reward_funcs` nor `judge` (what TRL's online_dpo script does with it).
- The completions table (`log_completions`) shows each completion's ranking score under its reward functions' names
  and no advantage column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather

from .. import losses
from ..generation import stop_token_ids
from ..online import OnlineConfig, OnlineTrainer
from ..rollout import Rollout

logger = logging.getLogger(__name__)

ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")

ONLINE_DPO_CITATION = """@article{guo2024direct,
    title   = {{Direct Language Model Alignment from Online AI Feedback}},
    author  = {Shangmin Guo and Biao Zhang and Tianlin Liu and Tianqi Liu and Misha Khalman and Felipe Llinares and Alexandre Ram{\\'e} and Thomas Mesnard and Yao Zhao and Bilal Piot and Johan Ferret and Mathieu Blondel},
    year    = 2024,
    eprint  = {arXiv:2402.04792},
}"""


@dataclass
class OnlineDPOConfig(OnlineConfig):
    """Configuration of `OnlineDPOTrainer`: TRL's OnlineDPOConfig names and defaults, on top of `OnlineConfig`
    (generation and batch arithmetic). Batch sizes count completions, two per prompt. Of `OnlineConfig`'s fields,
    the clipping ranges (`epsilon`, `epsilon_high`) do not apply and `mask_truncated_completions` is refused."""

    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate (TRL's default)."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Completions per device per step, two per prompt (16: TRL's 8 prompts)."}
    )
    per_device_eval_batch_size: int = field(
        default=16, metadata={"help": "Completions per device per eval step, two per prompt."}
    )
    num_generations: int = field(default=2, metadata={"help": "Completions per prompt: always 2 (a pair)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens of a sampled completion."})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Set from max_new_tokens (TRL's OnlineDPOConfig name); leave unset."}
    )
    max_length: int | None = field(
        default=512,
        metadata={"help": "Most tokens of prompt + completion when scoring; the prompt's start is cut (None: no "
                          "limit). Sampling sees the whole prompt."},
    )
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature (log-probs do not use it)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a completion with no stop token (>= 0)."}
    )
    beta: list[float] = field(
        default_factory=lambda: [0.1],
        metadata={"help": "β (τ for IPO): the strength of the implicit KL to the reference. Several values: one per "
                          "epoch, the last one for the remaining epochs."},
    )
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {ONLINE_DPO_LOSS_TYPES}."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A reward model (Hub id or folder, a one-label sequence classifier) that "
                                          "ranks the pairs when the trainer is given neither reward_funcs nor a judge "
                                          "(TRL's online_dpo script loads it so)."}
    )
    vllm_gpu_memory_utilization: float | None = field(
        default=0.55, metadata={"help": "GPU memory share of the colocated vLLM engine (TRL's Online DPO default)."}
    )

    def __post_init__(self):
        betas = list(self.beta) if isinstance(self.beta, (list, tuple)) else [self.beta]
        if not betas or any(b <= 0 for b in betas):
            raise ValueError(f"beta must be > 0 (one value, or one per epoch), got {self.beta}.")
        self.beta = betas[0] if len(betas) == 1 else betas
        if self.loss_type not in ONLINE_DPO_LOSS_TYPES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}; expected one of {ONLINE_DPO_LOSS_TYPES}.")
        if self.num_generations != 2 or self.num_generations_eval not in (None, 2):
            raise ValueError("Online DPO samples exactly 2 completions per prompt (a pair): leave num_generations "
                             "and num_generations_eval unset.")
        if self.max_completion_length not in (None, self.max_new_tokens):
            raise ValueError("Online DPO's completion length is `max_new_tokens` (TRL's name): set that, not "
                             "max_completion_length.")
        self.max_completion_length = self.max_new_tokens
        if self.max_length is not None and self.max_length <= self.max_new_tokens:
            raise ValueError(f"max_length ({self.max_length}) must exceed max_new_tokens ({self.max_new_tokens}), "
                             "or no prompt token would be left to score a completion against.")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}.")
        if self.mask_truncated_completions:
            raise ValueError("mask_truncated_completions does not apply to Online DPO (a pair needs both "
                             "completions); use missing_eos_penalty to rank truncated completions lower.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name} ({getattr(self, name)}) counts completions, two per prompt in Online DPO "
                                 "(TRL's OnlineDPOConfig counts prompts): use an even number, twice TRL's value.")
        super().__post_init__()

    def kl_controller(self) -> None:
        return None  # β is the DPO loss's (a list: one per epoch), not a KL coefficient in a reward


class PairwiseJudgePreference:
    """A pairwise judge as a reward function: in each pair of completions (rows 2p and 2p+1, the two samples of one
    prompt) the one `judge.rank(prompts, completions_a, completions_b)` prefers (0: the first, 1: the second) gets
    1.0 and the other 0.0, so ranking by reward is ranking by the judge."""

    def __init__(self, judge):
        if not callable(getattr(judge, "rank", None)):
            raise TypeError(f"judge is a {type(judge).__name__} without a `rank(prompts, completions_a, completions_b) "
                            "-> list[int]` method (e.g. hf_align.verifiers.JudgeReward).")
        self.judge = judge
        self.__name__ = getattr(judge, "__name__", type(judge).__name__)

    def to(self, device) -> PairwiseJudgePreference:
        # RewardScorer moves reward functions to the training device: pass that on to the judge's model.
        if callable(getattr(self.judge, "to", None)):
            self.judge.to(device)
        return self

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if len(completions) % 2:
            raise ValueError(f"The judge '{self.__name__}' ranks the two completions of a prompt together and cannot "
                             f"score {len(completions)} alone (after a failure of the judge on a whole batch, which "
                             "is re-run one sample at a time, that failure is the cause).")
        ranks = list(self.judge.rank(list(prompts[0::2]), list(completions[0::2]), list(completions[1::2])))
        if len(ranks) != len(completions) // 2 or any(rank not in (0, 1) for rank in ranks):
            raise ValueError(f"The judge '{self.__name__}' must return one rank, 0 or 1, per pair of completions "
                             f"({len(completions) // 2} pairs), got {ranks!r:.200}.")
        return [score for rank in ranks for score in ((1.0, 0.0) if rank == 0 else (0.0, 1.0))]


def has_stop_token(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                         stop_ids: list[int]) -> torch.Tensor:
    """`[N]` bool: whether each completion holds a stop token (completions are cut right after their first one)."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    return (is_stop & completion_mask.bool()).any(-1)


def pair_by_preference(rollout: Rollout, scores: torch.Tensor, has_stop: torch.Tensor) -> Rollout:
    """A rollout whose rows 2p and 2p+1 are the two completions of prompt p, as one row per pair: per-completion
    tensors become `[P, 2, ...]`, the chosen completion (the higher score; the first on a tie, as TRL) then the
    rejected one; prompt tensors `[P, L]`; `scores` and `has_stop` (`[N]`) become the extras `[P, 2]`. The
    completions' texts and rows are not carried (the loss reads tensors)."""
    rows = rollout.num_rows
    if rows % 2 or not torch.equal(rollout.prompt_ids[0::2], rollout.prompt_ids[1::2]):
        raise RuntimeError("Online DPO expects the two completions of each prompt in adjacent rows; this rollout "
                           "does not hold them so.")
    first = torch.arange(0, rows, 2, device=scores.device)
    first_wins = scores[0::2] >= scores[1::2]
    order = torch.stack([torch.where(first_wins, first, first + 1), torch.where(first_wins, first + 1, first)], 1)
    per_completion = {name: getattr(rollout, name)[order] for name in PAIRED_FIELDS
                      if getattr(rollout, name) is not None}
    return Rollout(prompt_ids=rollout.prompt_ids[0::2], prompt_mask=rollout.prompt_mask[0::2], **per_completion,
                   extras={"scores": scores[order], "has_stop_token": has_stop[order]},
                   num_items_in_batch=rollout.num_items_in_batch)


# The per-completion fields Online DPO's loss and metrics read.
PAIRED_FIELDS = ("completion_ids", "completion_mask", "ref_logps", "is_truncated", "completion_lengths")


def unpaired(pairs: Rollout) -> Rollout:
    """The rows `completion_token_logprobs` scores from a batch of pairs: pair p's chosen completion as row 2p, its
    rejected one as row 2p + 1, each after the pair's prompt."""
    return Rollout(
        prompt_ids=pairs.prompt_ids.repeat_interleave(2, dim=0),
        prompt_mask=pairs.prompt_mask.repeat_interleave(2, dim=0),
        completion_ids=pairs.completion_ids.flatten(0, 1),
        completion_mask=pairs.completion_mask.flatten(0, 1),
    )


def cut_prompts_to_fit(rollout: Rollout, max_length: int | None) -> Rollout:
    """The rollout with its left-padded prompt columns cut from the left so that prompt + completion columns fit in
    `max_length` (TRL's truncation of the scoring pass; None: unchanged)."""
    if max_length is None:
        return rollout
    excess = rollout.prompt_ids.size(1) + rollout.completion_ids.size(1) - max_length
    if excess <= 0:
        return rollout
    return rollout.replace(prompt_ids=rollout.prompt_ids[:, excess:], prompt_mask=rollout.prompt_mask[:, excess:])


class OnlineDPOTrainer(OnlineTrainer):
    """Trains `model` (an object or an id) with Online DPO against `ref_model` (a model or an id; by default the
    model with its adapter disabled under peft, else a frozen in-memory copy). Pairs are ranked by `reward_funcs`
    (callables with TRL's signature `f(prompts, completions, completion_ids, **columns)`, reward models, or a list,
    weighted by `args.reward_weights`) or by `judge`, an object with `rank(prompts, completions_a, completions_b)
    -> list[int]` (0 when A is preferred), e.g. `hf_align.verifiers.JudgeReward`. `data_collator`,
    `compute_metrics` and `preprocess_logits_for_metrics` keep TRL's argument order and must stay None."""

    config_class = OnlineDPOConfig
    algorithm = "Online-DPO"
    paper = {"title": "Direct Language Model Alignment from Online AI Feedback", "id": "2402.04792",
             "citation": ONLINE_DPO_CITATION}

    def __init__(
        self,
        model,
        ref_model=None,
        reward_funcs=None,
        args: OnlineDPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        peft_config=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        *,
        judge=None,
        quantization_config=None,
    ):
        unsupported = {"data_collator": data_collator, "compute_metrics": compute_metrics,
                       "preprocess_logits_for_metrics": preprocess_logits_for_metrics}
        given = [name for name, value in unsupported.items() if value is not None]
        if given:
            raise ValueError(f"OnlineDPOTrainer does not take {given}: it samples and collates its own pairs, and "
                             "evaluation logs the training metrics on eval prompts.")
        reward_model_path = args.reward_model_path if args is not None else None
        if reward_funcs is None and judge is None and reward_model_path is not None:
            reward_funcs = reward_model_path  # as TRL's online_dpo script: the Config names the reward model
        elif reward_model_path is not None:
            logger.warning(f"reward_model_path ({reward_model_path!r}) is not loaded: the pairs are ranked by the "
                           f"{'judge' if judge is not None else 'reward_funcs'} given to the trainer.")
        if (reward_funcs is None) == (judge is None):
            raise ValueError("Online DPO ranks each pair of completions with `reward_funcs` (reward functions or "
                             "reward models, or `args.reward_model_path`) or with a pairwise `judge`: give exactly one "
                             "of them.")
        self.judge = judge
        super().__init__(
            model, PairwiseJudgePreference(judge) if judge is not None else reward_funcs, args, train_dataset,
            eval_dataset, processing_class, reward_processing_classes, callbacks, optimizers,
            quantization_config=quantization_config, peft_config=peft_config, ref_model=ref_model,
        )
        if judge is not None and self.args.missing_eos_penalty is not None:
            raise ValueError("missing_eos_penalty lowers reward scores; a judge gives none. Leave it unset with a "
                             "judge, or rank with reward_funcs.")

    @property
    def beta(self) -> float:
        """β of the current epoch: `args.beta`, or its entry for this epoch (the last one once they run out)."""
        betas = self.args.beta
        if not isinstance(betas, list):
            return betas
        return betas[min(int(self.state.epoch or 0), len(betas) - 1)]

    # -- pairs -----------------------------------------------------------------------------------------------------
    def needs_old_logps(self) -> bool:
        return False  # the DPO loss has no importance ratio

    def token_logps(self, model, rollout: Rollout) -> torch.Tensor:
        # DPO compares the policy's own probabilities (TRL: untempered logits), not the tempered sampling distribution.
        return self.rollout_logprobs(model, cut_prompts_to_fit(rollout, self.args.max_length), temperature=1.0,
                                     batch_size=self.row_batch_size).token_logps

    def estimator(self):
        return None  # the pairs need no advantages: `estimate` ranks them

    def estimate(self, rollout: Rollout) -> Rollout:
        """Online DPO's estimate stage: the reference's token log-probs, each completion's score (the weighted reward
        sum, 0 where no function applied, TRL's `nansum`; less `missing_eos_penalty` without a stop token), and one
        row per pair, chosen completion first."""
        with torch.no_grad():
            rollout = self.policy_statistics(rollout, frozenset())
        rewards_per_func = gather(rollout.rewards_per_func)
        self.record_reward_metrics(rewards_per_func)
        if self.args.log_completions:
            self.record_completions(rollout, rewards_per_func, None)
        scores = torch.nan_to_num(self.reward_scorer.combine(rewards_per_func), nan=0.0)
        scores = self.local_part(scores, rollout)
        has_stop = has_stop_token(rollout.completion_ids, rollout.completion_mask,
                                  stop_token_ids(self.model, self.tokenizer))
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~has_stop).float()
        return pair_by_preference(rollout, scores, has_stop)

    def record_reward_metrics(self, rewards_per_func: torch.Tensor) -> None:
        if self.judge is None:  # a judge's 1/0 preferences are no rewards to average
            super().record_reward_metrics(rewards_per_func)

    # -- loss ------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        completions = unpaired(inputs)
        policy = self.rollout_logprobs(model, cut_prompts_to_fit(completions, self.args.max_length), temperature=1.0)
        ref_token_logps = inputs.ref_logps.flatten(0, 1)
        logps, ref_logps = policy.sum.view(-1, 2), ref_token_logps.sum(-1).view(-1, 2)
        chosen_logratios, rejected_logratios = (logps - ref_logps).unbind(-1)
        # Unit lengths: TRL's Online DPO takes IPO on summed log-ratios (not divided by length as offline IPO).
        unit = torch.ones_like(chosen_logratios)
        loss = losses.dpo_loss(self.args.loss_type, chosen_logratios, rejected_logratios, beta=self.beta,
                               chosen_lengths=unit, rejected_lengths=unit).mean()
        self.record_pair_metrics(inputs, logps.detach(), (logps - ref_logps).detach(),
                                 (policy.token_logps - ref_token_logps).detach())
        return (loss, {"chosen_logps": logps[:, 0], "rejected_logps": logps[:, 1]}) if return_outputs else loss

    def record_pair_metrics(self, pairs: Rollout, logps: torch.Tensor, logratios: torch.Tensor,
                            token_kl: torch.Tensor) -> None:
        """TRL's Online DPO metrics of a batch of pairs. `logps` / `logratios`: `[P, 2]` summed log-probs and
        `logp - ref` (chosen, rejected); `token_kl`: `[2P, C]` per-token `logp - ref` (0 off the completions), rows
        as `unpaired` orders them. Means go through `record_sum`, exact over the pairs since the last log (TRL
        averages batch means: the same while batches hold as many pairs); `record_metric`'s `gather_for_metrics`
        would cut the last batch of an epoch to the dataset rows left, which count prompts, not completions."""
        beta = self.beta
        rewards = beta * logratios  # DPO's implicit rewards
        kl = token_kl.sum(-1)
        non_score_reward = -beta * kl
        self.record_sum("objective/kl", kl)
        self.record_sum("objective/entropy", -logps)
        self.record_sum("objective/non_score_reward", non_score_reward)
        self.record_sum("rewards/chosen", rewards[:, 0])
        self.record_sum("rewards/rejected", rewards[:, 1])
        self.record_sum("rewards/margins", rewards[:, 0] - rewards[:, 1])
        self.record_sum("rewards/accuracies", (rewards[:, 0] > rewards[:, 1]).float())
        self.record_sum("logps/chosen", logps[:, 0])
        self.record_sum("logps/rejected", logps[:, 1])
        self.record_sum("val/contain_eos_token", pairs.extras["has_stop_token"].float())
        self.record_value("beta", beta)
        if self.judge is None:  # scores are rewards only when reward functions gave them
            scores = pairs.extras["scores"]
            self.record_sum("objective/scores", scores)
            self.record_sum("objective/scores_margin", scores[:, 0] - scores[:, 1])
            self.record_sum("objective/rlhf_reward", scores.flatten() + non_score_reward)

    def card_hyperparameters(self) -> dict:
        args = self.args
        return {"beta": args.beta, "loss_type": args.loss_type, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "missing_eos_penalty": args.missing_eos_penalty,
                "ranked_by": "judge" if self.judge is not None else "reward functions"}
