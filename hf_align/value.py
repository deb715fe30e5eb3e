"""The value model (critic) of PPO / TRPO: per-token values of a rollout's completions, in two layouts.

- **A value head on the policy** (`ValueHead`, `token_values`, `policy_logprobs_and_values`): a `Linear(hidden, 1)`
  reads the policy's own last hidden state. Under peft the policy's adapters and the head train while the frozen base
  weights are shared three ways, by the policy (adapter on), the reference (adapter disabled,
  `models.reference_model`) and the critic: one copy of the base in memory. `policy_logprobs_and_values` gets the
  completion log-probs and the values from one forward pass.
- **A separate critic** (`critic_token_values`): a one-label sequence classifier (`...ForSequenceClassification`,
  e.g. initialised from the reward-model checkpoint, as in InstructGPT, arXiv 2203.02155) whose `score` head is read
  at every position, not only at the last token.

Alignment (both layouts). A rollout row is `prompt_ids` `[P]` (left-padded) followed by `completion_ids` `[C]`
(right-padded), so completion token t sits at position `P + t`. `values[:, t]` is the value of the state *before*
token t is emitted, s_t = (prompt, y_<t): the head read at position `P - 1 + t`, the same position whose LM-head
output predicts token t, so `values[:, t]` lines up with `completion_token_logprobs(...).token_logps[:, t]` (the
action taken in s_t) and with the per-token reward `r_t`. `values[:, 0]` is read at the last prompt token; the
position after the last completion token is never read: the state after EOS is terminal with value 0, which is what
`losses.generalized_advantage_estimation` assumes. Values are float32 and exactly 0 where `completion_mask` is 0.
Prompts must be non-empty. Position ids are those used while sampling (left padding shifted), as in
`sequence_logprobs.completion_token_logprobs`.
"""

from __future__ import annotations

import torch
from torch import nn

from .logprobs import CompletionLogProbs, _capture_last_hidden_state, last_hidden_state
from .models import unwrap_causal_lm, unwrap_wrappers
from .rollout import Rollout
from .sequence_logprobs import completion_token_logprobs

VALUE_HEAD_INITS = ("zeros", "normal")
# The critic is attached to the policy as this submodule (so that the optimizer, DDP and gradient clipping see it) and
# saved apart from the model files, in each checkpoint, under this name.
CRITIC_ATTRIBUTE = "ppo_critic"
CRITIC_WEIGHTS_NAME = "ppo_critic.safetensors"


class ValueHead(nn.Module):
    """`V(s) = w · h + b`, a `Linear(hidden_size, 1)` on the policy's last hidden state `h` (after the final norm).

    Initialisation (`init`): `"zeros"` (default) sets `w` and `b` to 0, so every value starts at 0, the natural
    estimate before any reward has been seen, and the value loss sends no gradient into the shared trunk (or its
    adapters) until the head has learned something: the critic cannot perturb the policy in the first updates.
    `"normal"` draws `w` from N(0, std²) (default `std = 1 / (hidden_size + 1)`, small enough that initial values are
    near 0) and sets `b = 0`, for when a nonzero gradient into the trunk is wanted from the start. The head computes
    in its own dtype (float32 by default) whatever the trunk's, and returns float32."""

    def __init__(self, hidden_size: int, init: str = "zeros", std: float | None = None):
        super().__init__()
        if init not in VALUE_HEAD_INITS:
            raise ValueError(f"Unknown value head init {init!r}; expected one of {VALUE_HEAD_INITS}.")
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.bias)
        if init == "zeros":
            nn.init.zeros_(self.linear.weight)
        else:
            nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) if std is None else std)

    @classmethod
    def for_model(cls, model, **kwargs) -> ValueHead:
        """A head sized for `model` (a causal LM, possibly peft / DDP wrapped), on its device."""
        causal_lm = unwrap_causal_lm(model)
        head = cls(causal_lm.config.get_text_config().hidden_size, **kwargs)
        return head.to(causal_lm.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` `[..., H]` → values `[...]` (float32)."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


def _rollout_inputs(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask` and `position_ids` `[N, P + C]` of prompt + completion, as the model sampled."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _completion_states(per_position: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """`per_position` `[N, P + C, ...]` → `[N, C, ...]`: the positions `P - 1 + t` before each completion token t."""
    prompt_length, completion_length = rollout.prompt_ids.size(1), rollout.completion_ids.size(1)
    if prompt_length == 0:
        raise ValueError("A rollout with empty prompts has no state before its first completion token.")
    return per_position[:, prompt_length - 1 : prompt_length - 1 + completion_length]


def _masked(values: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    return values * rollout.completion_mask.to(values.dtype)


def _row_slices(rollout: Rollout, batch_size: int | None):
    batch_size = batch_size or max(rollout.num_rows, 1)
    for start in range(0, rollout.num_rows, batch_size):
        yield rollout.select(slice(start, start + batch_size))


def token_values(policy, value_head: ValueHead, rollout: Rollout, *, batch_size: int | None = None) -> torch.Tensor:
    """Values `[N, C]` of the rollout's completion states from `value_head` on `policy`'s last hidden state (one
    forward of the policy, adapters active under peft; the LM head runs on one position only), `batch_size` rows at a
    time (all at once when None). Alignment: see the module docstring. Gradients reach the head and whatever of the
    policy trains (its adapters under peft)."""
    pieces = []
    for part in _row_slices(rollout, batch_size):
        hidden = last_hidden_state(policy, *_rollout_inputs(part))
        pieces.append(_masked(value_head(_completion_states(hidden, part)), part))
    return torch.cat(pieces)


def policy_logprobs_and_values(
    policy,
    value_head: ValueHead,
    rollout: Rollout,
    *,
    temperature: float = 1.0,
    with_stats: bool = False,
    batch_size: int | None = None,
) -> tuple[CompletionLogProbs, torch.Tensor]:
    """The completion log-probs (exactly `sequence_logprobs.completion_token_logprobs(policy, rollout, temperature=...,
    with_stats=...)`) and the values `[N, C]` (as `token_values`) from ONE forward pass of the policy per
    `batch_size` rows: the log-probs are computed by `completion_token_logprobs` itself while the decoder's output
    (the last hidden state it projects) is captured and read by `value_head`."""
    logps, values = [], []
    for part in _row_slices(rollout, batch_size):
        with _capture_last_hidden_state(unwrap_causal_lm(policy)) as captured:
            logps.append(completion_token_logprobs(policy, part, temperature=temperature, with_stats=with_stats))
        values.append(_masked(value_head(_completion_states(captured["hidden"], part)), part))
    fields = ("token_logps", "mask", "entropy", "mean_logit", "is_top1") if with_stats else ("token_logps", "mask")
    joined = CompletionLogProbs(**{name: torch.cat([getattr(p, name) for p in logps]) for name in fields})
    return joined, torch.cat(values)


def _score_head(critic) -> nn.Module:
    model = unwrap_causal_lm(unwrap_wrappers(critic))
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no `score` head: the critic must be a `...ForSequenceClassification` model "
            "(num_labels=1) whose `score` maps the last hidden state to one value per position."
        )
    return head


def critic_token_values(critic, rollout: Rollout, *, batch_size: int | None = None) -> torch.Tensor:
    """Values `[N, C]` of the rollout's completion states from a separate critic: a one-label sequence classifier
    (possibly peft / DDP wrapped) run through its own forward once per `batch_size` rows, its `score` head read at
    every position (captured as the head computes it, before the classifier keeps only the last token). Alignment:
    see the module docstring; so `values[:, t]` is what the classifier itself would output for the sequence
    `prompt + completion[:t]`. The classifier's pooling needs `critic.config.pad_token_id` (any id) for N > 1.
    Float32, 0 where `completion_mask` is 0."""
    head = _score_head(critic)
    pieces = []
    for part in _row_slices(rollout, batch_size):
        captured = {}
        handle = head.register_forward_hook(lambda _module, _args, output: captured.__setitem__("scores", output))
        try:
            input_ids, attention_mask, position_ids = _rollout_inputs(part)
            critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        finally:
            handle.remove()
        scores = captured["scores"]
        if scores.size(-1) != 1:
            raise ValueError(f"The critic's score head has {scores.size(-1)} outputs; a value model needs 1.")
        pieces.append(_masked(_completion_states(scores[..., 0], part).float(), part))
    return torch.cat(pieces)
