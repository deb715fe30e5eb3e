"""Generate `step_preference.jsonl` / `step_preference_test.jsonl`, the embedded step-level preference data for
step-wise DPO (Step-DPO, arXiv 2406.18629).

Run once (`python hf_align/assets/make_step_preference.py`); the output is deterministic and committed as data. This
script is not imported at run time.

Design: small arithmetic word problems solved in two or three steps ("Step 1: 3 + 4 = 7."), the last step followed by
"The answer is 7.". Each row locates the first wrong step of a flawed solution, as in the Step-DPO data:
`initial_reason_steps` holds the verified steps before it (each ending with "\\n", possibly none), `chosen` the
correct next step and `rejected` the wrong one: two times in three the question misread (another operation than the
question's words ask for, e.g. "7 + 2" for "eats 2"), else an arithmetic slip of one or two; the answer line after
a wrong last step repeats its wrong result. The columns concatenate as `prompt + initial_reason_steps + step`, and
the prompt ends with a newline, so the tokenized prompt is a prefix of every tokenized row. Which operation each step
needs follows from the question's wording, so a model can learn to spot a misread on new questions; train and test
questions never overlap.
"""

from __future__ import annotations

import json
import os
import random

SEED = 2406
N_TRAIN = 200
N_TEST = 40

NAMES = ["Tom", "Ann", "Sam", "Lia", "Ben", "Mia", "Max", "Zoe", "Leo", "Eva", "Kai", "Ivy"]
OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}

# (question template, operations applied left to right: the first to a and b, each next to the result and the next
# number, and the ranges the numbers are drawn from).
PROBLEMS = [
    ("{n} has {a} apples and buys {b} more, then eats {c}. How many apples are left?", "+-",
     [(2, 12), (2, 9), (1, 9)]),
    ("A box holds {a} pens. {n} buys {b} boxes and gives away {c} pens. How many pens does {n} have?", "*-",
     [(2, 6), (2, 5), (1, 9)]),
    ("{n} reads {a} pages a day for {b} days, then {c} more pages. How many pages did {n} read?", "*+",
     [(2, 6), (2, 5), (1, 9)]),
    ("{n} had {a} coins, spent {b}, and then found {c}. How many coins does {n} have?", "-+",
     [(8, 15), (1, 7), (1, 9)]),
    ("There are {a} birds on a tree. {b} fly away and {c} more land. How many birds are there now?", "-+",
     [(8, 15), (1, 7), (1, 9)]),
    ("{n} buys {a} bags of {b} marbles, gives {c} away, then wins {d} more. How many marbles does {n} have?", "*-+",
     [(2, 5), (2, 5), (1, 6), (1, 9)]),
    ("{n} saves {a} dollars a week for {b} weeks, adds {c} dollars, then spends {d}. How many dollars are left?", "*+-",
     [(2, 6), (2, 4), (1, 9), (1, 9)]),
]


def text_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:\n"


def _solve(ops: str, numbers: list[int]) -> list[tuple[int, str, int, int]]:
    """The steps `(x, op, y, result)` of a problem."""
    steps, value = [], numbers[0]
    for op, number in zip(ops, numbers[1:]):
        result = OPS[op](value, number)
        steps.append((value, op, number, result))
        value = result
    return steps


def _step(index: int, x: int, op: str, y: int, result: int, last: bool) -> str:
    text = f"Step {index}: {x} {op} {y} = {result}."
    return text + f"\nThe answer is {result}." if last else text


def _wrong_step(rng: random.Random, x: int, op: str, y: int, result: int) -> tuple[str, int]:
    """The first wrong step's `(op, result)`: two times in three the question misread (another operation, computed
    right), else a slip (the right operation, off by one or two)."""
    misread = [other for other in OPS if other != op and OPS[other](x, y) != result and OPS[other](x, y) >= 0]
    if misread and rng.random() < 2 / 3:
        other = rng.choice(misread)
        return other, OPS[other](x, y)
    return op, rng.choice([result + d for d in (-2, -1, 1, 2) if result + d >= 0])


def _rows(rng: random.Random) -> list[dict]:
    seen, rows = set(), []
    while len(rows) < N_TRAIN + N_TEST:
        template, ops, ranges = rng.choice(PROBLEMS)
        numbers = [rng.randint(low, high) for low, high in ranges]
        steps = _solve(ops, numbers)
        if any(result < 0 for *_, result in steps):
            continue
        names = dict(zip("abcd", numbers))
        question = template.format(n=rng.choice(NAMES), **names)
        if question in seen:
            continue
        seen.add(question)
        wrong = rng.randrange(len(steps))
        x, op, y, result = steps[wrong]
        last = wrong == len(steps) - 1
        wrong_op, wrong_result = _wrong_step(rng, x, op, y, result)
        verified = "".join(_step(i + 1, *step, last=False) + "\n" for i, step in enumerate(steps[:wrong]))
        rows.append({
            "prompt": text_prompt(question),
            "initial_reason_steps": verified,
            "chosen": _step(wrong + 1, x, op, y, result, last),
            "rejected": _step(wrong + 1, x, wrong_op, y, wrong_result, last),
        })
    return rows


def build() -> dict[str, list[dict]]:
    rows = _rows(random.Random(SEED))
    return {"step_preference": rows[:N_TRAIN], "step_preference_test": rows[N_TRAIN:]}


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for name, rows in build().items():
        path = os.path.join(here, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        print(f"{name}.jsonl: {len(rows)} rows, {os.path.getsize(path) / 1024:.1f} KB")


if __name__ == "__main__":
    main()
