"""`hf_align.recommend` and `python -m hf_align.advisor`: every embedded dataset gets the right first trainer, TRL's
column sets are recognised (implicit prompts, conversations), planned trainers are marked, value types matter, and
an unknown dataset gets a message listing the recognised formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, IterableDataset

import hf_align
from hf_align import DataError, Recommendation, recommend
from hf_align.advisor import main
from hf_align.defaults import _DATASET_NAMES

FIRST_TRAINER = {
    "preference": "DPOTrainer",
    "preference_conversational": "DPOTrainer",
    "sft": "SFTTrainer",
    "sft_conversational": "SFTTrainer",
    "unpaired_preference": "KTOTrainer",
    "prompts": "GRPOTrainer",
    "belief_preference": "DistributionalGDPOTrainer",
    "step_preference": "StepDPOTrainer",
}


@pytest.mark.parametrize("name", sorted(_DATASET_NAMES))
def test_every_embedded_dataset_gets_a_recommendation(name, embedded_data):
    recommendations = recommend(embedded_data(name))
    assert recommendations and all(isinstance(r, Recommendation) for r in recommendations)
    first = recommendations[0]
    if name in FIRST_TRAINER:
        assert first.trainer == FIRST_TRAINER[name]
    assert set(first.required_columns) <= set(embedded_data(name).column_names)
    # Availability is read from hf_align.__all__ at call time.
    assert all(r.available == (r.trainer in hf_align.__all__) for r in recommendations)


def test_recommendations_follow_the_data_not_a_fixed_list():
    pairs = recommend([{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    assert [r.trainer for r in pairs][:4] == ["DPOTrainer", "IPOTrainer", "SimPOTrainer", "ORPOTrainer"]
    by_name = {r.trainer: r for r in pairs}
    assert "overfit" in by_name["IPOTrainer"].why and by_name["IPOTrainer"].config_hints == {"beta": 0.5}
    assert "no reference model" in by_name["SimPOTrainer"].why and "no reference model" in by_name["ORPOTrainer"].why
    assert by_name["DPOTrainer"].config == "DPOConfig"


def test_trl_implicit_prompt_pairs_text_and_conversational():
    text = recommend(Dataset.from_list([{"chosen": "Q? yes", "rejected": "Q? no"}]))
    assert text[0].trainer == "DPOTrainer" and text[0].required_columns == ("chosen", "rejected")
    assert "implicit" in text[0].why
    conversation = [{"role": "user", "content": "Q?"}]
    conversational = recommend([{"chosen": conversation + [{"role": "assistant", "content": "yes"}],
                                 "rejected": conversation + [{"role": "assistant", "content": "no"}]}])
    assert conversational[0].trainer == "DPOTrainer" and "conversational" in conversational[0].why


def test_trl_conversational_sft_and_language_modelling():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    chat = recommend([{"messages": messages}])
    assert [r.trainer for r in chat] == ["SFTTrainer", "SPINTrainer"]
    assert chat[0].config_hints == {"assistant_only_loss": True}
    text = recommend([{"text": "Once upon a time"}])
    assert [r.trainer for r in text] == ["SFTTrainer"]  # no prompts to self-play from


def test_unpaired_labels_value_types_and_balance():
    rows = [{"prompt": f"Q{i}?", "completion": " a", "label": i % 4 == 0} for i in range(40)]  # 10 vs 30
    kto = recommend(rows)[0]
    assert kto.trainer == "KTOTrainer"
    assert kto.config_hints["desirable_weight"] == 3.0  # λD·nD = λU·nU (KTO paper: ratio in [1, 4/3])
    scored = recommend([{"prompt": "Q?", "completion": " a", "label": 0.7}])[0]
    assert scored.trainer == "KTOTrainer" and "True/False" in scored.why


def test_prompts_for_rl_with_and_without_a_verifier_column():
    verified = recommend([{"prompt": "What is 2+2?", "solution": "4"}])
    assert [r.trainer for r in verified][:3] == ["GRPOTrainer", "RLOOTrainer", "ReMaxTrainer"]
    assert verified[0].required_columns == ("prompt", "solution") and "verifier" in verified[0].why
    unverified = recommend([{"prompt": "Write a poem."}])
    assert unverified[0].required_columns == ("prompt",) and "reward model" in unverified[0].why


def test_step_and_belief_columns_win_over_plain_pairs():
    step = {"prompt": "Q", "initial_reason_steps": "Step 1: ...\n", "chosen": "Step 2: a", "rejected": "Step 2: b"}
    assert recommend([step])[0].trainer == "StepDPOTrainer"
    belief = {"prompt": "Q", "beliefs": [" A.", " B."], "belief_distribution": [0.6, 0.4], "belief": " A.",
              "chosen": " a", "rejected": " b"}
    assert [r.trainer for r in recommend([belief])] == ["DistributionalGDPOTrainer", "DPOTrainer"]
    partial = recommend([{"prompt": "Q", "beliefs": [" A.", " B."], "belief_distribution": [0.6, 0.4]}])
    assert partial[0].trainer == "DistributionalGDPOTrainer" and "'belief'" in partial[0].why


def test_planned_trainers_are_marked_not_pretended(monkeypatch):
    monkeypatch.setattr(hf_align, "__all__", [name for name in hf_align.__all__ if name != "KTOTrainer"])
    kto = recommend([{"prompt": "Q?", "completion": " a", "label": True}])[0]
    assert kto.trainer == "KTOTrainer" and not kto.available and "planned" in str(kto)


def test_dataset_containers():
    rows = [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}] * 3
    dataset_dict = DatasetDict({"test": Dataset.from_list(rows[:1]), "train": Dataset.from_list(rows)})
    iterable = IterableDataset.from_generator(lambda: iter(rows))
    for dataset in (dataset_dict, iterable, Dataset.from_list(rows), rows, "preference"):
        assert recommend(dataset)[0].trainer == "DPOTrainer"


def test_unknown_dataset_lists_recognised_formats_and_renames():
    with pytest.raises(DataError) as info:
        recommend([{"question": "Q?", "response": "A", "score": 3}])
    message = str(info.value)
    assert "question (text), response (text), score (number)" in message
    for fragment in ("chosen, rejected", "initial_reason_steps", "belief_distribution", "label", "messages",
                     "GRPO", "rename_column('question', 'prompt')", "rename_column('response', 'completion')"):
        assert fragment in message, fragment
    with pytest.raises(DataError, match="'chosen' holds number values"):
        recommend([{"chosen": 1, "rejected": 0}])


def test_cli_prints_a_report_for_an_embedded_dataset(capsys):
    assert main(["belief_preference"]) == 0
    out = capsys.readouterr().out
    assert "Dataset: belief_preference, 200 rows" in out
    assert "1. DistributionalGDPOTrainer [available]" in out and "needs: prompt, beliefs" in out
    assert main(["prompts", "--split", "test"]) == 0
    assert "1. GRPOTrainer" in capsys.readouterr().out


def test_cli_local_files_and_unknown_data(tmp_path, capsys):
    pairs, unknown = tmp_path / "pairs.jsonl", tmp_path / "unknown.json"
    pairs.write_text("".join(json.dumps({"chosen": f"Q{i} a", "rejected": f"Q{i} b"}) + "\n" for i in range(3)))
    unknown.write_text(json.dumps([{"foo": 1}]))
    assert main([str(pairs)]) == 0 and "1. DPOTrainer" in capsys.readouterr().out
    assert main([str(unknown)]) == 2
    assert "Recognised formats" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "hf_align.advisor", "unpaired_preference"], cwd=root,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "1. KTOTrainer [available]" in result.stdout
    assert "RuntimeWarning" not in result.stderr
