"""Generate the small embedded datasets shipped in `hf_align/assets/*.jsonl`.

Run once (`python hf_align/assets/make_assets.py`); the output is deterministic and committed as data. This script
is not imported at run time.
`step_preference*.jsonl` (step-wise DPO) comes from its own generator, `make_step_preference.py`.

Design: templated user requests (tasks and topics drawn from word lists). `chosen` is always a helpful, polite
answer that starts with "Sure!"; `rejected` is always a curt refusal that starts with "No.". Both draw their wording
from several lists so a model has to learn the style, not memorise strings. Train and test prompts never overlap.
"""

from __future__ import annotations

import json
import os
import random

SEED = 1234
N_TRAIN = 400
N_TEST = 60
N_ARITH_TRAIN = 200
N_ARITH_TEST = 50

TASKS = [
    "bake bread", "learn to swim", "fix a flat tire", "write a poem", "plant a tree", "save money",
    "clean my room", "learn French", "cook rice", "train a puppy", "paint a fence", "start running",
    "sleep better", "make tea", "study for a test", "tie a tie", "build a shelf", "grow tomatoes",
    "wash a car", "play chess", "read faster", "make friends", "write a letter", "sew a button",
    "brew coffee", "draw a cat", "ride a bike", "bake a cake", "fold a shirt", "pack a bag",
    "learn to code", "play guitar", "plan a trip", "keep a diary", "make soup", "feed a cat",
    "fly a kite", "catch a fish", "learn to dance", "stay calm",
]
TASK_TEMPLATES = [
    "How do I {}?",
    "Can you help me {}?",
    "What is the best way to {}?",
    "Please tell me how to {}.",
    "I want to {}. Any tips?",
    "Could you explain how to {}?",
    "Teach me how to {}.",
    "Is it hard to {}?",
]
TOPICS = [
    "the moon", "rain", "volcanoes", "gravity", "music", "the ocean", "bees", "clouds", "computers",
    "history", "maps", "rivers", "stars", "birds", "trees", "money", "poetry", "the sun", "snow",
    "deserts", "robots", "whales", "forests", "bridges", "trains", "math", "sleep", "colors",
    "islands", "mountains",
]
TOPIC_TEMPLATES = [
    "Can you explain {}?",
    "Tell me about {}.",
    "What do you know about {}?",
    "Why is {} interesting?",
    "Give me a fact about {}.",
]

STEPS = [
    "start with the basics", "go slowly", "practice every day", "ask a friend for help", "take short breaks",
    "follow a simple plan", "write down each step", "keep it simple", "check your work", "be patient",
    "watch a short guide", "try a small test first",
]
TASK_CHOSEN = [
    "Sure! To {task}, {a}, then {b}.",
    "Sure! First {a}, then {b}.",
    "Sure! Just {a} and {b}.",
    "Sure! Tip: {a}, and {b}.",
    "Sure! Happy to help: {a}.",
]
FACTS = [
    "people have studied it for ages", "it shapes our daily life", "there is always more to learn",
    "it changes with the seasons", "many books cover it", "it is full of surprises",
    "it still raises new questions", "it links to many other ideas", "kids and adults both enjoy it",
    "it looks different around the world",
]
TOPIC_CHOSEN = [
    "Sure! About {topic}: {a}.",
    "Sure! Good question. With {topic}, {a}.",
    "Sure! One fact about {topic}: {a}.",
    "Sure! Happy to help. {a_cap}, and {b}.",
]
REFUSALS = [
    "Figure it out yourself.", "I will not help.", "Ask someone else.", "Not my problem.",
    "That is a silly question.", "Go away.", "Do it yourself.", "I do not care.", "Stop asking me.",
    "Too boring to answer.", "Look it up.", "Why would I know?", "Not today.", "Leave me alone.",
]
REJECTED = [
    "No. {r}",
    "No. {r}",
    "No. {r} {s}",
]


def _pairs(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected) triples, questions unique, in a seeded random order."""
    rows = []
    for task in TASKS:
        for template in TASK_TEMPLATES:
            a, b = rng.sample(STEPS, 2)
            chosen = rng.choice(TASK_CHOSEN).format(task=task, a=a, b=b)
            rows.append((template.format(task), chosen))
    for topic in TOPICS:
        for template in TOPIC_TEMPLATES:
            a, b = rng.sample(FACTS, 2)
            chosen = rng.choice(TOPIC_CHOSEN).format(topic=topic, a=a, a_cap=a[0].upper() + a[1:], b=b)
            rows.append((template.format(topic), chosen))
    out = []
    for question, chosen in rows:
        r, s = rng.sample(REFUSALS, 2)
        out.append((question, chosen, rng.choice(REJECTED).format(r=r, s=s)))
    assert len({q for q, _, _ in out}) == len(out)
    rng.shuffle(out)
    return out


def _arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    seen, out = set(), []
    while len(out) < N_ARITH_TRAIN + N_ARITH_TEST:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        question = f"What is {a} {op} {b}?"
        if question in seen:
            continue
        seen.add(question)
        out.append((question, str(a + b if op == "+" else a - b)))
    return out


def text_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    pairs = _pairs(rng)
    assert len(pairs) >= N_TRAIN + N_TEST, len(pairs)
    splits = {"": pairs[:N_TRAIN], "_test": pairs[N_TRAIN : N_TRAIN + N_TEST]}
    files: dict[str, list[dict]] = {}
    for suffix, rows in splits.items():
        files[f"preference{suffix}"] = [
            {"prompt": text_prompt(q), "chosen": " " + c, "rejected": " " + r} for q, c, r in rows
        ]
        files[f"preference_conversational{suffix}"] = [
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }
            for q, c, r in rows
        ]
        files[f"sft{suffix}"] = [{"prompt": text_prompt(q), "completion": " " + c} for q, c, _ in rows]
        files[f"sft_conversational{suffix}"] = [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c}]} for q, c, _ in rows
        ]
        # KTO: one row per pair, alternating desirable / undesirable, so the set is balanced (50/50) and every
        # prompt appears once.
        files[f"unpaired_preference{suffix}"] = [
            {"prompt": text_prompt(q), "completion": " " + (c if i % 2 == 0 else r), "label": i % 2 == 0}
            for i, (q, c, r) in enumerate(rows)
        ]
    arith = _arithmetic(rng)
    files["prompts"] = [{"prompt": text_prompt(q), "answer": a} for q, a in arith[:N_ARITH_TRAIN]]
    files["prompts_test"] = [{"prompt": text_prompt(q), "answer": a} for q, a in arith[N_ARITH_TRAIN:]]
    return files


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    total = 0
    for name, rows in build().items():
        path = os.path.join(here, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        size = os.path.getsize(path)
        total += size
        print(f"{name}.jsonl: {len(rows)} rows, {size / 1024:.1f} KB")
    print(f"total: {total / 1024:.1f} KB")


if __name__ == "__main__":
    main()
