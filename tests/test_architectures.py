"""`hf_align.logprobs` gives the log-probs of the model's own logits (`log_softmax(model(...).logits)`, to 1e-4 in
fp32) for every decoder-only architecture transformers maps to a causal LM, whatever its forward does beyond the LM
head: a logit scale (Cohere), a division (Granite), a multiplier on the hidden state (MiniCPM3, Falcon-H1), a head of
several layers (BERT-like models), soft caps (Gemma 2; Gemma 3's multimodal model does not apply the one its text
config names). The probe on a model's first scored forward chooses the chunked LM head where it gives those logits,
the model's own logits elsewhere; the own-logits path, everyone's fallback, is checked on every architecture.

Each architecture is built from its default config rebuilt tiny (`tiny_config`), with its logits spread over several
units and every known logit transform of the config set away from identity, so that a missed transform would move
the log-probs by far more than the tolerance. Those that cannot be built or run so are in `SKIPPED`, with the
reason. Regression tests follow: the known transforms and the warning, gradients and packed rows through the own
logits."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_align import logprobs
from hf_align.logprobs import completion_logprobs
from hf_align.packing import pack_sequences
from hf_align.sequence_logprobs import batch_logprobs

VOCAB_SIZE = 128

# Set wherever the config's class takes the argument (under its own name or through its `attribute_map`).
TINY = {
    "hidden_size": 32, "d_model": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "intermediate_size": 64, "vocab_size": VOCAB_SIZE, "max_position_embeddings": 64, "sliding_window": 4,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "is_decoder": True,  # BERT-like causal LMs attend causally only as decoders
    # Decoders of encoder-decoder families.
    "decoder_layers": 2, "encoder_layers": 2, "decoder_attention_heads": 4, "encoder_attention_heads": 4,
    "decoder_ffn_dim": 64, "encoder_ffn_dim": 64,
    # Mixtures of experts.
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "n_shared_experts": 1, "num_shared_experts": 1,
    "shared_expert_intermediate_size": 16, "n_group": 1, "topk_group": 1,
    # Multi-head latent attention (its rotary part is the config's head_dim).
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "qk_head_dim": 16,
    "v_head_dim": 8, "rotary_dim": 4,
    # State-space and linear-attention layers.
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_ssm": 64, "mamba_d_state": 8, "mamba_chunk_size": 8,
    "mamba_dt_rank": 4, "n_mamba_heads": 4, "state_size": 8, "attention_head_dim": 8,
    "num_heads": 8,  # Mamba 2: num_heads * head_dim = expand * hidden_size
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_head_dim": 8, "linear_num_heads": 4,
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
    # Layouts not given as one entry per layer (GPT-Neo's attention pattern, Gemma 3n's layers sharing a cache).
    "attention_types": [[["global", "local"], 1]], "num_kv_shared_layers": 0,
    # Byte-level BLT's global model and hash embeddings, Gemma 3n / 4's per-layer input embeddings.
    "hidden_size_global": 32, "encoder_hash_byte_group_vocab": 64,
    "vocab_size_per_layer_input": VOCAB_SIZE, "hidden_size_per_layer_input": 8,
    # Adapters of vision and audio towers a causal LM builds with its text model (dots3).
    "adapter_in_dim": 32, "adapter_input_size": 32, "adapter_out_dim": 32,
}
# Every logit transform a config names, away from identity (a model whose default is identity would not show it).
LOGIT_TRANSFORMS = {
    "logit_scale": 0.25, "logits_scaling": 4.0, "lm_head_multiplier": 0.3, "final_logit_softcapping": 10.0,
    "logits_soft_cap": 10.0, "logits_mup_width_multiplier": 2.5,
}
# Never above the config's default: a router may take one expert only (ZAYA).
AT_MOST_DEFAULT = ("num_experts_per_tok",)
# By config class, what a family needs beyond `TINY`.
FAMILY_ARGUMENTS = {
    # What transformers' default config lacks for its model to build at all.
    "Lfm2MoeConfig": {"layer_types": ["conv", "full_attention"]},
    "CohereCompassTextConfig": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "DbrxAttentionConfig": {"rope_theta": 1e4, "clip_qkv": 8.0},
    "Qwen4ExpTextConfig": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                           "indexer_compress_ratio": 2},
    # Layer ids derived again from the kept layers; its K/V rounding needs head_dim a multiple of 16.
    "Kolibri1_1Config": {"head_dim": 16, "index_num_heads": 1, "index_layers": None, "kv_source_layers": None,
                         "mlp_only_layers": None},
    # Axial positions and attention chunks for short rows; LSH attention hashed the same way in every forward.
    "ReformerConfig": {"axial_pos_embds_dim": [16, 16], "axial_pos_shape": [8, 8], "lsh_attn_chunk_length": 4,
                       "local_attn_chunk_length": 4, "hash_seed": 0},
}
# Per-layer kinds: the tiny model keeps the first two layers of each kind.
LAYER_KIND_LISTS = ("layer_types", "layers_block_type", "block_types")

SKIPPED = {
    "gemma3n": "its causal LM (Gemma3nForConditionalGeneration) builds its vision tower through timm, which is not "
               "installed; gemma3n_text, the text model, is tested",
    "gemma4_assistant": "a speculative-decoding drafter: its forward needs the target model's inputs_embeds and "
                        "shared_kv_states (and transformers' default config fails its own validation)",
    "gemma4_unified_assistant": "a speculative-decoding drafter: its forward needs the target model's inputs_embeds "
                                "and shared_kv_states",
    "musicgen": "MusicgenForCausalLM is the audio decoder of an encoder-decoder model: it takes num_codebooks "
                "interleaved token streams ([B * codebooks, T]) with one head per codebook, and does not build from "
                "the composite default config",
    "musicgen_melody": "as musicgen: an audio decoder of num_codebooks interleaved streams, one head per codebook, "
                       "that does not build from the composite default config",
    "xmod": "X-MOD routes each row through a per-language adapter: its forward needs lang_ids (or a default language "
            "set on the model), an input no causal-LM trainer passes",
}


def _layers_kept(kinds: list | None) -> list[int]:
    """Indices of the layers a tiny model keeps: the first two of each kind in `kinds` (a layer may share weights or
    a cache with another of its kind), or the first two layers."""
    if not kinds:
        return [0, 1]
    firsts = {}
    for index, kind in enumerate(kinds):
        firsts.setdefault(kind, []).append(index)
    return sorted(index for indices in firsts.values() for index in indices[:2])


def tiny_config(config):
    """`config` rebuilt tiny from its class's own arguments (`TINY`, `LOGIT_TRANSFORMS`, the layers `_layers_kept`,
    `FAMILY_ARGUMENTS`), so that what the config derives from them (head sizes, layer ids...) is derived again; its
    sub-configs likewise. Names go through the class's `attribute_map` (GPT-2's `n_embd` is `hidden_size`)."""
    arguments = inspect.signature(type(config).__init__).parameters
    values = vars(config)  # as stored: a config of layers of several kinds refuses to read some of them globally

    def argument(name: str) -> str | None:
        return next((n for n in (name, config.attribute_map.get(name)) if n in arguments), None)

    kwargs = {argument(name): value for name, value in {**TINY, **LOGIT_TRANSFORMS}.items() if argument(name)}
    for name in AT_MOST_DEFAULT:
        if argument(name) and isinstance(values.get(argument(name)), int):
            kwargs[argument(name)] = min(kwargs[argument(name)], values[argument(name)])
    if argument("kv_lora_rank") and argument("num_key_value_heads"):  # latent attention: keys and values per head
        kwargs[argument("num_key_value_heads")] = kwargs[argument("num_attention_heads")]
    for name in arguments:
        if isinstance(values.get(name), PreTrainedConfig):
            kwargs[name] = tiny_config(values[name])
    layers = argument("num_hidden_layers")
    if layers and isinstance(values.get(layers), int):
        kinds = next((values[name] for name in LAYER_KIND_LISTS if isinstance(values.get(name), list)), None)
        keep = _layers_kept(kinds)
        for name in arguments:
            if isinstance(values.get(name), list) and len(values[name]) == values[layers]:
                kwargs[name] = [values[name][i] for i in keep]
        kwargs[layers] = len(keep)
    return type(config)(**{**kwargs, **FAMILY_ARGUMENTS.get(type(config).__name__, {})})


def tiny_model(model_type: str) -> torch.nn.Module:
    """The architecture's causal LM from its tiny default config (`tiny_config`), fp32, seeded, with its logits
    spread over several units (`_spread_logits`)."""
    config = tiny_config(AutoConfig.for_model(model_type))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _spread_logits(model, _batch())
    return model


def _spread_logits(model, batch, target_std: float = 3.0) -> None:
    """Scales the LM head until the model's own logits on `batch` have a standard deviation near `target_std`
    (the transforms after the head, soft caps included, make it a few rounds). The head gets its own copy of its
    weight first: scaling tied input embeddings would change the hidden states instead."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with torch.no_grad():
        for _ in range(4):
            std = _own(model, batch)["logits"].float().std()
            if abs(std / target_std - 1) < 0.1:
                break
            head.weight.mul_(target_std / std)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three right-padded rows of prompt + completion tokens (lengths 7, 10, 9; prompts 4, 3, 1): the first row, the
    one the head is probed on, ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths, prompts = torch.tensor([7, 10, 9]), torch.tensor([4, 3, 1])
    positions = torch.arange(int(lengths.max()))
    attention_mask = (positions < lengths[:, None]).long()
    input_ids = torch.randint(3, VOCAB_SIZE, attention_mask.shape, generator=generator) * attention_mask
    completion_mask = attention_mask * (positions >= prompts[:, None])
    completion_mask[1, 6] = 0  # a masked token inside a completion
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _own(model, batch, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The model's own logits `[B, T, V]`, and the log-probs and entropies `[B, T]` from them (at `temperature`),
    aligned like `CompletionLogProbs` (position 0 and unscored positions 0)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    log_probs = torch.log_softmax(logits.float()[:, :-1] / temperature, -1)
    mask = batch["completion_mask"][:, 1:].float()
    logps = log_probs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
    pad = lambda values: torch.nn.functional.pad(values, (1, 0))  # noqa: E731
    return {"logits": logits, "token_logps": pad(logps), "entropy": pad(entropy)}


@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_logprobs_are_those_of_the_models_own_logits(model_type):
    if model_type in SKIPPED:
        pytest.skip(SKIPPED[model_type])
    model = tiny_model(model_type)
    batch = _batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        own = _own(model, batch)
        assert own["logits"].float().std() > 1.0  # a missed transform would move the log-probs far
        # The first call probes the head and scores through the path it chose.
        ours = completion_logprobs(model, *args, with_stats=True)
        torch.testing.assert_close(ours.token_logps, own["token_logps"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.entropy, own["entropy"], rtol=1e-4, atol=1e-4)
        # The own-logits path is every architecture's fallback: it holds wherever the fast path was chosen too.
        if logprobs._FAST_PATHS[model] is not None:
            logprobs._FAST_PATHS[model] = None
            fallback = completion_logprobs(model, *args)
            torch.testing.assert_close(fallback.token_logps, own["token_logps"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("model_type", "transform", "fast_path"), [
    ("granite", {"logits_scaling": 4.0}, None),  # logits / 4 after the head
    ("cohere", {"logit_scale": 0.25}, None),  # logits * 0.25 after the head
    ("gemma2", {"final_logit_softcapping": 10.0}, logprobs._FastPath(softcap=10.0)),  # the cap the fast path applies
])
def test_known_logit_transforms(model_type, transform, fast_path, caplog):
    """Granite's division, Cohere's scale and Gemma 2's soft cap give the model's own log-probs, at any temperature:
    the first two through its own logits, with one warning for the model however often it is scored; the soft cap
    on the fast path."""
    model = tiny_model(model_type)
    assert {name: getattr(model.config, name) for name in transform} == transform
    batch = _batch(seed=1)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hf_align.logprobs"):
        for chunk_size, temperature in ((1024, 1.0), (4, 0.7)):  # one chunk, and several
            own = _own(model, batch, temperature)
            ours = completion_logprobs(model, *args, chunk_size=chunk_size, temperature=temperature, with_stats=True)
            torch.testing.assert_close(ours.token_logps, own["token_logps"], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.entropy, own["entropy"], rtol=1e-4, atol=1e-4)
    assert logprobs._FAST_PATHS[model] == fast_path
    warnings = [record for record in caplog.records if record.name == "hf_align.logprobs"]
    assert len(warnings) == (0 if fast_path else 1)
    if warnings:
        assert type(model).__name__ in warnings[0].getMessage()


def test_llama_keeps_the_chunked_head(caplog):
    model = tiny_model("llama")
    batch = _batch(seed=1)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hf_align.logprobs"):
        ours = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        torch.testing.assert_close(ours.token_logps, _own(model, batch)["token_logps"], rtol=1e-4, atol=1e-4)
    assert logprobs._FAST_PATHS[model] == logprobs._FastPath(softcap=None)
    assert not [record for record in caplog.records if record.name == "hf_align.logprobs"]


@pytest.mark.parametrize("chunk_size", [1024, 4], ids=["one-chunk", "recomputed-chunks"])
def test_gradients_through_the_own_logits_path(chunk_size):
    """d/dθ Σ logp through the model's own logits (Granite) equals that of its own `log_softmax`, with the chunks
    recomputed in the backward pass or not."""
    batch = _batch(seed=2)
    grads = []
    for use_own in (False, True):
        model = tiny_model("granite").train()
        if use_own:
            logps = _own(model, batch)["token_logps"]
        else:
            logps = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                        chunk_size=chunk_size).token_logps
            assert logprobs._FAST_PATHS[model] is None
        logps.sum().backward()
        grads.append({name: param.grad for name, param in model.named_parameters() if param.grad is not None})
    ours, own = grads
    assert set(ours) == set(own) and own["lm_head.weight"].abs().sum() > 0
    for name in own:
        torch.testing.assert_close(ours[name], own[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", ["granite", "cohere"])
def test_packed_rows_through_the_own_logits_path(model_type):
    """Completions packed with their shared prompt, and sequences packed into one row, get through the model's own
    logits the log-probs of their own `prompt + completion` rows."""
    model = tiny_model(model_type)
    generator = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist()

    prompts, completions = [ids(3), ids(1), ids(5)], [[ids(4), ids(2)], [ids(6), ids(3)], [ids(1), ids(5)]]
    rows = [(p, c) for k in range(2) for p, cs in zip(prompts, completions) for c in cs[k : k + 1]]
    sequences = [(p, cs, [i, i + len(prompts)]) for i, (p, cs) in enumerate(zip(prompts, completions))]
    packed = pack_sequences(sequences, pad_token_id=0, padding_free=True)
    with torch.no_grad():
        got = batch_logprobs(model, packed, chunk_size=4)
        for row, (prompt, completion) in enumerate(rows):
            alone = {"input_ids": torch.tensor([prompt + completion]),
                     "attention_mask": torch.ones(1, len(prompt + completion), dtype=torch.long),
                     "completion_mask": torch.tensor([[0] * len(prompt) + [1] * len(completion)])}
            own = _own(model, alone)["token_logps"][0, len(prompt) :]
            torch.testing.assert_close(got.token_logps[row, : len(completion)], own, rtol=1e-4, atol=1e-4)
            assert got.mask[row].sum() == len(completion)
    assert logprobs._FAST_PATHS[model] is None
