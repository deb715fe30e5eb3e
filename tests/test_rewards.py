"""The reward layer: reward functions and reward models scored into [N, F], combined and summarised as TRL does."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl.data_utils import apply_chat_template
from trl.trainer.utils import nanstd

from hf_align.rewards import (
    RewardFunctionError,
    RewardScorer,
    completion_text,
    reward_function_metrics,
)

NAN = float("nan")


def length_reward(completions, **kwargs):
    return [float(len(completion_text(c))) for c in completions]


def only_even_index(completions, index, **kwargs):
    """Applies to rows with an even `index` column only (None elsewhere)."""
    return [1.0 if i % 2 == 0 else None for i in index]


def never_applies(completions, **kwargs):
    return [None] * len(completions)


def _score(scorer, prompts, completions, columns=None, state=None):
    return scorer.score(prompts, completions, [[0]] * len(prompts), columns or {}, state)


# -------------------------------------------------------------------------------------------------- combining, metrics


def test_combine_is_weighted_nansum_and_unscored_rows_are_nan():
    per_func = torch.tensor([[1.0, NAN], [0.5, 2.0], [NAN, NAN]])
    def first(**_):
        return []

    def second(**_):
        return []

    combined = RewardScorer([first, second], [1.0, 0.5]).combine(per_func)
    # By hand: 1*1 + (None -> nothing); 1*0.5 + 0.5*2; every function returned None -> NaN (TRL 1.16).
    assert combined[:2].tolist() == [1.0, 1.5]
    assert math.isnan(combined[2])


def test_metrics_are_trl_names_and_nan_aware():
    per_func = torch.tensor([[1.0, NAN], [0.5, 2.0], [NAN, 4.0]])
    metrics = reward_function_metrics(per_func, ["a", "b"])
    assert set(metrics) == {"rewards/a/mean", "rewards/a/std", "rewards/b/mean", "rewards/b/std"}
    assert metrics["rewards/a/mean"] == pytest.approx(0.75)
    assert metrics["rewards/a/std"] == pytest.approx(math.sqrt(2 * 0.25**2))  # unbiased over the two values
    assert metrics["rewards/b/std"] == pytest.approx(nanstd(per_func[:, 1]).item())
    single = reward_function_metrics(torch.tensor([[3.0], [NAN]]), ["c"])
    assert single["rewards/c/mean"] == 3.0 and math.isnan(single["rewards/c/std"])  # TRL: NaN with one value


def test_score_none_becomes_nan_and_combines_with_weights(caplog):
    scorer = RewardScorer([length_reward, only_even_index, never_applies], reward_weights=[0.5, 2.0, 1.0])
    prompts, completions = ["p0", "p1", "p2"], ["ab", "abcd", ""]
    with caplog.at_level(logging.WARNING, logger="hf_align.rewards"):
        per_func = _score(scorer, prompts, completions, {"index": [0, 1, 2]})
    assert per_func.dtype == torch.float32 and per_func.shape == (3, 3)
    assert per_func[:, 0].tolist() == [2.0, 4.0, 0.0]
    assert per_func[0, 1] == 1.0 and math.isnan(per_func[1, 1]) and per_func[2, 1] == 1.0
    assert torch.isnan(per_func[:, 2]).all()
    assert scorer.combine(per_func).tolist() == [0.5 * 2 + 2.0, 0.5 * 4, 0.5 * 0 + 2.0]
    assert not caplog.records  # every row had at least one reward

    scorer = RewardScorer([only_even_index, never_applies])
    with caplog.at_level(logging.WARNING, logger="hf_align.rewards"):
        per_func = _score(scorer, prompts, completions, {"index": [0, 1, 2]})
    assert math.isnan(scorer.combine(per_func)[1])
    assert "sample 1" in caplog.text and "p1" in caplog.text


def test_reward_functions_receive_trl_keywords_and_their_logs_are_buffered():
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(kwargs, prompts=prompts, completion_ids=completion_ids)
        kwargs["log_extra"]("judge_notes", ["x", "y"])
        kwargs["log_metric"]("spy/calls", 1)
        return [0.0, 1.0]

    state = object()
    scorer = RewardScorer(spy)
    scorer.score(["a", "b"], ["c", "d"], [[1, 2], [3]], {"prompt": ["a", "b"], "answer": ["1", "2"]}, state)
    assert seen["trainer_state"] is state and seen["answer"] == ["1", "2"] and seen["completion_ids"] == [[1, 2], [3]]
    assert "prompt" not in seen  # the `prompt` column is passed as `prompts` only
    assert scorer.pop_logs() == ({"judge_notes": ["x", "y"]}, {"spy/calls": [1.0]})
    assert scorer.pop_logs() == ({}, {})


def test_async_reward_function_is_awaited():
    async def async_reward(completions, **kwargs):
        return [1.0 for _ in completions]

    assert _score(RewardScorer(async_reward), ["a", "b"], ["c", "d"]).tolist() == [[1.0], [1.0]]


# ------------------------------------------------------------------------------------------------------------ names


def test_names_follow_trl():
    class Scorer:
        def __call__(self, completions, **kwargs):
            return [0.0] * len(completions)

    partial = functools.partial(length_reward)
    assert RewardScorer([partial, Scorer(), only_even_index]).names == ["length_reward", "Scorer", "only_even_index"]


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="named \\['<lambda>'\\]"):
        RewardScorer([lambda completions, **k: [0.0], lambda completions, **k: [1.0]])


# ------------------------------------------------------------------------------------------------------------ errors


def test_weights_must_match_functions():
    with pytest.raises(ValueError, match="reward_weights has 1 values but there are 2 reward functions"):
        RewardScorer([length_reward, never_applies], reward_weights=[1.0])


def test_wrong_count_names_the_function():
    def too_few(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="'too_few' returned 1 rewards, but 2 were expected"):
        _score(RewardScorer(too_few), ["a", "b"], ["c", "d"])


def test_non_numeric_value_names_function_and_sample():
    def stringly(completions, **kwargs):
        return [1.0, "0.5", 0.0]

    with pytest.raises(TypeError, match="'stringly' returned '0.5' \\(str\\) for sample 1 \\(prompt: 'second'\\)"):
        _score(RewardScorer(stringly), ["first", "second", "third"], ["a", "b", "c"])


def test_raising_function_names_the_sample_and_chains_the_error():
    def parse_int(completions, **kwargs):
        return [float(int(completion_text(c))) for c in completions]

    long_prompt = "Q" * 500
    prompts = ["one", "two", long_prompt, "four"]
    with pytest.raises(RewardFunctionError) as caught:
        _score(RewardScorer(parse_int), prompts, ["1", "2", "three", "4"])
    message = str(caught.value)
    assert "'parse_int' raised ValueError" in message and "on sample 2" in message and "'three'" in message
    assert "Q" * 200 + "..." in message and "Q" * 201 not in message  # the prompt, cut to 200 characters
    assert isinstance(caught.value.__cause__, ValueError)


def test_failure_of_the_whole_batch_only_says_so():
    def needs_pairs(completions, **kwargs):
        if len(completions) == 2:
            raise RuntimeError("pairs only break")
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match="on a batch of 2 samples, but on none of them alone"):
        _score(RewardScorer(needs_pairs), ["a", "b"], ["c", "d"])


def test_bad_columns_are_refused():
    scorer = RewardScorer(length_reward)
    with pytest.raises(ValueError, match="Column 'answer' has 1 values for 2 samples"):
        _score(scorer, ["a", "b"], ["c", "d"], {"answer": ["1"]})
    with pytest.raises(ValueError, match="column 'trainer_state' collides"):
        _score(scorer, ["a", "b"], ["c", "d"], {"trainer_state": [1, 2]})


# ------------------------------------------------------------------------------------------------------ reward models


def _manual_scores(model, tokenizer, texts):
    """One unpadded forward per text: the reference the padded batch must reproduce."""
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                for text in texts]


@pytest.fixture
def reward_model(tiny_seqcls_path):
    return AutoModelForSequenceClassification.from_pretrained(tiny_seqcls_path, num_labels=1, dtype=torch.float32)


def test_reward_model_scores_text_as_a_manual_forward(reward_model, tiny_seqcls_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_seqcls_path)
    prompts = ["Question: What is 2 + 2?\nAnswer:", "Hi"]
    completions = [" 4", " Hello there, how are you today?"]
    scorer = RewardScorer([reward_model, length_reward], reward_processing_classes=[tokenizer, None])
    per_func = _score(scorer, prompts, completions)
    expected = _manual_scores(reward_model, tokenizer, [p + c for p, c in zip(prompts, completions)])
    assert per_func[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert per_func[0, 0] != per_func[1, 0]
    assert scorer.names[0] == "model"  # the basename of the checkpoint folder, as TRL names it


def test_reward_model_scores_conversations_with_the_chat_template(reward_model, tiny_seqcls_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_seqcls_path)
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Say hi."}]]
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "Hi, nice to meet you!"}]]
    per_func = _score(RewardScorer(reward_model, reward_processing_classes=tokenizer), prompts, completions)
    texts = [apply_chat_template({"messages": p + c}, tokenizer)["text"] for p, c in zip(prompts, completions)]
    assert per_func[:, 0].tolist() == pytest.approx(_manual_scores(reward_model, tokenizer, texts), abs=1e-5)


def test_reward_model_from_a_path_loads_model_and_tokenizer(reward_model, tiny_seqcls_path):
    by_path = RewardScorer(tiny_seqcls_path)
    by_object = RewardScorer(reward_model)  # its tokenizer is loaded from the model's `_name_or_path`
    prompts, completions = ["Question: What is 3 + 4?\nAnswer:"], [" 7"]
    assert torch.equal(_score(by_path, prompts, completions), _score(by_object, prompts, completions))
    assert by_path.names == by_object.names == ["model"]
    assert not by_path.reward_funcs[0].training
