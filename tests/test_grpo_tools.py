"""GRPOTrainer's multi-turn rollouts end to end: tool results in the sequence but out of the loss, its KL and
`num_items_in_batch`; `environment_factory` and `rollout_func` through training; and learning: GRPO with the embedded tool task's
`CalculatorEnvironment` raises held-out accuracy with the tool, from a fixed seed.

Sampling is scripted where the numbers are checked by hand: `hf_align.tools.generate_continuations` is replaced by a
sampler that answers a prompt with a tool call and a prefix ending in a tool result with the answer."""

from __future__ import annotations

import time

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import hf_align.tools
from hf_align.tools import tool_tokenizer
from hf_align import tool_task
from hf_align.trainers.grpo import GRPOConfig, GRPOTrainer

QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, bf16=False)
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "37 * 46"}}</tool_call><|im_end|>'
ANSWER = "37 * 46 = 1702<|im_end|>"
TOOL_RESULT = "\n<|im_start|>tool\n37 * 46 = 1702<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def scripted_tool_sampling(monkeypatch):
    """Every first turn calls the calculator (`call`), every turn after a tool result answers (`answer`)."""

    def install(call: str = CALL, answer: str = ANSWER):
        def generate(model, tokenizer, prefixes, sampling):
            turns = [answer if "<|im_start|>tool" in tokenizer.decode(prefix) else call for prefix in prefixes]
            return [tokenizer(turn, add_special_tokens=False)["input_ids"][: sampling.max_new_tokens] for turn in turns]

        monkeypatch.setattr(hf_align.tools, "generate_continuations", generate)

    return install


def _rows(n: int = 4) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": "What is 37 * 46?"}], "answer": "1702"}] * n)


def _trainer(tiny_model_path, tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_steps=1,
                    max_completion_length=128, max_tool_calling_iterations=1, logging_steps=1, seed=0, **QUIET)
    reward_funcs = overrides.pop("reward_funcs", tool_task.answer_reward)
    settings.update(overrides)
    return GRPOTrainer(tiny_model_path, reward_funcs, args=GRPOConfig(**settings), train_dataset=_rows(),
                       processing_class=tool_task.task_tokenizer(tiny_model_path), tools=[tool_task.calculator])


def test_tool_mask_is_zero_exactly_on_the_tool_result(tiny_model_path, tmp_path, scripted_tool_sampling):
    scripted_tool_sampling()
    trainer = _trainer(tiny_model_path, tmp_path)
    rollout = trainer.sample(list(_rows(2)))
    tokenizer = trainer.tokenizer
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    call, result, answer = ids(CALL), ids(TOOL_RESULT), ids(ANSWER)
    expected_mask = [1] * len(call) + [0] * len(result) + [1] * len(answer)
    for row in range(2):
        length = len(expected_mask)
        assert rollout.completion_ids[row, :length].tolist() == call + result + answer
        assert rollout.tool_mask[row, :length].tolist() == expected_mask
        assert rollout.loss_mask[row].sum().item() == len(call) + len(answer)
    assert [turn["role"] for turn in rollout.completions[0]] == ["assistant", "tool", "assistant"]


def test_tool_tokens_carry_no_gradient_and_no_kl(tiny_model_path, tmp_path, scripted_tool_sampling):
    """The loss's gradient with respect to the tool tokens' log-probs is zero, changing their reference and old
    log-probs changes neither the loss nor the logged KL, and `num_items_in_batch` counts the sampled tokens only."""
    scripted_tool_sampling()
    trainer = _trainer(tiny_model_path, tmp_path, beta=0.1)
    trainer.model.train()
    rollout = trainer.make_rollout(list(_rows(4)))
    tool_tokens = (rollout.completion_mask * (1 - rollout.tool_mask)).bool()
    assert tool_tokens.any()
    assert rollout.num_items_in_batch.item() == rollout.loss_mask.sum().item() < rollout.completion_mask.sum().item()
    # Advantages that differ per row, so that the policy loss has a gradient (the scripted rows all tie).
    rollout = rollout.replace(advantages=torch.linspace(-1.0, 1.0, 4).reshape(rollout.advantages.shape),
                              old_logps=rollout.ref_logps - 0.05)

    captured = []
    policy_logprobs = trainer.rollout_logprobs

    def spy(*args, **kwargs):
        policy = policy_logprobs(*args, **kwargs)
        if policy.token_logps.requires_grad:
            policy.token_logps.retain_grad()
            captured.append(policy.token_logps)
        return policy

    trainer.rollout_logprobs = spy

    def loss_and_kl(inputs):
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, inputs)
        return loss, trainer._metrics["train"]["kl"][-1]

    loss, kl = loss_and_kl(rollout)
    loss.backward()
    grad = captured[-1].grad
    assert grad[tool_tokens].abs().max().item() == 0.0
    assert grad[rollout.loss_mask.bool()].abs().max().item() > 0.0
    moved = rollout.replace(ref_logps=rollout.ref_logps - 3.0 * tool_tokens, old_logps=rollout.old_logps + tool_tokens)
    with torch.no_grad():
        moved_loss, moved_kl = loss_and_kl(moved)
    assert moved_loss.item() == pytest.approx(loss.item(), abs=1e-7) and moved_kl == pytest.approx(kl, abs=1e-7)
    with torch.no_grad():  # the same change on a sampled token moves both: the comparison can fail
        sampled = torch.zeros_like(tool_tokens)
        sampled[0, 0] = True
        changed_loss, changed_kl = loss_and_kl(rollout.replace(ref_logps=rollout.ref_logps - 3.0 * sampled))
    assert changed_kl != pytest.approx(kl, abs=1e-6) and changed_loss.item() != pytest.approx(loss.item(), abs=1e-6)


class MultiplyEnvironment:
    """A row's environment: `multiply` is its tool, `get_reward` whether the model used it on the row's numbers."""

    def reset(self, a: int, b: int, **kwargs) -> str:
        self.a, self.b, self.used = a, b, False
        return f" {a} * {b}"

    def multiply(self, a: int, b: int) -> str:
        """Multiplies two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        self.used = (a, b) == (self.a, self.b)
        return str(a * b)

    def get_reward(self) -> float:
        return float(self.used)


def test_environment_factory_trains_and_logs_its_reward(tiny_model_path, tmp_path, scripted_tool_sampling):
    scripted_tool_sampling(call='<tool_call>{"name": "multiply", "arguments": {"a": 37, "b": 46}}</tool_call><|im_end|>')
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "Multiply"}], "a": 37, "b": 46},
                                 {"prompt": [{"role": "user", "content": "Multiply"}], "a": 12, "b": 3}])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                      max_steps=1, max_completion_length=128, max_tool_calling_iterations=1, logging_steps=1, **QUIET)
    trainer = GRPOTrainer(tiny_model_path, args=args, train_dataset=dataset, environment_factory=MultiplyEnvironment,
                          processing_class=tool_task.task_tokenizer(tiny_model_path))
    trainer.train()
    logs = trainer.state.log_history[0]
    # Half the rows hold 37 * 46, which the scripted call multiplies: the environment rewards those.
    assert logs["rewards/MultiplyEnvironment/mean"] == pytest.approx(0.5)
    assert logs["tools/call_frequency"] == pytest.approx(1.0) and logs["tools/failure_frequency"] == 0.0


def test_rollout_func_fields_reach_the_rewards_and_env_mask_is_the_tool_mask(tiny_model_path, tmp_path):
    seen = {}

    def rollout_func(prompts, trainer):
        tokenizer = trainer.processing_class
        prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                      for p in prompts]
        completion = tokenizer("12 + 30<|im_end|>", add_special_tokens=False)["input_ids"]
        env_mask = [1] * 3 + [0] * (len(completion) - 3)
        return {"prompt_ids": prompt_ids, "completion_ids": [completion] * len(prompts),
                "logprobs": [[-1.0] * len(completion)] * len(prompts), "env_mask": [env_mask] * len(prompts),
                "hint": [f"hint {i}" for i in range(len(prompts))], "episode": "scripted"}

    def hint_reward(completions, hint, episode, **kwargs):
        seen["hint"], seen["episode"] = hint, episode
        return [float(len(h)) for h in hint]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                      max_steps=1, max_completion_length=16, logging_steps=1, **QUIET)
    trainer = GRPOTrainer(tiny_model_path, hint_reward, args=args, train_dataset=_rows(), rollout_func=rollout_func)
    rollout = trainer.sample(list(_rows(2)))
    completion_length = len(trainer.tokenizer("12 + 30<|im_end|>", add_special_tokens=False)["input_ids"])
    assert rollout.tool_mask[0, :completion_length].tolist() == [1] * 3 + [0] * (completion_length - 3)
    trainer.train()
    assert seen["hint"] == ["hint 0", "hint 1", "hint 2", "hint 3"] and seen["episode"] == ["scripted"] * 4
    assert trainer.state.log_history[0]["rewards/hint_reward/mean"] == pytest.approx(6.0)



@pytest.fixture(scope="session")
def tool_task_start_path(tmp_path_factory) -> str:
    """The embedded tiny model after `tool_task.warm_start` (built once per session, about 30 s): it calls the tool
    on about a quarter of the held-out questions and copies the result about half the time."""
    torch.set_num_threads(1)
    return tool_task.warm_start(str(tmp_path_factory.mktemp("tool_task") / "sft"), disable_tqdm=True)


def test_grpo_with_the_calculator_environment_raises_held_out_accuracy(tool_task_start_path, tmp_path):
    started = time.perf_counter()
    start = tool_task_start_path
    tokenizer = tool_tokenizer(tool_task.task_tokenizer(start))
    model = AutoModelForCausalLM.from_pretrained(start)
    before = tool_task.accuracy(model, tokenizer)
    before_without = tool_task.accuracy(model, tokenizer, use_tools=False)

    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), learning_rate=5e-4, max_steps=100,
                      per_device_train_batch_size=16, num_generations=8,
                      max_completion_length=tool_task.MAX_COMPLETION_LENGTH, max_tool_calling_iterations=1,
                      logging_steps=10, seed=0, **QUIET)
    trainer = GRPOTrainer(start, tool_task.answer_reward, args=args, train_dataset=tool_task.load_prompts("train"),
                          processing_class=tool_task.task_tokenizer(start),
                          environment_factory=tool_task.CalculatorEnvironment)
    trainer.train()
    after = tool_task.accuracy(trainer.model, tokenizer)
    after_without = tool_task.accuracy(trainer.model, tokenizer, use_tools=False)

    calls = [entry["tools/call_frequency"] for entry in trainer.state.log_history if "tools/call_frequency" in entry]
    print(f"[tool task] held-out accuracy with the tool {before['accuracy']:.3f} -> {after['accuracy']:.3f} (calls "
          f"{before['call_frequency']:.2f} -> {after['call_frequency']:.2f}), without {before_without['accuracy']:.3f}"
          f" -> {after_without['accuracy']:.3f}; train call frequency by 10 steps {calls}; "
          f"{time.perf_counter() - started:.0f} s")
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert after["call_frequency"] > before["call_frequency"] + 0.3
    assert before_without["accuracy"] <= 0.02 and after_without["accuracy"] <= 0.02  # only the tool gets it right
