"""GRPO with tools against TRL 1.16's multi-turn GRPOTrainer on the same scripted trajectories: half the completions
of each group call the calculator and copy its result, the others answer directly (wrongly). Every metric both log
(loss, gradient norm, rewards, `tools/*`, completion lengths, KL, entropy, clipping) agrees at every step."""

from __future__ import annotations

import re

import pytest
import torch

import hf_align
import hf_align.tools
from hf_align import tool_task
from test_parity_sweep import _logs, _online_settings, compare

trl = pytest.importorskip("trl")

END = "<|im_end|>"


def scripted_turn(tokenizer, prefix: list[int], row: int) -> list[int]:
    """The next turn after `prefix`: after a tool result, its value copied; else, on even rows, a calculator call
    for the question's expression, on odd rows a wrong direct answer."""
    text = tokenizer.decode(prefix)
    results = re.findall(r"<\|im_start\|>tool\n(.*?)<\|im_end\|>", text)
    if results:
        turn = results[-1].split("=")[-1].strip() + END
    elif row % 2 == 0:
        expression = re.findall(r"What is (\d+ \* \d+)\?", text)[-1]
        turn = ('<tool_call>{"name": "calculator", "arguments": {"expression": "' + expression + '"}}</tool_call>'
                + END)
    else:
        turn = "0" + END
    return tokenizer(turn, add_special_tokens=False)["input_ids"]


def test_grpo_with_tools_matches_trl_on_the_same_trajectories(tiny_model_path, tmp_path, monkeypatch):
    def ours_generate(model, tokenizer, prefixes, sampling):
        return [scripted_turn(tokenizer, prefix, i) for i, prefix in enumerate(prefixes)]

    monkeypatch.setattr(hf_align.tools, "generate_continuations", ours_generate)
    settings = _online_settings(tmp_path, max_completion_length=128, max_tool_calling_iterations=1)
    dataset = tool_task.load_prompts("train").select(range(8))
    logs = []
    for library in (trl, hf_align):
        tokenizer = tool_task.task_tokenizer(tiny_model_path)
        tokenizer.eos_token = END  # TRL cuts a turn's rendering after the eos token: the turns end in <|im_end|>
        torch.manual_seed(0)
        trainer = library.GRPOTrainer(tiny_model_path, tool_task.answer_reward, args=library.GRPOConfig(**settings),
                                      train_dataset=dataset, processing_class=tokenizer, tools=[tool_task.calculator])
        if library is trl:
            def trl_generate(prompt_ids, *args, tokenizer=tokenizer, **kwargs):
                return [scripted_turn(tokenizer, list(ids), i) for i, ids in enumerate(prompt_ids)], None

            trainer._generate_single_turn = trl_generate
        trainer.train()
        logs.append(_logs(trainer))
    theirs, ours = logs
    compare(theirs, ours, steps=2, label="GRPO tools")
    # Not vacuous: half the episodes call the tool and earn the reward (the first step's generation batch; the second
    # step reuses it, num_iterations = 2), and the loss moves.
    assert ours[0]["tools/call_frequency"] == pytest.approx(0.5)
    assert ours[0]["rewards/answer_reward/mean"] == pytest.approx(0.5)
    assert all(entry["loss"] != 0 for entry in ours)
