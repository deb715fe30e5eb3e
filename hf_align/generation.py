"""Sampling completions from the policy being trained, for the trainers that generate their own data (SPIN, the
online trainers).

`generate_completions` renders the prompts as TRL does (a string goes through the tokenizer; a message list through
the chat template with the generation prompt), left-pads them into batches, and runs Hugging Face `generate` with
the KV cache on the model inside any DDP / compile wrapper (a peft model generates with its adapter active). The
model is in eval mode while it generates and back in its previous mode afterwards. Each completion is cut after its
first stop token (the tokenizer's eos and every `eos_token_id` of the model's generation config, e.g. `<|im_end|>`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from . import data, models


@dataclass
class SamplingConfig:
    """How completions are sampled. `temperature=0` decodes greedily (top_p / top_k are then unused); `top_k=0` and
    `top_p=1` switch those filters off. Settings not named here (e.g. `repetition_penalty`) are neutral, whatever the
    model's own generation config says. `batch_size` counts sequences (prompts × `num_generations`) per `generate`
    call. With `seed`, sampling is reproducible and leaves the global random state as it was."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_generations: int = 1
    batch_size: int = 32
    seed: int | None = None
    progress: bool = False  # a progress bar over the `generate` calls (long generations, e.g. SPIN's rounds)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 decodes greedily), got {self.temperature}.")
        if self.max_new_tokens < 1 or self.num_generations < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens, num_generations and batch_size must each be at least 1.")


@dataclass
class Completions:
    """`num_generations` completions per prompt, prompt-major: row `i * num_generations + g` is the `g`-th completion
    of prompt `i`. Ids are right-padded with the pad token; `completion_mask` is 1 on each completion's tokens, up to
    and including its first stop token (a completion that hit `max_new_tokens` has none)."""

    prompt_ids: list[list[int]]  # per prompt, as rendered for the model
    completion_ids: torch.Tensor  # [N * G, T] long
    completion_mask: torch.Tensor  # [N * G, T] long
    texts: list[str]  # decoded without special tokens

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt as the model sees it before its completion: strings through the tokenizer, message
    lists through the chat template with the generation prompt (TRL's rendering)."""
    prompts = list(prompts)
    if data.is_conversational_row({"prompt": prompts[0]}, ["prompt"]):
        rendered = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True)
        return [list(ids) for ids in rendered["input_ids"]]
    return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos id followed by every other `eos_token_id` of the model's generation config."""
    configured = getattr(models.unwrap_causal_lm(model).generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(dict.fromkeys(ids + configured))


def _generation_config(sampling: SamplingConfig, stop_ids: list[int], pad_token_id: int) -> GenerationConfig:
    settings = {"max_new_tokens": sampling.max_new_tokens, "eos_token_id": stop_ids, "pad_token_id": pad_token_id,
                "repetition_penalty": 1.0, "use_cache": True}
    if sampling.temperature == 0:
        return GenerationConfig(do_sample=False, **settings)
    return GenerationConfig(
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, **settings
    )


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _left_pad(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_after_stop(generated: torch.Tensor, stop_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each row of `generated` `[B, L]` up to and including its first stop token (the whole row if it has none)."""
    is_stop = torch.isin(generated, stop_ids)
    lengths = torch.where(is_stop.any(-1), is_stop.int().argmax(-1) + 1, generated.size(1))
    return [row[:length] for row, length in zip(generated, lengths.tolist())]


def generate_completions(model, tokenizer, prompts: list, sampling: SamplingConfig | None = None) -> Completions:
    """Samples `sampling.num_generations` completions for each prompt (strings or message lists) from `model`
    (a `PreTrainedModel`, possibly inside a peft / DDP / compile wrapper), without gradients."""
    sampling = sampling or SamplingConfig()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty: nothing to generate.")
    generator = models.unwrap_wrappers(model)
    device = next(generator.parameters()).device
    prompt_ids = encode_prompts(tokenizer, prompts)
    stop_ids = stop_token_ids(generator, tokenizer)
    config = _generation_config(sampling, stop_ids, tokenizer.pad_token_id)
    rows = [ids for ids in prompt_ids for _ in range(sampling.num_generations)]
    completions: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _seeded(sampling.seed, device):
            starts = range(0, len(rows), sampling.batch_size)
            for start in tqdm(starts, desc="Generating", disable=not sampling.progress or len(starts) < 2):
                batch = rows[start : start + sampling.batch_size]
                input_ids, attention_mask = _left_pad(batch, tokenizer.pad_token_id, device)
                output = generator.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            generation_config=config)
                generated = output[:, input_ids.size(1) :].cpu()
                completions.extend(_cut_after_stop(generated, torch.tensor(stop_ids)))
    finally:
        model.train(was_training)
    return Completions(
        prompt_ids=prompt_ids,
        completion_ids=data.pad(completions, tokenizer.pad_token_id),
        completion_mask=data.pad([torch.ones_like(ids) for ids in completions], 0),
        texts=tokenizer.batch_decode(completions, skip_special_tokens=True),
    )
