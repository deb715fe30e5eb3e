"""Generate `belief_preference.jsonl` / `belief_preference_test.jsonl`, the embedded toy pluralistic-alignment task
for distributional GDPO (arXiv 2412.20299).

Run once (`python hf_align/assets/make_belief_preference.py`); the output is deterministic and committed as data.
This script is not imported at run time.

Design: a town asks five groups of residents opinion questions. A group's answers follow a distribution set by how
much the group leans "Yes" (farmers lean Yes, artists lean No, teachers are split), so the distribution is the same
for every question of a kind and a model can learn it from the group's name. Two kinds of question: "build a new X"
(beliefs " Yes." / " No.") and "spend more on X" (" Yes." / " No." / " Unsure.", a fixed fifth unsure). Each row
is one resident: a belief drawn from the group's distribution, a `chosen` response consistent with that belief and
a `rejected` response stating another belief. Train and test questions never overlap (test rows are new questions
asked of the same groups). In the test split every prompt appears twice: two members who disagree, the second
holding the belief of the first one's `rejected` response, with `chosen` and `rejected` swapped. A model that does
not read the belief scores exactly 50% pair accuracy there.
"""

from __future__ import annotations

import json
import os
import random

SEED = 2412
N_TRAIN_QUESTIONS_PER_KIND = 20
N_TEST_QUESTIONS_PER_KIND = 2

GROUP_YES_LEAN = {"farmers": 0.8, "nurses": 0.65, "teachers": 0.5, "students": 0.35, "artists": 0.2}
UNSURE_SHARE = 0.2

BUILD_THINGS = [
    "park", "library", "bridge", "school", "stadium", "museum", "market", "road", "pool", "garden", "clinic",
    "station", "theater", "zoo", "harbor", "tower", "mall", "airport", "cinema", "playground", "bike lane",
    "hospital", "dog park", "town hall",
]
SPEND_THINGS = [
    "roads", "parks", "schools", "buses", "police", "libraries", "art", "music", "sports", "clean water",
    "street lights", "trash pickup", "snow removal", "youth clubs", "elder care", "tree planting", "fire safety",
    "bike paths", "health care", "trains", "museums", "playgrounds", "gardens", "bridges",
]
KINDS = {
    "build": {
        "question": "Should our town build a new {x}?",
        "beliefs": [" Yes.", " No."],
        "responses": {
            " Yes.": [" I support the new {x}.", " A new {x} would help us.", " Yes, build the {x} soon."],
            " No.": [" I oppose the new {x}.", " We do not need a new {x}.", " The {x} would cost too much."],
        },
    },
    "spend": {
        "question": "Should the town spend more on {x}?",
        "beliefs": [" Yes.", " No.", " Unsure."],
        "responses": {
            " Yes.": [" I support more money for {x}.", " More money for {x} would help us."],
            " No.": [" I oppose more money for {x}.", " We spend enough on {x}."],
            " Unsure.": [" I am not sure about {x} yet.", " I need to learn more about {x}."],
        },
    },
}


def group_distribution(lean: float, kind: str) -> list[float]:
    """The group's probability of each of `KINDS[kind]["beliefs"]`, rounded to cents, summing to exactly 1."""
    if kind == "build":
        probs = [lean, 1 - lean]
    else:
        probs = [lean * (1 - UNSURE_SHARE), (1 - lean) * (1 - UNSURE_SHARE), UNSURE_SHARE]
    probs = [round(p, 2) for p in probs]
    probs[-1] = round(1 - sum(probs[:-1]), 2)
    return probs


def prompt_text(group: str, question: str) -> str:
    return f"Group: {group}\nQuestion: {question}\nBelief:"


def _rows(questions: list[tuple[str, str]], rng: random.Random, disagreeing_pairs: bool) -> list[dict]:
    rows = []
    for kind, thing in questions:
        spec = KINDS[kind]
        for group, lean in GROUP_YES_LEAN.items():
            probs = group_distribution(lean, kind)
            belief = rng.choices(spec["beliefs"], weights=probs)[0]
            other = rng.choice([b for b in spec["beliefs"] if b != belief])
            row = {
                "prompt": prompt_text(group, spec["question"].format(x=thing)),
                "beliefs": list(spec["beliefs"]),
                "belief_distribution": probs,
                "belief": belief,
                "chosen": rng.choice(spec["responses"][belief]).format(x=thing),
                "rejected": rng.choice(spec["responses"][other]).format(x=thing),
            }
            rows.append(row)
            if disagreeing_pairs:
                rows.append({**row, "belief": other, "chosen": row["rejected"], "rejected": row["chosen"]})
    rng.shuffle(rows)
    return rows


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    train_questions, test_questions = [], []
    for kind, things in (("build", BUILD_THINGS), ("spend", SPEND_THINGS)):
        things = list(things)
        rng.shuffle(things)
        test_questions += [(kind, x) for x in things[:N_TEST_QUESTIONS_PER_KIND]]
        train_questions += [(kind, x) for x in things[N_TEST_QUESTIONS_PER_KIND:][:N_TRAIN_QUESTIONS_PER_KIND]]
    return {
        "belief_preference": _rows(train_questions, rng, disagreeing_pairs=False),
        "belief_preference_test": _rows(test_questions, rng, disagreeing_pairs=True),
    }


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
