"""The embedded default: an offline tiny chat model, its tokenizer and small datasets.

Examples and tests use these when given no model or dataset, so nothing is ever fetched from a hub:

- `DEFAULT_MODEL_NAME` ("hf-align/tiny-chat") is a symbolic name; `default_model_path()` builds the model it stands
  for (a randomly initialised tiny Llama with a byte-level BPE tokenizer trained on the embedded datasets) into a local
  cache once and returns the folder, which `from_pretrained` loads like any other checkpoint.
- `load_default_dataset(name, split)` reads the JSONL files shipped in `hf_align/assets` (generated once by
  `hf_align/assets/make_assets.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_NAME",
    "build_tiny_model",
    "default_model_path",
    "is_default_model_name",
    "load_default_dataset",
]

DEFAULT_MODEL_NAME = "hf-align/tiny-chat"

# Bump when the model, the tokenizer or the datasets they are trained on change, so stale caches are not reused.
_CACHE_VERSION = "v1"
_CACHE_SUBDIRS = {"causal-lm": f"tiny-chat-{_CACHE_VERSION}", "seq-cls": f"tiny-chat-seqcls-{_CACHE_VERSION}"}
_TASKS = tuple(_CACHE_SUBDIRS)

# The tokenizer of the tiny model is trained on these datasets' texts: the list is frozen with `_CACHE_VERSION`, so
# that adding a dataset does not change the model (its texts are tokenized by the same byte-level BPE all the same).
_TOKENIZER_DATASET_NAMES = (
    "preference",
    "preference_conversational",
    "sft",
    "sft_conversational",
    "unpaired_preference",
    "prompts",
)
_DATASET_NAMES = _TOKENIZER_DATASET_NAMES + ("belief_preference", "step_preference", "comparisons")
_SPLITS = ("train", "test")

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# ChatML. The `{% generation %}` markers let `apply_chat_template(..., return_assistant_tokens_mask=True)` (TRL's
# `assistant_only_loss`) find the assistant tokens; they render to nothing otherwise.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def is_default_model_name(name) -> bool:
    """Whether `name` is the symbolic name of the embedded tiny chat model."""
    return isinstance(name, str) and name.strip() == DEFAULT_MODEL_NAME


# --------------------------------------------------------------------------------------------------------- datasets


def _read_jsonl(filename: str) -> list[dict]:
    text = resources.files("hf_align").joinpath("assets", filename).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_default_dataset(name: str, split: str = "train"):
    """One of the small datasets shipped with hf_align, as a `datasets.Dataset`.

    `name`: "preference" (prompt/chosen/rejected strings), "preference_conversational" (the same as message lists),
    "sft" (prompt/completion), "sft_conversational" (messages), "unpaired_preference" (prompt/completion/label, KTO),
    "prompts" (arithmetic prompt/answer, for RL), "belief_preference" (prompt/beliefs/belief_distribution/belief/
    chosen/rejected, distributional GDPO) or "step_preference" (prompt/initial_reason_steps/chosen/rejected,
    step-wise DPO) or "comparisons" (prompt/answer, "Which is larger, a or b?", the verifiable task of the RLVR
    examples). `split`: "train" or "test"; their prompts never overlap.
    """
    from datasets import Dataset

    if name not in _DATASET_NAMES:
        raise ValueError(f"Unknown default dataset {name!r}; valid names: {', '.join(_DATASET_NAMES)}.")
    if split not in _SPLITS:
        raise ValueError(f"Unknown split {split!r} for default dataset {name!r}; valid splits: {', '.join(_SPLITS)}.")
    suffix = "" if split == "train" else "_test"
    return Dataset.from_list(_read_jsonl(f"{name}{suffix}.jsonl"))


# ------------------------------------------------------------------------------------------------------------ model


def _render_chat(messages: list[dict]) -> str:
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


def _tokenizer_corpus() -> list[str]:
    """Every text of the tokenizer's datasets (both splits), in a fixed order, plus the chat framing's role names."""
    texts: list[str] = []
    for name in _TOKENIZER_DATASET_NAMES:
        for split in _SPLITS:
            suffix = "" if split == "train" else "_test"
            for row in _read_jsonl(f"{name}{suffix}.jsonl"):
                for key in sorted(row):
                    value = row[key]
                    if isinstance(value, str):
                        texts.append(value)
                    elif isinstance(value, list):
                        texts.append(_render_chat(value))
    texts.append(_render_chat([{"role": r, "content": ""} for r in ("system", "user", "assistant")]))
    return texts


def _build_tokenizer(vocab_size: int, model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2 style: no prefix space, so "Answer:" + " Sure!" tokenizes as tokens("Answer:") + tokens(" Sure!").
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        add_bos_token=False,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    path,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
    task: str = "causal-lm",
) -> str:
    """Train the tokenizer, build a randomly initialised tiny Llama and `save_pretrained` both to `path`.

    `task`: "causal-lm" (`LlamaForCausalLM`) or "seq-cls" (`LlamaForSequenceClassification`, one label, e.g. a
    reward model). Deterministic: the same arguments give the same token ids and weights. Returns `str(path)`.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    if task not in _TASKS:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {', '.join(_TASKS)}.")
    tokenizer = _build_tokenizer(vocab_size, max_position_embeddings)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"Tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}.")
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if task == "causal-lm":
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=eos_id, eos_token_id=[eos_id, im_end_id], pad_token_id=pad_id
        )
    else:
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    model.config.pad_token_id = pad_id
    model.config.eos_token_id = eos_id
    model.config.bos_token_id = eos_id

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # transformers >= 5 skips config and weights in `save_pretrained` on every rank but 0 of an initialised
    # torch.distributed group; DDP ranks each build the default model into their own folder, so write on every rank.
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def _cache_root() -> Path:
    home = os.environ.get("HF_ALIGN_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "hf_align"


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file() and (
        path / "model.safetensors"
    ).is_file()


def default_model_path(task: str = "causal-lm") -> str:
    """The folder of the embedded tiny chat model, built on first use into `$HF_ALIGN_HOME` (else ~/.cache/hf_align).

    Safe when several processes (e.g. DDP ranks) call it at once: each builds into its own temporary folder next to
    the target and renames it into place atomically; a process that loses the race uses the winner's folder.
    """
    if task not in _TASKS:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {', '.join(_TASKS)}.")
    root = _cache_root()
    target = root / _CACHE_SUBDIRS[task]
    if _is_complete(target):
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-tmp-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable like any other
    try:
        build_tiny_model(tmp, task=task)
        if not _is_complete(tmp):  # never rename an incomplete build into the cache: it would stay broken
            raise RuntimeError(f"Building the tiny model into {tmp} left it incomplete: {sorted(os.listdir(tmp))}.")
        for child in tmp.iterdir():
            os.chmod(child, 0o644)  # some writers make private files; the cache is readable like any other
        try:
            os.rename(tmp, target)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            if not _is_complete(target):  # not a lost race: a broken cache folder
                raise RuntimeError(f"{target} exists but is not a complete tiny model; delete it and retry.")
            # Another process won the race: use its build.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
