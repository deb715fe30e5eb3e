"""The embedded default: tiny chat model + tokenizer + small datasets (hf_align.defaults)."""

import json
import os

import pytest
import torch

from hf_align import defaults
from hf_align.defaults import (
    DEFAULT_MODEL_NAME,
    build_tiny_model,
    default_model_path,
    is_default_model_name,
    load_default_dataset,
)

torch.set_num_threads(1)

COLUMNS = {
    "preference": {"prompt", "chosen", "rejected"},
    "preference_conversational": {"prompt", "chosen", "rejected"},
    "sft": {"prompt", "completion"},
    "sft_conversational": {"messages"},
    "unpaired_preference": {"prompt", "completion", "label"},
    "prompts": {"prompt", "answer"},
}


def _prompt_key(name, row):
    if name == "sft_conversational":
        return row["messages"][0]["content"]
    if name == "preference_conversational":
        return row["prompt"][0]["content"]
    return row["prompt"]


# ------------------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_dataset_columns_sizes_and_split_disjoint(name):
    train, test = load_default_dataset(name), load_default_dataset(name, "test")
    assert set(train.column_names) == COLUMNS[name] == set(test.column_names)
    if name == "prompts":
        assert 150 <= len(train) <= 250 and 40 <= len(test) <= 80
    else:
        assert 350 <= len(train) <= 450 and 50 <= len(test) <= 80
    train_prompts = {_prompt_key(name, r) for r in train}
    test_prompts = {_prompt_key(name, r) for r in test}
    assert len(train_prompts) == len(train) and len(test_prompts) == len(test)
    assert not train_prompts & test_prompts


def test_load_is_deterministic_and_default_split_is_train():
    assert load_default_dataset("preference").to_list() == load_default_dataset("preference", "train").to_list()
    assert load_default_dataset("sft", "test").to_list() == load_default_dataset("sft", "test").to_list()


def test_unknown_name_or_split_raises():
    with pytest.raises(ValueError, match="preference_conversational"):
        load_default_dataset("nope")
    with pytest.raises(ValueError, match="train"):
        load_default_dataset("preference", "validation")


def test_preference_content_is_consistent_across_formats():
    for split in ("train", "test"):
        text = load_default_dataset("preference", split)
        conv = load_default_dataset("preference_conversational", split)
        sft = load_default_dataset("sft", split)
        sft_conv = load_default_dataset("sft_conversational", split)
        unpaired = load_default_dataset("unpaired_preference", split)
        assert len(text) == len(conv) == len(sft) == len(sft_conv) == len(unpaired)
        for t, c, s, sc, u in zip(text, conv, sft, sft_conv, unpaired):
            # Text prompts end with a separator; completions start with a space and have a consistent style.
            assert t["prompt"].startswith("Question: ") and t["prompt"].endswith("\nAnswer:")
            assert t["chosen"].startswith(" Sure!") and t["rejected"].startswith(" No.")
            assert c["prompt"] == [{"role": "user", "content": t["prompt"][len("Question: ") : -len("\nAnswer:")]}]
            assert c["chosen"] == [{"role": "assistant", "content": t["chosen"][1:]}]
            assert c["rejected"] == [{"role": "assistant", "content": t["rejected"][1:]}]
            assert (s["prompt"], s["completion"]) == (t["prompt"], t["chosen"])
            assert [m["role"] for m in sc["messages"]] == ["user", "assistant"]
            assert sc["messages"][1]["content"] == t["chosen"][1:]
            assert u["prompt"] == t["prompt"]
            assert u["completion"] == (t["chosen"] if u["label"] else t["rejected"])
        labels = unpaired["label"]
        assert all(isinstance(x, bool) for x in labels) and 0.4 < sum(labels) / len(labels) < 0.6


def test_prompts_arithmetic_answers_are_correct():
    for row in load_default_dataset("prompts", "test"):
        expr = row["prompt"][len("Question: What is ") : -len("?\nAnswer:")]
        a, op, b = expr.split()
        assert str(int(a) + int(b) if op == "+" else int(a) - int(b)) == row["answer"]


# ---------------------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_model_reloads_and_generates(tiny_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert isinstance(model, LlamaForCausalLM)
    assert len(tok) <= model.config.vocab_size
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert model.config.bos_token_id is not None
    assert tok.eos_token_id in model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    # Weights on disk are what was loaded (tied lm_head is not stored separately).
    saved = load_file(os.path.join(tiny_path, "model.safetensors"))
    state = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    # The transformers tokenizer gives the same ids as the raw tokenizers file, and adds no BOS / EOS.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(os.path.join(tiny_path, "tokenizer.json"))
    text = "Question: How do I bake bread?\nAnswer: Sure! Start small."
    ids = tok(text)["input_ids"]
    assert ids == raw.encode(text).ids
    assert not set(ids) & set(tok.all_special_ids)
    assert tok.decode(ids) == text
    batch = tok([text, "Question: Hi?\nAnswer:"], padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 3


def test_chat_template(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    prompt = [{"role": "user", "content": "How do I bake bread?"}]
    full = prompt + [{"role": "assistant", "content": "Sure! Start small."}]
    rendered_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    rendered_full = tok.apply_chat_template(full, tokenize=False)
    assert rendered_prompt == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    assert rendered_full == rendered_prompt + "Sure! Start small.<|im_end|>\n"
    assert tok.apply_chat_template(prompt, tokenize=False) == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n"
    # Special tokens are single ids, and the prompt's tokens are a prefix of the full conversation's.
    p_ids = tok(rendered_prompt)["input_ids"]
    f_ids = tok(rendered_full)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids
    assert p_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    # `{% generation %}` markers: the assistant mask covers the answer and its <|im_end|>.
    out = tok.apply_chat_template(full, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "Sure! Start small.<|im_end|>"


@pytest.mark.parametrize("name", ["preference", "unpaired_preference", "sft", "prompts"])
def test_prompt_tokens_are_prefix_of_prompt_plus_completion(tiny_path, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    rows = load_default_dataset(name).to_list() + load_default_dataset(name, "test").to_list()
    keys = {"preference": ["chosen", "rejected"], "unpaired_preference": ["completion"], "sft": ["completion"]}
    keys = keys.get(name, ["answer"])
    total = bad = 0
    for row in rows:
        p_ids = tok(row["prompt"])["input_ids"]
        for key in keys:
            completion = row[key] if key != "answer" else " " + row[key]
            ids = tok(row["prompt"] + completion)["input_ids"]
            total += 1
            bad += ids[: len(p_ids)] != p_ids
            assert len(ids) <= 64
    assert bad <= 0.01 * total


def test_build_is_deterministic(tmp_path, tiny_path):
    from safetensors.torch import load_file

    other = build_tiny_model(tmp_path / "again")
    a = load_file(os.path.join(tiny_path, "model.safetensors"))
    b = load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "chat_template.jinja"):
        with open(os.path.join(tiny_path, name)) as fa, open(os.path.join(other, name)) as fb:
            assert fa.read() == fb.read()
    different = load_file(os.path.join(build_tiny_model(tmp_path / "seed1", seed=1), "model.safetensors"))
    assert not all(torch.equal(a[k], different[k]) for k in a)


def test_seq_cls_variant(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = build_tiny_model(tmp_path / "rm", task="seq-cls")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["Question: Hi?\nAnswer: Sure! Hello.", "Question: Hi?\nAnswer: No."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 1)
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "bad", task="nope")


def test_default_model_path_builds_once_into_cache(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HF_ALIGN_HOME", str(home))
    path = default_model_path()
    assert os.path.dirname(path) == str(home) and os.path.basename(path).startswith("tiny-chat-")
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert default_model_path("causal-lm") == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    rm = default_model_path("seq-cls")
    assert rm != path and os.path.dirname(rm) == str(home)
    assert sorted(os.listdir(home)) == sorted({os.path.basename(path), os.path.basename(rm)})
    with pytest.raises(ValueError):
        default_model_path("nope")


def test_default_model_path_lost_race_uses_existing(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HF_ALIGN_HOME", str(home))
    path = default_model_path()
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    # Pretend the folder was not there at the first check (another rank renames it in while we build).
    real = defaults._is_complete
    calls = []

    def first_says_missing(p):
        calls.append(p)
        return False if len(calls) == 1 else real(p)

    monkeypatch.setattr(defaults, "_is_complete", first_says_missing)
    assert default_model_path() == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime  # the winner's build is kept
    assert os.listdir(home) == [os.path.basename(path)]  # our temporary build is cleaned up


def test_is_default_model_name():
    assert DEFAULT_MODEL_NAME == "hf-align/tiny-chat"
    assert is_default_model_name(DEFAULT_MODEL_NAME)
    assert not is_default_model_name("Qwen/Qwen2.5-0.5B")
    assert not is_default_model_name(None)
