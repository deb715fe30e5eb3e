"""Generate `comparisons.jsonl` / `comparisons_test.jsonl`, the embedded verifiable task for RLVR (GRPO and family).

Run once (`python hf_align/assets/make_comparisons.py`); the output is deterministic and committed as data. This
script is not imported at run time.

Design: "Which is larger, a or b?" for every ordered pair of distinct numbers from 0 to 20 (420 questions), answer
the larger number, checked by exact match (`hf_align.verifiers.exact_match_reward`). Train and test pairs never
overlap, and every number occurs in both, so what a model learns about ordering the numbers carries over to the
held-out pairs, unlike `prompts` (addition and subtraction), whose held-out sums a tiny model cannot work out from
the training ones.
"""

from __future__ import annotations

import json
import os
import random

SEED = 420
N_TRAIN = 300
N_TEST = 80


def build() -> dict[str, list[dict]]:
    pairs = [(a, b) for a in range(21) for b in range(21) if a != b]
    random.Random(SEED).shuffle(pairs)
    rows = [{"prompt": f"Question: Which is larger, {a} or {b}?\nAnswer:", "answer": str(max(a, b))} for a, b in pairs]
    return {"comparisons": rows[:N_TRAIN], "comparisons_test": rows[N_TRAIN : N_TRAIN + N_TEST]}


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for name, rows in build().items():
        with open(os.path.join(here, f"{name}.jsonl"), "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
        print(f"{name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
