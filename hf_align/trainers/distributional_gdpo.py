"""Distributional GDPO: Group Distributional Preference Optimization (Yao et al., "No Preference Left Behind",
ICLR 2025, arXiv 2412.20299), pluralistic alignment to the distribution of a group's beliefs. Not to be confused
with reward-decoupled GDPO (arXiv 2601.05242), an online multi-reward variant of GRPO.

The model first states a belief `b` given the prompt `x`, then a response `y` given `(x, b)`:
`π(b, y | x) = π(b | x) · π(y | x, b)`. Each row is one member of a group: the group's belief distribution `p*(·|x)`
over candidate beliefs, the member's belief `b`, and a preference pair of responses given `(x, b)`. Per row:

    L = calibration_weight · KL(p*(·|x) ‖ q_θ(·|x))              belief calibration (`losses.belief_calibration_kl`)
      + DPO(y_w ≻ y_l | x, b)                                    DPO on responses given the belief (any `loss_type`)
      + belief_nll_weight · (-mean_t log π(b_t | x, b_<t))       NLL of the member's belief (`losses.sequence_mean_nll`)

with `q_θ(b_k|x) ∝ π(b_k|x)` normalised over the row's candidates.

Sources: only the paper's abstract, its Figure 1 caption and its reviews could be read here, not its method
section; the objective follows the authors' released code (github.com/BigBinnie/GDPO, `trainers.py`, loss "mpo"; the
released `run_gdpo.sh` passes `loss=dpo`, which trains their DPO baseline): KL(p* ‖ the model's belief distribution)
+ DPO on the responses given the belief + the mean NLL of the belief's tokens, each with weight 1, β = 0.1, trained
jointly in one stage after SFT. As there, the DPO term scores only the response tokens (the belief is part of its
prompt, and chosen and rejected share it) and the reference enters only the DPO term. Where this differs: the
authors' belief is a numbered survey option whose single digit token is scored under the full-vocabulary softmax,
not renormalised over the options in the training loss (their reported Jensen-Shannon distance does renormalise).
Here a belief is any string, its probability is that of all its tokens, and `q` is renormalised over the row's
candidates in the loss and in the logged `belief/js_distance` alike (see `losses.belief_calibration_kl`); the
preference term may be any DPO `loss_type` (the authors' code also pairs the two belief terms with KTO). A belief is
scored as the continuation of the prompt (no end token), so candidates must be self-delimiting: none may be a prefix
of another (end them with a separator such as "." or "\\n").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import data, losses
from ..data import DataError
from ..sequence_logprobs import batch_logprobs
from ..preference import DataCollatorForPreference
from .dpo import DPOConfig, DPOTrainer

GDPO_CITATION = """@inproceedings{yao2025no,
    title     = {{No Preference Left Behind: Group Distributional Preference Optimization}},
    author    = {Binwei Yao and Zefan Cai and Yun-Shiuan Chuang and Shanglin Yang and Ming Jiang and Diyi Yang and Junjie Hu},
    year      = 2025,
    booktitle = {The Thirteenth International Conference on Learning Representations},
}"""

BELIEF_COLUMNS = ("prompt", "beliefs", "belief_distribution", "belief", "chosen", "rejected")
# Survey shares are often rounded (0.33 + 0.33 + 0.33): sums this close to 1 are accepted and renormalised.
DISTRIBUTION_TOLERANCE = 1e-2


@dataclass
class DistributionalGDPOConfig(DPOConfig):
    """Configuration of `DistributionalGDPOTrainer`: `DPOConfig` (β = 0.1 as in the authors' runs, `loss_type`,
    reference handling; the DPO term's weight is `loss_weights`) plus the weights of the two belief terms, 1 each as
    in the authors' code."""

    calibration_weight: float = field(
        default=1.0, metadata={"help": "Weight of KL(group's belief distribution ‖ model's belief distribution)."}
    )
    belief_nll_weight: float = field(default=1.0, metadata={"help": "Weight of the NLL of the row's belief."})

    def __post_init__(self):
        if self.calibration_weight < 0 or self.belief_nll_weight < 0:
            raise ValueError("`calibration_weight` and `belief_nll_weight` must be >= 0.")
        super().__post_init__()


def check_belief_row(row: dict, where: str) -> None:
    """Raises `data.DataError` (naming `where`, the row, and the column) unless the row is a valid GDPO example."""
    for column in ("prompt", "belief", "chosen", "rejected"):
        data.check_value(row[column], f"{where}, column '{column}'", conversational=False)
    beliefs = row["beliefs"]
    if not isinstance(beliefs, list) or len(beliefs) < 2:
        raise DataError(f"{where}, column 'beliefs': expected a list of at least 2 candidate beliefs, got {beliefs!r}.")
    for k, belief in enumerate(beliefs):
        data.check_value(belief, f"{where}, column 'beliefs', item {k}", conversational=False)
    for k, belief in enumerate(beliefs):
        for j, other in enumerate(beliefs):
            if j != k and other.startswith(belief):
                problem = "appears twice" if other == belief else f"is a prefix of item {j} {other!r}"
                raise DataError(
                    f"{where}, column 'beliefs': item {k} {belief!r} {problem}; candidates must be distinct and "
                    "self-delimiting (end each with a separator such as '.' or a newline)."
                )
    probs = row["belief_distribution"]
    if not isinstance(probs, list) or len(probs) != len(beliefs):
        raise DataError(
            f"{where}, column 'belief_distribution': expected a list of {len(beliefs)} probabilities (one per belief), "
            f"got {probs!r}."
        )
    for k, p in enumerate(probs):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise DataError(f"{where}, column 'belief_distribution', item {k}: expected a probability >= 0, got {p!r}.")
    if abs(sum(probs) - 1) > DISTRIBUTION_TOLERANCE:
        raise DataError(f"{where}, column 'belief_distribution': the probabilities sum to {sum(probs):.4g}, not 1.")
    if row["belief"] not in beliefs:
        raise DataError(f"{where}, column 'belief': {row['belief']!r} is not one of the row's beliefs {beliefs!r}.")
    if probs[beliefs.index(row["belief"])] == 0:
        raise DataError(
            f"{where}, column 'belief': {row['belief']!r} has probability 0 in 'belief_distribution', so no member "
            "of the group holds it."
        )


def tokenize_belief_row(tokenizer, row: dict, where: str) -> dict:
    """`prompt_ids`/`chosen_ids`/`rejected_ids` of the pair given prompt + belief (TRL's tokenization, eos appended),
    and `belief_prompt_ids` + `belief_ids` (one list per candidate, no eos) of the candidates given the prompt, with
    the group's `belief_distribution` (renormalised) and `belief_index`, the row's belief among the candidates."""
    pair = data.tokenize_prompt_completions(
        tokenizer, {**row, "prompt": row["prompt"] + row["belief"]}, ("chosen", "rejected"), where,
        conversational=False,
    )
    candidates = {f"belief_{k}": belief for k, belief in enumerate(row["beliefs"])}
    tokens = data.tokenize_prompt_completions(
        tokenizer, {"prompt": row["prompt"], **candidates}, tuple(candidates), where, conversational=False,
        append_eos=False,
    )
    belief_ids = [tokens[f"{key}_ids"] for key in candidates]
    for k, ids in enumerate(belief_ids):
        if not ids:
            raise DataError(f"{where}, column 'beliefs', item {k}: the belief adds no token after the prompt.")
    total = sum(row["belief_distribution"])
    return {
        **pair,
        "belief_prompt_ids": tokens["prompt_ids"],
        "belief_ids": belief_ids,
        "belief_distribution": [p / total for p in row["belief_distribution"]],
        "belief_index": row["beliefs"].index(row["belief"]),
    }


@dataclass
class DataCollatorForBeliefPreference(DataCollatorForPreference):
    """`DataCollatorForPreference`'s pair batch (prompt + belief, then chosen / rejected: `[2B, T]`, reference
    log-probs passed through) plus every row's candidate beliefs after its prompt, flattened row by row:
    `belief_input_ids` / `belief_attention_mask` / `belief_completion_mask` `[N, T']` with `N = Σ_i K_i`;
    `belief_mask` `[B, K]` (True where row i has a k-th candidate), `belief_distribution` `[B, K]` (the group's
    probabilities, 0 past a row's candidates) and `belief_index` `[B]` (the row's own belief)."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        prompts = [example["belief_prompt_ids"] for example in examples for _ in example["belief_ids"]]
        beliefs = [ids for example in examples for ids in example["belief_ids"]]
        candidates = data.collate_prompt_completions(
            prompts, beliefs, self.pad_token_id, self.max_length, self.truncation_mode, self.pad_to_multiple_of
        )
        batch.update({f"belief_{key}": value for key, value in candidates.items()})
        counts = torch.tensor([len(example["belief_ids"]) for example in examples])
        batch["belief_mask"] = torch.arange(int(counts.max()))[None, :] < counts[:, None]
        batch["belief_distribution"] = data.pad(
            [torch.tensor(example["belief_distribution"], dtype=torch.float32) for example in examples], 0.0
        )
        batch["belief_index"] = torch.tensor([example["belief_index"] for example in examples])
        return batch


def jensen_shannon_distance(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`sqrt(JS(p, q))` with natural logs (scipy's `jensenshannon`, the paper's metric), per row of `[B, K]`
    distributions (0 where `mask` is False). Returns `[B]`."""
    p, q = p.masked_fill(~mask, 0.0), q.masked_fill(~mask, 0.0)
    m = (p + q) / 2

    def kl_to_m(x):
        return (torch.xlogy(x, x) - torch.xlogy(x, m)).sum(-1)

    return ((kl_to_m(p) + kl_to_m(q)) / 2).clamp(min=0).sqrt()


class DistributionalGDPOTrainer(DPOTrainer):
    """Distributional GDPO (arXiv 2412.20299) on rows with columns (standard text only):

    - `prompt` (str): the question, e.g. "Group: farmers\\nQuestion: Should our town build a new park?\\nBelief:";
    - `beliefs` (list[str], >= 2): the candidate beliefs, each the text the model writes after the prompt;
    - `belief_distribution` (list[float]): the group's share holding each belief (>= 0, summing to 1);
    - `belief` (str): this member's belief, one of `beliefs`;
    - `chosen` / `rejected` (str): responses given prompt + belief, consistent / inconsistent with it.

    The reference model is handled as in `DPOTrainer` (explicit, adapter disabled, frozen copy or precomputed) and
    enters only the DPO term. Logs DPO's metrics (for the responses given the belief) and `belief/kl` (the
    calibration term), `belief/js_distance` (the paper's Jensen–Shannon distance to the group's distribution)
    and `belief/nll`."""

    config_class = DistributionalGDPOConfig
    algorithm = "GDPO-distributional"
    paper = {"title": "No Preference Left Behind: Group Distributional Preference Optimization", "id": "2412.20299",
             "citation": GDPO_CITATION}
    dataset_columns = (
        "prompt_ids", "chosen_ids", "rejected_ids", "belief_prompt_ids", "belief_ids", "belief_distribution",
        "belief_index", "ref_chosen_logps", "ref_rejected_logps",
    )

    def prepare_dataset(self, dataset, name, args):
        data.check_columns(dataset, name, BELIEF_COLUMNS)
        first = data.first_row(dataset, name)
        if data.is_conversational_row(first, ("prompt", "chosen", "rejected")):
            raise DataError(
                f"The {name} dataset is conversational; DistributionalGDPOTrainer takes text columns, since the belief "
                "is written between the prompt and the response. Render the prompt with the chat template first "
                "(`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`)."
            )
        keep = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in (dataset.column_names or first)]

        def process(row, index):
            where = f"{name} dataset, row {index}"
            check_belief_row(row, where)
            return tokenize_belief_row(self.tokenizer, row, where)

        remove = [c for c in (dataset.column_names or first.keys()) if c not in keep]
        kwargs = data.map_kwargs(dataset, f"Tokenizing {name}", args.dataset_num_proc)
        dataset = dataset.map(process, with_indices=True, remove_columns=remove, **kwargs)
        dataset, overlong_prompts = data.drop_overlong_prompts(
            dataset, name, args.max_length, args.truncation_mode, args.dataset_num_proc
        )
        dataset, overlong_beliefs = self._drop_truncated_beliefs(dataset, name, args)
        self.dropped_rows[name] = overlong_prompts + overlong_beliefs
        return dataset

    @staticmethod
    def _drop_truncated_beliefs(dataset, name, args):
        """Rows where `max_length` would cut a candidate belief (keep_start) would calibrate a truncated belief."""
        if args.max_length is None or args.truncation_mode != "keep_start":
            return dataset, 0

        def fits(row) -> bool:
            return len(row["belief_prompt_ids"]) + max(len(ids) for ids in row["belief_ids"]) <= args.max_length

        reason = f"prompt + a candidate belief is > max_length={args.max_length} tokens"
        return data.drop_rows(dataset, name, fits, reason, args.dataset_num_proc)

    def default_collator(self, args):
        return DataCollatorForBeliefPreference.from_config(self.tokenizer.pad_token_id, args)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        preference_loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        candidates = batch_logprobs(model, {"input_ids": inputs["belief_input_ids"],
                                            "attention_mask": inputs["belief_attention_mask"],
                                            "completion_mask": inputs["belief_completion_mask"]})
        mask = inputs["belief_mask"]
        belief_logps = candidates.sum.new_zeros(mask.shape).masked_scatter(mask, candidates.sum)  # [B, K]
        calibration = losses.belief_calibration_kl(belief_logps, inputs["belief_distribution"], mask)
        counts = mask.sum(-1)
        own_rows = counts.cumsum(0) - counts + inputs["belief_index"]  # each row's own belief among the N candidates
        belief_nll = losses.sequence_mean_nll(candidates.token_logps[own_rows], candidates.mask[own_rows])
        loss = (
            preference_loss
            + self.args.calibration_weight * calibration.mean()
            + self.args.belief_nll_weight * belief_nll.mean()
        )
        self._record_belief_metrics(belief_logps, inputs["belief_distribution"], mask, calibration, belief_nll)
        self.record_tokens(inputs["belief_attention_mask"])
        outputs["belief_logps"] = belief_logps
        return (loss, outputs) if return_outputs else loss

    def _record_belief_metrics(self, belief_logps, group_probs, mask, calibration, belief_nll):
        with torch.no_grad():
            model_probs = losses.belief_log_distribution(belief_logps, mask).exp()
            self.record_metric("belief/kl", calibration)
            self.record_metric("belief/js_distance", jensen_shannon_distance(group_probs, model_probs, mask))
            self.record_metric("belief/nll", belief_nll)

    def card_hyperparameters(self) -> dict:
        return {
            **super().card_hyperparameters(),
            "calibration_weight": self.args.calibration_weight,
            "belief_nll_weight": self.args.belief_nll_weight,
        }

