"""Verifier rewards for RL with verifiable rewards (RLVR) and an RLAIF judge, each a TRL-compatible reward function
(`f(prompts, completions, completion_ids, **columns) -> list[float | None]`, see `hf_align.rewards`).

- `accuracy_reward` / `math_answer_reward(answer_column)`: math answer equivalence with `math_verify`, as TRL's
  `accuracy_reward`.
- `exact_match_reward(answer_column)`: the final answer equals the gold answer after normalisation.
- `regex_reward(pattern)`, `think_format_reward`, `think_answer_format_reward`: 1.0 when the completion matches.
- `code_reward(tests_column, timeout_s, memory_mb)`: the fraction of a row's tests the completion's code passes, run
  in a sandboxed subprocess.
- `JudgeReward(judge_model, judge_tokenizer, principles)`: a local causal LM judges whether a completion follows
  principles (Constitutional AI, arXiv 2212.08073), from its next-token probabilities of "Yes" and "No".

Factories return instances of small classes rather than closures, so that reward functions stay picklable. Each has a
`__name__`, the name its metrics are logged under (`rewards/<name>/mean`); pass `name=` to tell two apart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
import torch

from . import data, models
from .logprobs import scored_forward
from .rewards import completion_text, loading_args

logger = logging.getLogger(__name__)

__all__ = [
    "JUDGE_TEMPLATE",
    "JudgeReward",
    "accuracy_reward",
    "code_reward",
    "exact_match_reward",
    "extract_code",
    "extract_final_answer",
    "math_answer_reward",
    "regex_reward",
    "think_answer_format_reward",
    "think_format_reward",
]


def _column(kwargs: dict, column: str, reward: str) -> list:
    """The dataset column a verifier reads, or an error naming the columns there are."""
    if column not in kwargs:
        available = sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric"))
        raise KeyError(f"The reward function '{reward}' reads the dataset column {column!r}, which the dataset does "
                       f"not have (its other columns: {available}). Pass the column's name to the factory.")
    return kwargs[column]


# ------------------------------------------------------------------------------------------------------ math answers


class _MathAnswerReward:
    def __init__(self, answer_column: str, name: str):
        self.answer_column = answer_column
        self.__name__ = name

    def __call__(self, completions, log_extra=None, **kwargs) -> list[float | None]:
        try:
            from latex2sympy2_extended import NormalizationConfig
            from math_verify import LatexExtractionConfig, parse, verify
        except ImportError as error:
            raise ImportError(f"The reward function '{self.__name__}' needs math-verify, which is not installed: "
                              'pip install "hf_align[math]"') from error
        golds = _column(kwargs, self.answer_column, self.__name__)
        # math_verify times out with signal.alarm, which only the main thread may use (as in TRL).
        main_thread = threading.current_thread() is threading.main_thread()
        parsing_timeout, verify_timeout = (10, 5) if main_thread else (None, None)
        answer_config = [LatexExtractionConfig(normalization_config=NormalizationConfig(units=True),
                                               boxed_match_priority=0, try_extract_without_anchor=False)]
        rewards, parsed = [], []
        for completion, gold in zip(completions, golds, strict=True):
            gold_parsed = parse(str(gold), parsing_timeout=parsing_timeout) if gold is not None else []
            if not gold_parsed:
                rewards.append(None)  # an answer we cannot read verifies nothing: the sample is skipped
                parsed.append("[unparseable gold]")
                continue
            answer = parse(completion_text(completion), extraction_config=answer_config,
                           extraction_mode="first_match", parsing_timeout=parsing_timeout)
            rewards.append(float(verify(gold_parsed, answer, timeout_seconds=verify_timeout)))
            parsed.append(str(answer) if answer else "[unparseable]")
        if log_extra is not None:
            log_extra(f"{self.__name__}_parsed", parsed)
        return rewards


def math_answer_reward(answer_column: str = "solution", *, name: str = "math_answer_reward"):
    """1.0 when the completion's answer is mathematically equivalent to the gold answer in `answer_column`, else 0.0;
    None (sample skipped) when the gold answer cannot be parsed. The completion's answer must be LaTeX, `\\boxed{}`
    first, as in TRL's `accuracy_reward` (same `math_verify` settings)."""
    return _MathAnswerReward(answer_column, name)


# TRL's `accuracy_reward`: gold answers in the `solution` column.
accuracy_reward = math_answer_reward("solution", name="accuracy_reward")


# ------------------------------------------------------------------------------------------------------ exact match

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_answer(text: str) -> str:
    """The final answer in a completion: the rest of the line after the last "####" (GSM8K), else after the last
    "answer:" (any case), else the last number, else the whole text."""
    for marker in (re.compile(r"####"), re.compile(r"answer\s*:", re.IGNORECASE)):
        found = list(marker.finditer(text))
        if found:
            return text[found[-1].end() :].split("\n", 1)[0]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else text


def _normalise(answer: str) -> str:
    """Lower case, single spaces, no surrounding spaces or final full stop."""
    return " ".join(answer.lower().split()).rstrip(".").strip()


def _as_number(answer: str) -> float | None:
    try:
        return float(answer.replace(",", "").lstrip("$"))
    except ValueError:
        return None


def _same_answer(answer: str, gold: str) -> bool:
    """Equal after `_normalise`, or equal numbers ("1,000" = "1000.0")."""
    answer, gold = _normalise(answer), _normalise(gold)
    if answer == gold:
        return True
    number, gold_number = _as_number(answer), _as_number(gold)
    return number is not None and gold_number is not None and number == gold_number


class _ExactMatchReward:
    def __init__(self, answer_column: str, extract_answer: bool, name: str):
        self.answer_column = answer_column
        self.extract_answer = extract_answer
        self.__name__ = name

    def __call__(self, completions, **kwargs) -> list[float | None]:
        golds = _column(kwargs, self.answer_column, self.__name__)
        rewards = []
        for completion, gold in zip(completions, golds, strict=True):
            if gold is None or not str(gold).strip():
                rewards.append(None)
                continue
            gold = str(gold).rsplit("####", 1)[-1]
            text = completion_text(completion)
            answer = extract_final_answer(text) if self.extract_answer else text
            rewards.append(1.0 if _same_answer(answer, gold) else 0.0)
        return rewards


def exact_match_reward(answer_column: str = "answer", *, extract_answer: bool = True,
                       name: str = "exact_match_reward"):
    """1.0 when the completion's answer equals the gold answer in `answer_column`, else 0.0; None for a row without
    a gold answer. Both are compared lower-cased with whitespace collapsed and a final full stop dropped, and as
    numbers when both are numbers ("1,000" matches "1000.0"). The completion's answer is `extract_final_answer(text)`
    with `extract_answer` (default), else the whole text; a gold answer holding "####" (GSM8K) is cut after it."""
    return _ExactMatchReward(answer_column, extract_answer, name)


# ------------------------------------------------------------------------------------------------------------ regex


class _RegexReward:
    def __init__(self, pattern: str, name: str):
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as error:
            raise ValueError(f"regex_reward: invalid pattern {pattern!r}: {error}") from error
        self.__name__ = name

    def __call__(self, completions, **kwargs) -> list[float]:
        return [1.0 if self.pattern.fullmatch(completion_text(c)) else 0.0 for c in completions]


def regex_reward(pattern: str, *, name: str = "regex_reward"):
    """1.0 when the whole completion matches `pattern` (`re.fullmatch`, `.` also matching newlines; put other flags
    inline, e.g. `(?i)`), else 0.0."""
    return _RegexReward(pattern, name)


# TRL's `think_format_reward`: one `<think>...</think>` block opening the completion, anything after it.
think_format_reward = regex_reward(r"<think>(?!.*<think>).*?</think>.*", name="think_format_reward")
# DeepSeek-R1's format: `<think>...</think>` then `<answer>...</answer>` and nothing else (whitespace aside).
think_answer_format_reward = regex_reward(
    r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*",
    name="think_answer_format_reward",
)


# ------------------------------------------------------------------------------------------------------------- code

_CODE_BLOCK = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_MAX_FILE_BYTES = 16 * 2**20  # the most a sandboxed program may write to one file
_SANDBOX_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")  # run per completion



def extract_code(text: str) -> str:
    """The code in a completion: the last fenced block (```python, ```py or a bare ```), else the whole text."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_sandbox_case(case: dict, timeout_s: float, output_name: str) -> tuple[int | None, str | None]:
    """Runs the sandbox runner on `case` (what `sandbox_runner.py` reads from `case.json`) in a fresh `python -I` in
    a temporary folder (its own session, an empty environment but HOME/TMPDIR pointing at the folder,
    stdin/stdout/stderr closed off), its whole process group killed when it ends or the wall-time `timeout_s` passes.
    Returns (its exit code, None on a timeout; the first 64 KB of the file `output_name` it wrote, None if none)."""
    with tempfile.TemporaryDirectory(prefix="hf_align_sandbox_") as folder:
        with open(os.path.join(folder, "case.json"), "w") as f:
            json.dump(case, f)
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", _SANDBOX_RUNNER], cwd=folder, env={"HOME": folder, "TMPDIR": folder},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None, None
        finally:
            _kill_group(process.pid)  # nothing may outlive the case; on a timeout, the whole group is stopped
            process.wait()
        try:
            with open(os.path.join(folder, output_name)) as f:
                return process.returncode, f.read(2**16)
        except OSError:
            return process.returncode, None


def run_sandboxed(code: str, tests: list[str], timeout_s: float, memory_mb: int) -> tuple[float, str]:
    """Runs `code` then each test in the sandbox (`run_sandbox_case`) and returns (the fraction of tests that ran
    without raising, an outcome for the log). Whatever goes wrong (the code raises, a limit is hit, the wall-time
    `timeout_s` passes) scores 0.0."""
    nonce = secrets.token_hex(16)
    case = {"code": code, "tests": tests, "nonce": nonce, "memory_bytes": memory_mb * 2**20,
            "cpu_s": math.ceil(timeout_s) + 1, "file_bytes": _MAX_FILE_BYTES}
    returncode, result = run_sandbox_case(case, timeout_s, "result")
    if returncode is None:
        return 0.0, "timeout"
    if returncode != 0:
        return 0.0, f"exit code {returncode}"
    if result is None:
        return 0.0, "no result"
    words = result[:200].split()
    if len(words) == 3 and words[0] == nonce and words[1] == "error":
        return 0.0, f"raised {words[2]}"
    if len(words) == 4 and words[0] == nonce and words[1] == "passed" and words[3] == str(len(tests)):
        passed = int(words[2])
        if 0 <= passed <= len(tests):
            return passed / len(tests), f"passed {passed}/{len(tests)}"
    return 0.0, "forged result"


def _tests_of(value, index: int, column: str) -> list[str] | None:
    """A row's tests as a list of code strings (one string is one test); None when the row has none."""
    if value is None or (isinstance(value, (str, list)) and not value):
        return None
    tests = [value] if isinstance(value, str) else value
    if not isinstance(tests, list) or not all(isinstance(test, str) for test in tests):
        raise TypeError(f"code_reward: column {column!r} of sample {index} must be a string or a list of strings "
                        f"of test code, got {value!r:.80}.")
    return tests


class _CodeReward:
    def __init__(self, tests_column: str, timeout_s: float, memory_mb: int, name: str):
        if timeout_s <= 0 or memory_mb < 32:
            raise ValueError(f"code_reward needs timeout_s > 0 and memory_mb >= 32, got {timeout_s} and {memory_mb}.")
        self.tests_column = tests_column
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.__name__ = name

    def __call__(self, completions, log_extra=None, **kwargs) -> list[float | None]:
        column = _column(kwargs, self.tests_column, self.__name__)
        cases = [(extract_code(completion_text(c)), _tests_of(t, i, self.tests_column))
                 for i, (c, t) in enumerate(zip(completions, column, strict=True))]
        runnable = [i for i, (_, tests) in enumerate(cases) if tests is not None]
        results: dict[int, tuple[float, str]] = {}
        if runnable:
            with ThreadPoolExecutor(max_workers=min(len(runnable), os.cpu_count() or 1)) as pool:
                futures = {i: pool.submit(run_sandboxed, *cases[i], self.timeout_s, self.memory_mb) for i in runnable}
                results = {i: future.result() for i, future in futures.items()}
        if log_extra is not None:
            log_extra(f"{self.__name__}_outcome", [results[i][1] if i in results else "no tests"
                                                   for i in range(len(cases))])
        return [results[i][0] if i in results else None for i in range(len(cases))]


def code_reward(tests_column: str = "tests", *, timeout_s: float = 5.0, memory_mb: int = 512,
                name: str = "code_reward"):
    """The fraction of a row's tests (column `tests_column`: a string of test code is one test, a list holds one per
    entry, e.g. `assert f(2) == 4`) that pass after the completion's code (`extract_code`) has run; 0.0 when the code
    raises, times out (`timeout_s` of wall time) or hits a limit (`memory_mb` of address space); None for a row with
    no tests. The code runs as module `solution` (an `if __name__ == "__main__":` block does not run), tests in its
    namespace, one sandboxed process per completion, up to `os.cpu_count()` at a time (`run_sandboxed`).

    The sandbox protects the machine from mistaken or careless code (forks, network, runaway memory, writes outside
    its folder, killing other processes), also when running as root where RLIMIT_NPROC does not bind; a program
    written to probe the interpreter could still forge a pass. Run untrusted code at scale inside a container too."""
    return _CodeReward(tests_column, timeout_s, memory_mb, name)


# ------------------------------------------------------------------------------------------------------------ judge

JUDGE_TEMPLATE = (
    "Here is a conversation and a response to it.\n\n"
    "Conversation:\n{conversation}\n\n"
    "Response:\n{response}\n\n"
    "Principles:\n{principles}\n\n"
    "Does the response follow every principle above? Answer Yes or No."
)


def _conversation_text(prompt) -> str:
    """A prompt as the judge reads it: the string, or `Role: content` paragraphs for messages."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


class JudgeReward:
    """An RLAIF reward (Constitutional AI, arXiv 2212.08073): a local causal LM judges whether each completion follows
    `principles`, and the reward is `P(Yes) / (P(Yes) + P(No))` of the judge's next token, read in one forward pass
    (no generation), `batch_size` samples at a time, without gradients.

    The judge reads `JUDGE_TEMPLATE` filled with the prompt (messages as `Role: content` paragraphs), the completion
    and the numbered principles. A judge tokenizer with a chat template gets it as one user message followed by the
    assistant turn's start, and the answers are the tokens "Yes" / "No"; without one, the text ends with
    "\\nAnswer:" and the answers are " Yes" / " No" (each answer's first token). The query keeps its last tokens when
    it is longer than the judge's context, so the principles and the question survive.

    `judge_model`: a causal LM or a model id / path (loaded with `model_init_kwargs`, fp32 by default);
    `judge_tokenizer`: its tokenizer, or None to load the model's own. The judge is put in eval mode.
    """

    def __init__(self, judge_model, judge_tokenizer, principles: list[str] | str, *, batch_size: int = 8,
                 model_init_kwargs: dict | None = None, name: str = "judge_reward"):
        principles = [principles] if isinstance(principles, str) else list(principles)
        if not principles or not all(isinstance(p, str) and p.strip() for p in principles):
            raise ValueError("JudgeReward needs at least one principle, each a non-empty string.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        load_args = loading_args(model_init_kwargs)
        if isinstance(judge_model, str):
            judge_model = models.load_model(judge_model, load_args)
        tokenizer = judge_tokenizer if judge_tokenizer is not None else models.load_tokenizer(judge_model, load_args)
        self.model = judge_model.eval()
        self.tokenizer = models.prepare_tokenizer(tokenizer, models.unwrap_causal_lm(judge_model))
        self.principles_text = "\n".join(f"{i}. {p.strip()}" for i, p in enumerate(principles, start=1))
        self.batch_size = batch_size
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        prefix = "" if self.uses_chat_template else " "
        self.answer_ids = [tokenizer.encode(prefix + a, add_special_tokens=False)[0] for a in ("Yes", "No")]
        if self.answer_ids[0] == self.answer_ids[1]:
            raise ValueError("The judge tokenizer starts 'Yes' and 'No' with the same token: they cannot be told "
                             "apart.")
        config = models.unwrap_causal_lm(judge_model).config.get_text_config()
        limits = [n for n in (tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
                  if isinstance(n, int) and n < 10**7]
        self.max_length = min(limits) if limits else None
        self.__name__ = name

    def to(self, device) -> JudgeReward:
        """Moves the judge model to `device`."""
        self.model.to(device)
        return self

    def query_ids(self, prompt, completion) -> list[int]:
        """The judge's input for one sample (see the class docstring), cut to its last `max_length` tokens."""
        question = JUDGE_TEMPLATE.format(conversation=_conversation_text(prompt), response=completion_text(completion),
                                         principles=self.principles_text)
        if self.uses_chat_template:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                                     add_generation_prompt=True, return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer(question + "\nAnswer:")["input_ids"]
        return data.truncate(list(ids), self.max_length, "keep_end")

    def scores(self, prompts: list, completions: list) -> torch.Tensor:
        """`P(Yes) / (P(Yes) + P(No))` `[N]` (float32, CPU) for each prompt and completion."""
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts and {len(completions)} completions: one of each per sample.")
        device = models.unwrap_causal_lm(self.model).get_input_embeddings().weight.device
        answer_ids = torch.tensor(self.answer_ids, device=device)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            batch = slice(start, start + self.batch_size)
            rows = [torch.tensor(self.query_ids(p, c)) for p, c in zip(prompts[batch], completions[batch])]
            lengths = torch.tensor([len(r) for r in rows], device=device)
            input_ids = data.pad(rows, self.tokenizer.pad_token_id).to(device)
            attention_mask = (torch.arange(input_ids.size(1), device=device) < lengths[:, None]).long()
            # Each row's last position, scored for "Yes" then for "No": log-probs of the model's own logits
            # (`scored_forward`), whose difference is logit_Yes - logit_No, the softmax's normaliser cancelling.
            last = (torch.arange(len(rows), device=device).repeat(2), (lengths - 1).repeat(2))
            targets = answer_ids.repeat_interleave(len(rows))
            with torch.inference_mode():
                (logps,) = scored_forward(self.model, input_ids, attention_mask, None,
                                          lambda hidden: (hidden[last], targets)).values
            yes, no = logps.chunk(2)
            scores.append(torch.sigmoid(yes - no).cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return self.scores(prompts, completions).tolist()

    def rank(self, prompts: list, completions_a: list, completions_b: list) -> list[int]:
        """For each prompt, 0 when completion A follows the principles at least as well as B (by `scores`), else 1
        (e.g. to label Online DPO pairs)."""
        if not len(prompts) == len(completions_a) == len(completions_b):
            raise ValueError("rank needs as many completions A and B as prompts.")
        both = self.scores(list(prompts) * 2, list(completions_a) + list(completions_b))
        a, b = both[: len(prompts)], both[len(prompts) :]
        return [0 if score_a >= score_b else 1 for score_a, score_b in zip(a.tolist(), b.tolist())]
