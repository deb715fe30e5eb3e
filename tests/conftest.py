"""Fixtures shared by every test file.

The environment is fixed before anything else is imported (tqdm and huggingface_hub read it at import time):
nothing is fetched from a hub, progress bars are off, and torch uses one thread (the test machines are shared).

Session-scoped, built once:

- `tiny_model_path`: a folder holding the offline tiny causal-LM (Llama) + its chat tokenizer
  (`hf_align.defaults.build_tiny_model`). Load it with `from_pretrained`; never write into it.
- `tiny_seqcls_path`: the same with a one-label sequence-classification head (reward models).
- `hf_align_home` (autouse): `$HF_ALIGN_HOME` points at a session temp folder, so `default_model_path()` and the
  symbolic name "hf-align/tiny-chat" never touch the real home cache.

Function-scoped helpers:

- `tiny_model`, `tiny_tokenizer`: fresh fp32 copies loaded from `tiny_model_path` (mutate freely).
- `embedded_data(name, n=None, split="train")`: the first `n` rows (all when `None`) of any embedded dataset of
  `hf_align.defaults.load_default_dataset`.
- `preference_data(kind="preference", n=None, split="train")`: the same for the preference datasets; `kind` is
  "preference" / "text" or "preference_conversational" / "conversational".
"""

from __future__ import annotations

import os

os.environ["TQDM_DISABLE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs torch on one thread (the CPU is shared)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session", autouse=True)
def hf_align_home(tmp_path_factory):
    """`$HF_ALIGN_HOME` (the default-model cache) for the whole session: a temp folder, restored afterwards."""
    home = tmp_path_factory.mktemp("hf_align_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ALIGN_HOME", str(home))
        patch.setenv("TQDM_DISABLE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        try:
            from datasets.utils.logging import disable_progress_bar

            disable_progress_bar()
        except ImportError:  # pragma: no cover - datasets is a hard dependency
            pass
        yield home


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """Folder of the tiny causal LM + tokenizer, built once per session. Treat as read-only."""
    from hf_align.defaults import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat") / "model")


@pytest.fixture(scope="session")
def tiny_seqcls_path(tmp_path_factory) -> str:
    """Folder of the tiny one-label sequence classifier + tokenizer, built once per session. Treat as read-only."""
    from hf_align.defaults import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat-seqcls") / "model", task="seq-cls")


@pytest.fixture
def tiny_model(tiny_model_path):
    """A fresh fp32 `LlamaForCausalLM` loaded from `tiny_model_path`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


@pytest.fixture
def tiny_tokenizer(tiny_model_path):
    """A fresh tokenizer loaded from `tiny_model_path` (it has a pad token and a ChatML chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


_PREFERENCE_KINDS = {
    "preference": "preference",
    "text": "preference",
    "standard": "preference",
    "preference_conversational": "preference_conversational",
    "conversational": "preference_conversational",
}


@pytest.fixture(scope="session")
def _embedded_cache():
    return {}


@pytest.fixture
def embedded_data(_embedded_cache):
    """`embedded_data(name, n=None, split="train")`: the first `n` rows of an embedded dataset (a `Dataset`)."""
    from hf_align.defaults import load_default_dataset

    def get(name: str, n: int | None = None, split: str = "train"):
        key = (name, split)
        if key not in _embedded_cache:
            _embedded_cache[key] = load_default_dataset(name, split)
        dataset = _embedded_cache[key]
        if n is None:
            return dataset
        if n > len(dataset):
            raise ValueError(f"{name}/{split} has only {len(dataset)} rows, {n} asked for.")
        return dataset.select(range(n))

    return get


@pytest.fixture
def preference_data(embedded_data):
    """`preference_data(kind="preference", n=None, split="train")`: the first `n` preference pairs; `kind` is
    "preference" (or "text") for strings, "preference_conversational" (or "conversational") for message lists."""

    def get(kind: str = "preference", n: int | None = None, split: str = "train"):
        if kind not in _PREFERENCE_KINDS:
            raise ValueError(f"Unknown preference kind {kind!r}; one of {sorted(_PREFERENCE_KINDS)}.")
        return embedded_data(_PREFERENCE_KINDS[kind], n, split)

    return get


@pytest.fixture(scope="session")
def rlvr_start_path(tmp_path_factory) -> str:
    """The embedded tiny model after the RLVR examples' short SFT on the "comparisons" training questions (built once
    per session): it answers with a number, right about a third of the time."""
    from hf_align.scripts import sft_warm_start

    torch.set_num_threads(1)
    return sft_warm_start("comparisons", str(tmp_path_factory.mktemp("rlvr") / "sft"), learning_rate=2e-3,
                          num_train_epochs=5, disable_tqdm=True)


@pytest.fixture
def fixed_completions(monkeypatch):
    """`fixed_completions(completion)` replaces the online trainers' sampling: row `i` of a generation batch gets the
    token ids `completion(prompt_ids, i, tokenizer, model) -> list[int]` instead of a sample, so that tests can compute
    rewards, advantages and losses by hand, or give TRL's trainers the same completions."""
    import hf_align.rollout
    from hf_align.data import pad
    from hf_align.generation import Completions, encode_prompts

    def install(completion):
        def generate(model, tokenizer, prompts, sampling):
            prompt_ids = encode_prompts(tokenizer, prompts)
            rows = [torch.tensor(completion(ids, i, tokenizer, model)) for i, ids in enumerate(prompt_ids)]
            return Completions(prompt_ids=prompt_ids, completion_ids=pad(rows, tokenizer.pad_token_id),
                               completion_mask=pad([torch.ones_like(row) for row in rows], 0),
                               texts=tokenizer.batch_decode(rows, skip_special_tokens=True))

        monkeypatch.setattr(hf_align.rollout, "generate_completions", generate)

    return install

