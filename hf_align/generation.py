"""Sampling completions from the policy being trained, for the trainers that generate their own data (SPIN, the
online trainers).

`generate_completions` renders the prompts as TRL does (a string goes through the tokenizer; a message list through
the chat template with the generation prompt), left-pads them into batches, and samples them on the model inside any
DDP / compile wrapper (a peft model generates with its adapter active): through a decode loop that draws the tokens
`generate` draws (the same logits processors and random stream) but runs each distinct prompt of a batch through the
model once for all its copies (a group's G samples share its KV cache) and drops finished rows from the batch, or,
where that loop does not apply (`_decode_loop_config` says when), through Hugging Face `generate`; or through
transformers' continuous batching (`generate_batch`, a paged KV cache filled with every prompt at once) with
`continuous_batching=True`. The model is in eval mode while it generates and back in its previous mode afterwards.
Each completion is cut after its first stop token (the tokenizer's eos and every `eos_token_id` of the model's
generation config, e.g. `<|im_end|>`).
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

from . import data, models


@dataclass
class SamplingConfig:
    """How completions are sampled. `temperature=0` decodes greedily (top_p / top_k / min_p are then unused); `top_k=0`,
    `top_p=1`, `min_p=None` and `repetition_penalty=1` switch those filters off. Settings not named here are neutral,
    whatever the model's own generation config says, except `cache_implementation` (None: the model's choice).
    `generation_kwargs` go to `transformers.GenerationConfig` last, overriding the settings above (TRL's
    `generation_kwargs`). `batch_size` counts sequences (prompts × `num_generations`) per `generate` call;
    `pad_to_multiple_of` left-pads each call's prompts to a multiple of that many tokens (fewer distinct shapes for a
    compiled model). With `seed`, sampling is reproducible and leaves the global random state as it was.
    `chat_template_kwargs` go to the chat template that renders message-list prompts (e.g. `enable_thinking`).

    `continuous_batching` samples through transformers' continuous batching (`generate_batch`) in one call for all
    rows instead of `generate` in batches: `continuous_batching_config` holds `ContinuousBatchingConfig` arguments
    (`max_memory_percent` 0.5 unless given, leaving memory for training, as TRL does; on a CPU, where the cache is
    otherwise sized from the machine's RAM, give `num_blocks` and `max_batch_tokens`). It feeds a logits processor
    only the newest token, so of the sampling settings it honours those that read the scores alone (temperature,
    top_p, top_k, min_p and the `generation_kwargs` in `CONTINUOUS_BATCHING_KWARGS`); any other setting raises. It
    never pads prompts (`pad_to_multiple_of` does not apply) and ignores `batch_size`."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    cache_implementation: str | None = None
    generation_kwargs: dict | None = None
    pad_to_multiple_of: int | None = None
    num_generations: int = 1
    batch_size: int = 32
    seed: int | None = None
    progress: bool = False  # a progress bar over the `generate` calls (long generations, e.g. SPIN's rounds)
    chat_template_kwargs: dict | None = None
    continuous_batching: bool = False
    continuous_batching_config: dict | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 decodes greedily), got {self.temperature}.")
        if self.max_new_tokens < 1 or self.num_generations < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens, num_generations and batch_size must each be at least 1.")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be between 0 and 1 (a fraction of the top token's probability), got "
                             f"{self.min_p}.")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: no penalty), got {self.repetition_penalty}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be at least 1 (or None), got {self.pad_to_multiple_of}.")
        if self.generation_kwargs is not None and not isinstance(self.generation_kwargs, dict):
            raise ValueError(f"generation_kwargs must be a dict of GenerationConfig arguments, got "
                             f"{type(self.generation_kwargs).__name__}.")
        extra = self.generation_kwargs or {}
        if extra.get("num_return_sequences", 1) != 1 or extra.get("return_dict_in_generate"):
            raise ValueError("generation_kwargs cannot set num_return_sequences or return_dict_in_generate: each row "
                             "gets one completion (num_generations sets how many per prompt).")
        check_cache_implementation(extra.get("cache_implementation", self.cache_implementation))
        if self.continuous_batching:
            self._check_continuous_batching()
        elif self.continuous_batching_config is not None:
            raise ValueError("continuous_batching_config configures continuous batching: it needs "
                             "continuous_batching=True (use_transformers_continuous_batching in a Config).")

    def _check_continuous_batching(self) -> None:
        try:
            from transformers.generation import ContinuousBatchingConfig
        except ImportError:
            raise ValueError("Continuous batching (use_transformers_continuous_batching) needs transformers>=5.8, "
                             "which has `generate_batch`.") from None
        unhonoured = sorted(set(self.generation_kwargs or {}) - set(CONTINUOUS_BATCHING_KWARGS))
        if self.repetition_penalty != 1:
            unhonoured.insert(0, "repetition_penalty")
        if self.cache_implementation not in (None, "paged"):
            unhonoured.insert(0, "cache_implementation")
        if unhonoured:
            raise ValueError(
                f"Continuous batching (use_transformers_continuous_batching) cannot honour {unhonoured}: it gives a "
                "logits processor only the newest token, not the completion so far, and keeps its own paged KV "
                f"cache. It honours temperature, top_p, top_k, min_p and the generation_kwargs "
                f"{list(CONTINUOUS_BATCHING_KWARGS)}. Leave these unset or sample with `generate`.")
        try:
            ContinuousBatchingConfig(**(self.continuous_batching_config or {}))
        except TypeError as error:
            raise ValueError(f"transformers_continuous_batching_config is not a set of ContinuousBatchingConfig "
                             f"arguments: {error}") from None


# The `GenerationConfig` arguments continuous batching honours: stopping, and logits processors that read the scores
# alone (it gives a processor the newest token only, so one that reads the completion so far would act wrongly).
CONTINUOUS_BATCHING_KWARGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p",
                              "epsilon_cutoff", "eta_cutoff", "suppress_tokens", "eos_token_id", "pad_token_id",
                              "use_cache")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def check_cache_implementation(name: str | None) -> None:
    """Raises a `ValueError` for a KV-cache implementation `generate` does not know, or one that cannot run here:
    the offloaded caches move layers between a CUDA device and the CPU, the quantized one needs optimum-quanto or
    HQQ."""
    if name is None:
        return
    known = ALL_CACHE_IMPLEMENTATIONS + ("paged",)
    if name not in known:
        raise ValueError(f"Unknown cache_implementation {name!r}; expected one of {known}.")
    if name.startswith("offloaded") and not torch.cuda.is_available():
        raise ValueError(f"cache_implementation={name!r} offloads the cache from a CUDA device to the CPU; there is "
                         "no CUDA device here. Use 'dynamic' (or None) or 'static'.")
    if name == "quantized" and not any(_installed(module) for module in ("optimum.quanto", "hqq")):
        raise ValueError("cache_implementation='quantized' needs optimum-quanto (`pip install optimum-quanto`) or "
                         "HQQ (`pip install hqq`), and neither is installed.")


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


def encode_prompts(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each prompt as the model sees it before its completion: strings through the tokenizer, message
    lists through the chat template with the generation prompt and `chat_template_kwargs` (TRL's rendering)."""
    prompts = list(prompts)
    if data.is_conversational_row({"prompt": prompts[0]}, ["prompt"]):
        rendered = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 **(chat_template_kwargs or {}))
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
                "repetition_penalty": sampling.repetition_penalty, "use_cache": True,
                "cache_implementation": sampling.cache_implementation}
    if sampling.temperature == 0:
        settings["do_sample"] = False
    else:
        # min_p 0 filters nothing; None would let the model's generation config choose.
        settings.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                        min_p=sampling.min_p or 0.0)
    return GenerationConfig(**{**settings, **(sampling.generation_kwargs or {})})


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _left_pad(rows: list[list[int]], pad_token_id: int, device,
              pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_after_stop(generated, stop_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each row of `generated` (`[B, L]`, or 1-D rows of any lengths) up to and including its first stop token (the
    whole row if it has none)."""
    cut = []
    for row in generated:
        stops = torch.isin(row, stop_ids).nonzero()
        cut.append(row[: int(stops[0]) + 1] if len(stops) else row)
    return cut


def _generate_in_batches(generator, rows: list[list[int]], config: GenerationConfig, sampling: SamplingConfig,
                         pad_token_id: int, device) -> list[torch.Tensor]:
    """`sampling.batch_size` left-padded rows at a time through `_decode_sharing_prompts` where it applies, else
    `generate`; the generated tokens of each row."""
    decode_config = _decode_loop_config(generator, config, device)
    generated = []
    starts = range(0, len(rows), sampling.batch_size)
    for start in tqdm(starts, desc="Generating", disable=not sampling.progress or len(starts) < 2):
        input_ids, attention_mask = _left_pad(rows[start : start + sampling.batch_size], pad_token_id, device,
                                              sampling.pad_to_multiple_of)
        if decode_config is None:
            output = generator.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            generated.extend(output[:, input_ids.size(1) :].cpu())
        else:
            generated.extend(_decode_sharing_prompts(models.unwrap_causal_lm(generator), input_ids, attention_mask,
                                                     decode_config))
    return generated


# Logits processors that read only their own row (its scores and tokens so far) and keep no state between steps:
# with these, dropping finished rows from the batch changes no other row's scores.
ROW_WISE_PROCESSORS = (
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper", "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor",
    "NoBadWordsLogitsProcessor", "SequenceBiasLogitsProcessor", "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor", "SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor",
    "ExponentialDecayLengthPenalty", "InfNanRemoveLogitsProcessor",
    "LogitNormalization",
)


def _decode_loop_config(generator, config: GenerationConfig, device) -> GenerationConfig | None:
    """`config` as `generate` completes it (the model's generation defaults, the special-token tensors) when
    `_decode_sharing_prompts` samples exactly what `generate` would, else None (then `generate` samples).

    It does for a decoder-only model under no prompt-learning peft adapter (whose virtual tokens only the peft
    wrapper adds), sampling or greedy decoding, a plain `DynamicCache` (sliding-window, linear-attention, static,
    quantized and offloaded caches keep other state than per-row keys and values, so rows cannot be copied or
    dropped by indexing them), no chunked prefill, stop strings or time limit, and `ROW_WISE_PROCESSORS` only."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.generation.configuration_utils import GenerationMode

    lm = models.unwrap_causal_lm(generator)
    prompt_learning = getattr(getattr(generator, "active_peft_config", None), "is_prompt_learning", False)
    if lm.config.is_encoder_decoder or prompt_learning:
        return None
    config, _ = lm._prepare_generation_config(config)
    if (config.get_generation_mode() not in (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH)
            or config.cache_implementation not in (None, "dynamic") or config.max_new_tokens is None
            or any(getattr(config, name) is not None for name in ("prefill_chunk_size", "stop_strings", "max_time"))):
        return None
    cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    if config.min_p == 0:  # filters nothing; its warper would still cost a softmax and a top-k per step
        config.min_p = None
    lm._prepare_special_tokens(config, True, device=device)
    if config._eos_token_tensor is None:  # no stop token for the loop to test (`generate` runs every row out)
        return None
    processors = lm._get_logits_processor(generation_config=config, input_ids_seq_length=1, device=device,
                                          encoder_input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    if any(type(processor).__name__ not in ROW_WISE_PROCESSORS for processor in processors):
        return None
    return config


@contextmanager
def _head_as_vocab_major_product(lm):
    """Within the block, the LM head of `lm` computes its logits as `(W @ hᵀ)ᵀ` where it is a plain fp32
    `nn.Linear` on a CPU running `nn.Linear`'s own forward: no bias, no hooks, no forward of its own (such as
    `cast_lm_head_to_fp32`'s or an accelerate hook's); so not a peft, bitsandbytes, accelerate-offloaded or
    ZeRO-3 / FSDP2 module. The same products as `F.linear`'s `h @ Wᵀ`, in another memory order: with a few decode
    rows against a vocabulary-sized `W`, MKL computes this one faster (the figures are in docs/benchmarks.md). The
    logits come back as a transposed view."""
    head = lm.get_output_embeddings()
    plain = (type(head) is torch.nn.Linear and head.bias is None and head.weight.device.type == "cpu"
             and head.weight.dtype == torch.float32 and not head._forward_hooks and not head._forward_pre_hooks
             and "forward" not in vars(head))
    if not plain:
        yield
        return
    # read at each call: a weight that is replaced (gathered, reloaded) while sampling is used as it is then
    head.forward = lambda hidden: torch.mm(head.weight, hidden.reshape(-1, hidden.size(-1)).T).T.reshape(
        *hidden.shape[:-1], -1)
    try:
        yield
    finally:
        del head.forward


def _decode_sharing_prompts(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            config: GenerationConfig) -> list[torch.Tensor]:
    """The generated tokens of each left-padded row, sampled from the distributions `generate` samples from (the
    same logits processors; the draw itself by `inverse_cdf_sample`), with less model work: identical prompts in
    the batch (a group's G copies) run through the model once and their KV cache is copied to each copy, and a row
    leaves the decode batch once it emitted a stop token. Finished rows are padded as `generate` pads them."""
    from transformers import DynamicCache

    with _head_as_vocab_major_product(lm):
        batch_size, width = input_ids.shape
        prompts, row_prompt = torch.unique(torch.cat([input_ids, attention_mask], 1), dim=0, return_inverse=True)
        prompt_mask = prompts[:, width:]
        positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)
        # `generate` drops an all-ones mask (no padding) before the model sees it
        mask = None if bool(attention_mask.all()) else attention_mask
        cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
        output = lm(input_ids=prompts[:, :width], attention_mask=None if mask is None else prompt_mask,
                    position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        logits = output.logits[:, -1].float()[row_prompt]
        cache.batch_select_indices(row_prompt)
        next_positions = positions[row_prompt, -1] + 1
        processors = lm._get_logits_processor(generation_config=config, input_ids_seq_length=width,
                                              encoder_input_ids=input_ids, device=input_ids.device)
        sequences, running = input_ids, torch.arange(batch_size, device=input_ids.device)
        for step in range(config.max_new_tokens):
            tokens = _next_tokens(processors(sequences[running], logits), running, batch_size, config.do_sample)
            column = config._pad_token_tensor.expand(batch_size).clone()
            column[running] = tokens
            sequences = torch.cat([sequences, column[:, None]], 1)
            unfinished = ~torch.isin(tokens, config._eos_token_tensor)
            if step + 1 == config.max_new_tokens or not unfinished.any():
                break
            if not unfinished.all():
                running, tokens, next_positions = running[unfinished], tokens[unfinished], next_positions[unfinished]
                cache.batch_select_indices(unfinished.nonzero().squeeze(1))
                mask = None if mask is None else mask[unfinished]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], 1)
            output = lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_positions[:, None],
                        cache=cache, use_cache=True, logits_to_keep=1)
            logits = output.logits[:, -1].float()
            next_positions = next_positions + 1
        return list(sequences[:, width:].cpu())


def _next_tokens(scores: torch.Tensor, running: torch.Tensor, batch_size: int, do_sample: bool) -> torch.Tensor:
    """The next token of each running row from its processed `scores` (overwritten): the argmax, or a sample from
    softmax(scores) by `inverse_cdf_sample` with one uniform per row of the whole batch of `batch_size` rows
    (finished ones included), so that a row's draws do not depend on when the other rows finished."""
    if not do_sample:
        return scores.argmax(-1)
    uniforms = torch.rand(batch_size, dtype=torch.float64, device=scores.device)[running]
    # softmax's numerator, written over the scores (the search normalises): no new [B, V] tensor to page in
    return inverse_cdf_sample(scores.sub_(scores.amax(-1, keepdim=True)).exp_(), uniforms)


INVERSE_CDF_BLOCK = 256


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (`[B, V]`, non-negative, each row's draw in proportion to them: probabilities or
    their unnormalised weights) for `uniforms` (`[B]`, in [0, 1)): the token i with cdf[i-1] <= u * cdf[-1] <
    cdf[i], a draw from the row's distribution. A zero-probability token is never drawn. `torch.multinomial`
    draws the same distribution on CPU by exponential noise over every entry, about 25x the time of this search.

    The search runs in two levels, so no `[B, V]` tensor is written (on a CPU each is page-faulted in afresh): over
    the cumulative sum of the rows' blocks of `INVERSE_CDF_BLOCK` tokens, then inside the block the uniform falls
    in, where it is placed by its fraction of the block's mass. Each block's sum is float32 (a vectorised sum of 256
    probabilities, exact to float32's rounding of the probabilities themselves) and both cumulative sums are float64,
    so rounding accumulates no bias along a 150k vocabulary."""
    rows, vocab = probs.shape
    whole_blocks = vocab // INVERSE_CDF_BLOCK
    whole = whole_blocks * INVERSE_CDF_BLOCK
    block_sums = probs[:, :whole].reshape(rows, whole_blocks, INVERSE_CDF_BLOCK).sum(-1)
    if whole < vocab:  # the last, shorter block
        block_sums = torch.cat([block_sums, probs[:, whole:].sum(-1, keepdim=True)], dim=1)
    block_sums = block_sums.double()
    block_cdf = block_sums.cumsum(-1)
    total = block_cdf[:, -1:]
    if not (torch.isfinite(total) & (total > 0)).all():  # `torch.multinomial` raises too; a search would return a token
        raise RuntimeError("Sampling: the next-token probabilities contain inf or nan, or sum to zero (the model's "
                           "logits overflowed, or every token was filtered out); no token can be drawn.")
    target = uniforms[:, None] * total
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.size(1) - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # the cdf before the block
    ids = block * INVERSE_CDF_BLOCK + torch.arange(INVERSE_CDF_BLOCK, device=probs.device)
    inner_cdf = probs.gather(1, ids.clamp(max=vocab - 1)).double().masked_fill_(ids >= vocab, 0).cumsum(-1)
    inner_target = (target - before) / block_sums.gather(1, block) * inner_cdf[:, -1:]
    position = torch.searchsorted(inner_cdf, inner_target, right=True).clamp_(max=INVERSE_CDF_BLOCK - 1)
    # Rounding can put the target at or past the block's last value: step back from a zero-probability position to
    # the last token with mass before it.
    position = torch.searchsorted(inner_cdf, inner_cdf.gather(1, position))
    return ids.gather(1, position).squeeze(1)


def _generate_continuously(generator, rows: list[list[int]], config: GenerationConfig,
                           sampling: SamplingConfig) -> list[torch.Tensor]:
    """transformers' continuous batching on every row at once; the generated tokens of each row. `generate_batch`
    logs a failed or lost request and carries on: that is an error here (a row with no completion)."""
    from transformers.generation import ContinuousBatchingConfig

    options = {"max_memory_percent": 0.5, **(sampling.continuous_batching_config or {})}
    outputs = list(generator.generate_batch(
        inputs=rows, generation_config=config, continuous_batching_config=ContinuousBatchingConfig(**options),
        progress_bar=sampling.progress,
    ).values())
    failed = [output.error for output in outputs if output.error is not None]
    if len(outputs) != len(rows) or failed:
        raise RuntimeError(f"Continuous batching returned {len(outputs) - len(failed)} completions for {len(rows)} "
                           f"prompts{f' (errors: {failed[:3]})' if failed else ''}; transformers logged the cause.")
    return [torch.tensor(output.generated_tokens, dtype=torch.long) for output in outputs]


def generate_completions(model, tokenizer, prompts: list, sampling: SamplingConfig | None = None) -> Completions:
    """Samples `sampling.num_generations` completions for each prompt (strings or message lists) from `model`
    (a `PreTrainedModel`, possibly inside a peft / DDP / compile wrapper), without gradients."""
    sampling = sampling or SamplingConfig()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty: nothing to generate.")
    prompt_ids = encode_prompts(tokenizer, prompts, sampling.chat_template_kwargs)
    rows = [ids for ids in prompt_ids for _ in range(sampling.num_generations)]
    completions = _sample_rows(model, tokenizer, rows, sampling)
    return Completions(
        prompt_ids=prompt_ids,
        completion_ids=data.pad(completions, tokenizer.pad_token_id),
        completion_mask=data.pad([torch.ones_like(ids) for ids in completions], 0),
        texts=tokenizer.batch_decode(completions, skip_special_tokens=True),
    )


def generate_continuations(model, tokenizer, prefixes: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
    """One sampled continuation of each token-id prefix (e.g. a conversation so far, ending in the assistant's turn
    header), cut after its first stop token, without gradients: the next turn of multi-turn rollouts. Prefixes are
    used as given (no chat template, no repetition: `sampling.num_generations` must be 1)."""
    if sampling.num_generations != 1:
        raise ValueError(f"generate_continuations samples one continuation per prefix; repeat the prefixes instead of "
                         f"num_generations={sampling.num_generations}.")
    if not prefixes:
        raise ValueError("`prefixes` is empty: nothing to generate.")
    return [ids.tolist() for ids in _sample_rows(model, tokenizer, [list(ids) for ids in prefixes], sampling)]


def _sample_rows(model, tokenizer, rows: list[list[int]], sampling: SamplingConfig) -> list[torch.Tensor]:
    """One sampled completion of each row of token ids, cut after its first stop token."""
    generator = models.unwrap_wrappers(model)
    device = next(generator.parameters()).device
    stop_ids = stop_token_ids(generator, tokenizer)
    config = _generation_config(sampling, stop_ids, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _seeded(sampling.seed, device):
            if sampling.continuous_batching:
                generated = _generate_continuously(generator, rows, config, sampling)
            else:
                generated = _generate_in_batches(generator, rows, config, sampling, tokenizer.pad_token_id, device)
    finally:
        model.train(was_training)
    return _cut_after_stop(generated, torch.tensor(stop_ids))
