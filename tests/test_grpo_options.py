"""TRL 1.16's GRPO / RLOO options beyond the basic ones: the policy-loss options (`delta`, `top_entropy_quantile`,
`off_policy_mask_threshold`, the CISPO / SAPO / LUSPO / VESPO loss types, the entropy bonus, fixed and adaptive,
`multi_objective_aggregation`, `cast_lm_head_to_fp32`) and the sampling ones (`generation_kwargs`, `min_p`,
`repetition_penalty`, `cache_implementation`, `pad_to_multiple_of`).

Parity tests follow `test_grpo.py`: both trainers get the same completions and train four optimizer steps (two
generation batches, each used twice: `num_iterations=2`, so the importance ratios move off 1), and every metric both
log must agree to 2e-3. Each parity test also trains hf_align with the option switched off and checks that this run
does *not* match TRL's, so that the option is what the comparison tests. Sampling cannot be compared with TRL's sample
for sample; those tests check that the options reach `generate` and change what is sampled as they should.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_grpo import QUIET, _logs, _prompts, _settings, answer_reward, length_reward, patch_trl_generation, trl
from test_grpo import patch_hf_align_generation  # noqa: F401 (a fixture, found by pytest through this import)
from transformers import AutoModelForCausalLM

from hf_align import losses
from hf_align.generation import encode_prompts, generate_completions
from hf_align.trainers.grpo import GRPOConfig, GRPOTrainer, cast_lm_head_to_fp32
from hf_align.trainers.rloo import RLOOConfig, RLOOTrainer

REL, ABS = 2e-3, 1e-6
FUNCS = [length_reward, answer_reward]
NOT_COMPARED = {"step_time", "learning_rate", "epoch"}  # TRL's wall time; the schedule is the same by construction


def _relative_differences(ours: list[dict], theirs: list[dict]) -> dict[str, float]:
    """The largest relative difference of each metric TRL logs, over the steps (0 where the absolute difference is
    below ABS; inf where hf_align does not log it)."""
    assert len(ours) == len(theirs) == 4
    worst: dict[str, float] = {}
    for a, b in zip(ours, theirs):
        for key in set(b) - NOT_COMPARED:
            difference = abs(a[key] - b[key]) if key in a else math.inf
            relative = 0.0 if difference <= ABS else difference / max(abs(b[key]), 1e-12)
            worst[key] = max(worst.get(key, 0.0), relative)
    return worst


def _parity(options: dict, switched_off: dict, tiny_model_path, eos: int, dataset, tmp_path) -> GRPOTrainer:
    """Trains TRL's and hf_align's GRPO with `options`, checks every metric against TRL's, checks that hf_align with
    `switched_off` instead does not match, and returns hf_align's trainer with `options`."""
    settings = _settings(tmp_path, max_steps=4, reward_weights=[1.0, 0.5], **options)
    torch.manual_seed(0)
    theirs = trl.GRPOTrainer(tiny_model_path, FUNCS, args=trl.GRPOConfig(**settings), train_dataset=dataset)
    patch_trl_generation(theirs, eos)
    theirs.train()
    runs, trainers = {}, {}
    for name, changes in (("on", {}), ("off", switched_off)):
        torch.manual_seed(0)
        trainers[name] = GRPOTrainer(tiny_model_path, FUNCS, args=GRPOConfig(**{**settings, **changes}),
                                     train_dataset=dataset)
        trainers[name].train()
        runs[name] = _relative_differences(_logs(trainers[name]), _logs(theirs))
    worst = max(runs["on"].values())
    assert worst <= REL, {key: value for key, value in runs["on"].items() if value > REL}
    assert max(runs["off"].values()) > REL, f"hf_align matches TRL without {options}: the test cannot fail"
    print(f"max relative difference to TRL with {options}: {worst:.2e}")
    return trainers["on"]


LOSS_OPTIONS = {
    # a cap just above the clip range, where ratios of negative-advantage tokens reach
    "delta": (dict(delta=1.21), dict(delta=None)),
    "top_entropy_quantile": (dict(top_entropy_quantile=0.2), dict(top_entropy_quantile=1.0)),
    "off_policy_mask_threshold": (dict(off_policy_mask_threshold=0.02), dict(off_policy_mask_threshold=None)),
    "sapo": (dict(loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3), dict(loss_type="grpo")),
    "vespo": (dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5),
              dict(loss_type="dapo")),
    # ε_max low enough that some ratios are truncated
    "cispo": (dict(loss_type="cispo", epsilon_high=1.1), dict(loss_type="dapo")),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), dict(loss_type="grpo")),
    "normalize_then_sum": (dict(multi_objective_aggregation="normalize_then_sum"),
                           dict(multi_objective_aggregation="sum_then_normalize")),
    "sum_then_normalize": (dict(multi_objective_aggregation="sum_then_normalize"),
                           dict(multi_objective_aggregation="normalize_then_sum")),
    "combined": (dict(delta=1.25, top_entropy_quantile=0.5, off_policy_mask_threshold=0.02, loss_type="grpo"),
                 dict(delta=None, top_entropy_quantile=1.0, off_policy_mask_threshold=None, loss_type="grpo")),
}


@pytest.mark.parametrize("option", list(LOSS_OPTIONS))
def test_loss_option_matches_trl(option, tiny_model_path, tiny_tokenizer, embedded_data, patch_hf_align_generation,
                                 tmp_path):
    options, switched_off = LOSS_OPTIONS[option]
    _parity(options, switched_off, tiny_model_path, tiny_tokenizer.eos_token_id, _prompts(embedded_data, False),
            tmp_path)


ENTROPY_OPTIONS = {
    "fixed": (dict(entropy_coef=0.05), dict(entropy_coef=0.0)),
    # the target above the tiny model's entropy (~6.9 nats): the bonus applies from the second step on and grows; two
    # micro-batches per optimizer step, so the controller sums a whole accumulation window
    "adaptive": (dict(use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.02, entropy_target=10.0,
                      loss_type="grpo", per_device_train_batch_size=4, gradient_accumulation_steps=2),
                 dict(use_adaptive_entropy=False, entropy_coef=0.0)),
}


@pytest.mark.parametrize("option", list(ENTROPY_OPTIONS))
def test_entropy_bonus_matches_trl(option, tiny_model_path, tiny_tokenizer, embedded_data, patch_hf_align_generation,
                                   tmp_path):
    options, switched_off = ENTROPY_OPTIONS[option]
    _parity(options, switched_off, tiny_model_path, tiny_tokenizer.eos_token_id, _prompts(embedded_data, False),
            tmp_path)


def test_pad_to_multiple_of_pads_the_rollout_and_matches_trl(tiny_model_path, tiny_tokenizer, embedded_data,
                                                             patch_hf_align_generation, tmp_path):
    dataset = _prompts(embedded_data, False)
    settings = _settings(tmp_path, max_steps=4, reward_weights=[1.0, 0.5], pad_to_multiple_of=16)
    torch.manual_seed(0)
    theirs = trl.GRPOTrainer(tiny_model_path, FUNCS, args=trl.GRPOConfig(**settings), train_dataset=dataset)
    patch_trl_generation(theirs, tiny_tokenizer.eos_token_id)
    theirs.train()
    torch.manual_seed(0)
    ours = GRPOTrainer(tiny_model_path, FUNCS, args=GRPOConfig(**settings), train_dataset=dataset)
    ours.train()
    assert max(_relative_differences(_logs(ours), _logs(theirs)).values()) <= REL
    rollout = ours._buffered_rollouts[0]
    assert rollout.prompt_ids.shape[1] % 16 == 0 and rollout.completion_ids.shape[1] == 16
    assert rollout.completion_mask[:, 8:].sum() == 0  # masked padding beyond the 8-token completions


# ------------------------------------------------------------------------------------------ cast_lm_head_to_fp32


def test_cast_lm_head_to_fp32_computes_the_head_in_fp32(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16)
    head_weight = model.lm_head.weight.detach().float().clone()
    cast_lm_head_to_fp32(model)
    reference = copy.deepcopy(model)  # how the trainer's reference is made
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    input_ids = torch.tensor([[5, 17, 42, 9]])
    # tied: the embeddings share the fp32 weight, and hand the bf16 layers bf16 activations
    assert model.model.embed_tokens(input_ids).dtype == torch.bfloat16
    with torch.no_grad():
        output = model(input_ids, output_hidden_states=True)
        expected = F.linear(output.hidden_states[-1].float(), head_weight)
        assert output.logits.dtype == torch.float32
        torch.testing.assert_close(output.logits, expected)
        # the copy computes with its own weights
        reference.lm_head.weight.mul_(2)
        copied = reference(input_ids, output_hidden_states=True)
        torch.testing.assert_close(copied.logits, F.linear(copied.hidden_states[-1].float(), reference.lm_head.weight))
        assert not torch.allclose(copied.logits, expected)
        torch.testing.assert_close(model(input_ids).logits, expected)
    # and the bf16 head would not give these logits
    assert not torch.allclose(F.linear(output.hidden_states[-1], head_weight.bfloat16()).float(), expected, atol=1e-4)


def test_cast_lm_head_to_fp32_in_the_trainer_matches_trl(tiny_model_path, tiny_tokenizer, embedded_data,
                                                        patch_hf_align_generation, tmp_path):
    """A bf16 model: both trainers run the head (and so the log-probs, the KL, the ratios) in fp32."""
    ours = _parity(dict(cast_lm_head_to_fp32=True, model_init_kwargs={"dtype": "bfloat16"}),
                   dict(cast_lm_head_to_fp32=False), tiny_model_path, tiny_tokenizer.eos_token_id,
                   _prompts(embedded_data, False), tmp_path)
    assert ours.model.lm_head.weight.dtype == ours.ref_model.lm_head.weight.dtype == torch.float32
    assert ours.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ sampling options


@pytest.mark.parametrize("trainer_class, config_class", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_sampling_options_reach_generate(trainer_class, config_class, tiny_model_path, embedded_data, monkeypatch,
                                         tmp_path):
    args = config_class(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=5, min_p=0.05, repetition_penalty=1.1, cache_implementation="static", top_k=0,
        generation_kwargs='{"top_k": 7, "suppress_tokens": [5]}', pad_to_multiple_of=8, **QUIET,
    )
    trainer = trainer_class(tiny_model_path, length_reward, args=args, train_dataset=embedded_data("prompts", 4))
    calls = []
    generate = trainer.model.generate

    def spy(input_ids, attention_mask, generation_config):
        calls.append((input_ids.shape, generation_config))
        return generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)

    monkeypatch.setattr(trainer.model, "generate", spy)
    trainer.train()
    (shape, config), = calls
    assert (config.min_p, config.repetition_penalty, config.cache_implementation) == (0.05, 1.1, "static")
    assert config.top_k == 7 and config.suppress_tokens == [5]  # generation_kwargs override the named fields
    assert shape[1] % 8 == 0
    rollout = trainer._buffered_rollouts[0]
    assert rollout.prompt_ids.shape[1] % 8 == 0 and rollout.completion_ids.shape[1] % 8 == 0


def _sample(model, tokenizer, prompts, seed=0, **fields) -> tuple:
    args = GRPOConfig(output_dir="unused", max_completion_length=12, **fields, **QUIET)
    sampling = args.sampling(batch_size=64)
    sampling.num_generations, sampling.seed = 4, seed
    return generate_completions(model, tokenizer, prompts, sampling), sampling


def _rows(completions, group_size: int):
    """Per completion: its prompt ids and its tokens."""
    return [(completions.prompt_ids[i // group_size], row[mask.bool()].tolist())
            for i, (row, mask) in enumerate(zip(completions.completion_ids, completions.completion_mask))]


def test_huge_repetition_penalty_leaves_no_token_repeated(tiny_model, tiny_tokenizer, embedded_data):
    # Near-greedy sampling (top_k=1) of a random model loops on a few tokens; a huge penalty pushes every token seen
    # so far below the unseen ones.
    prompts = embedded_data("prompts", 8)["prompt"]

    def repeats(completions) -> int:
        return sum(any(t in prompt or tokens[:k].count(t) for k, t in enumerate(tokens))
                   for prompt, tokens in _rows(completions, 4))

    plain, _ = _sample(tiny_model, tiny_tokenizer, prompts, top_k=1)
    penalised, _ = _sample(tiny_model, tiny_tokenizer, prompts, top_k=1, repetition_penalty=1e6)
    assert repeats(plain) > 16
    assert repeats(penalised) == 0


def test_min_p_only_samples_tokens_above_its_threshold(tiny_model, tiny_tokenizer, embedded_data):
    prompts = embedded_data("prompts", 8)["prompt"]

    def lowest_relative_probability(completions) -> float:
        """The smallest p(token) / p(most likely token) of any sampled token, at the sampling temperature."""
        lowest = 1.0
        with torch.no_grad():
            for prompt, tokens in _rows(completions, 4):
                logits = tiny_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1] / 0.7
                relative = (logits.gather(1, torch.tensor(tokens)[:, None]) - logits.max(-1, keepdim=True).values)
                lowest = min(lowest, relative.exp().min().item())
        return lowest

    plain, _ = _sample(tiny_model, tiny_tokenizer, prompts, temperature=0.7)
    filtered, _ = _sample(tiny_model, tiny_tokenizer, prompts, temperature=0.7, min_p=0.8)
    assert lowest_relative_probability(plain) < 0.5
    assert lowest_relative_probability(filtered) >= 0.8 - 1e-3


def test_generation_kwargs_override_the_named_fields(tiny_model, tiny_tokenizer, embedded_data):
    prompts = embedded_data("prompts", 4)["prompt"]

    def distinct_per_group(completions) -> set[int]:
        rows = [tuple(tokens) for _, tokens in _rows(completions, 4)]
        return {len(set(rows[i : i + 4])) for i in range(0, len(rows), 4)}

    sampled, _ = _sample(tiny_model, tiny_tokenizer, prompts, top_k=0)
    greedy, sampling = _sample(tiny_model, tiny_tokenizer, prompts, top_k=0, generation_kwargs={"top_k": 1})
    assert distinct_per_group(sampled) == {4} and distinct_per_group(greedy) == {1}
    # a static KV cache samples the same tokens
    static, _ = _sample(tiny_model, tiny_tokenizer, prompts, generation_kwargs={"top_k": 1},
                        cache_implementation="static")
    assert torch.equal(static.completion_ids, greedy.completion_ids)
    assert encode_prompts(tiny_tokenizer, prompts) == greedy.prompt_ids and sampling.generation_kwargs == {"top_k": 1}


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(cache_implementation="bogus"), "cache_implementation"),
        (dict(cache_implementation="offloaded"), "no CUDA device"),
        (dict(generation_kwargs={"cache_implementation": "offloaded_static"}), "no CUDA device"),
        (dict(cache_implementation="quantized"), "optimum-quanto"),
        (dict(generation_kwargs={"num_return_sequences": 2}), "num_return_sequences"),
        (dict(generation_kwargs=[1]), "generation_kwargs"),
        (dict(pad_to_multiple_of=0), "pad_to_multiple_of"),
        (dict(delta=1.1), r"delta \(1.1\).*1 \+ epsilon_high"),
        (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
        (dict(off_policy_mask_threshold=-0.1), "off_policy_mask_threshold"),
        (dict(loss_type="luspo"), "importance_sampling_level='sequence'"),
        (dict(loss_type="vespo", importance_sampling_level="sequence"), "vespo"),
        (dict(loss_type="cispo"), "epsilon_high"),
        (dict(sapo_temperature_neg=0.0), "sapo_temperature"),
        (dict(vespo_lambda_pos=0.0), "vespo_lambda"),
        (dict(entropy_coef_min=0.5, entropy_coef_max=0.1), "entropy_coef_min"),
        (dict(multi_objective_aggregation="sum"), "multi_objective_aggregation"),
        (dict(multi_objective_aggregation="normalize_then_sum", scale_rewards="batch"), "scale_rewards"),
    ],
)
def test_bad_options_raise_at_config_time_naming_the_field(fields, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(output_dir=str(tmp_path), **fields, **QUIET)


def test_rloo_config_has_the_sampling_fields_and_checks_them(tmp_path):
    with pytest.raises(ValueError, match="min_p"):
        RLOOConfig(output_dir=str(tmp_path), min_p=-1.0, **QUIET)
    args = RLOOConfig(output_dir=str(tmp_path), repetition_penalty=1.2, generation_kwargs='{"top_k": 3}',
                      pad_to_multiple_of="16", **QUIET)
    assert args.sampling(batch_size=2).generation_kwargs == {"top_k": 3} and args.pad_to_multiple_of == 16


def test_string_values_are_parsed_as_trl_parses_them(tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), generation_kwargs='{"suppress_tokens": [3]}', **QUIET)
    assert args.pad_to_multiple_of is None  # "auto": no padding off AWS Neuron
    assert args.generation_kwargs == {"suppress_tokens": [3]}
    assert GRPOConfig(output_dir=str(tmp_path), pad_to_multiple_of="32", **QUIET).pad_to_multiple_of == 32


# ------------------------------------------------------------------------------------------ loss pieces by hand


def test_sapo_loss_hand_values():
    log_ratio = torch.log(torch.tensor([[1.0, 1.5], [0.5, 1.0]]))
    advantages = torch.tensor([2.0, -1.0])
    loss = losses.sapo_loss(log_ratio, advantages, temperature_pos=1.0, temperature_neg=2.0)

    def gate(ratio, tau):
        return 4 / tau / (1 + math.exp(-tau * (ratio - 1)))

    expected = torch.tensor([[-gate(1.0, 1) * 2, -gate(1.5, 1) * 2], [gate(0.5, 2), gate(1.0, 2)]])
    torch.testing.assert_close(loss, expected)
    # on-policy its gradient is the plain policy gradient, -A per unit of log-ratio
    log_ratio = torch.zeros(2, 1, requires_grad=True)
    losses.sapo_loss(log_ratio, advantages, 1.0, 2.0).sum().backward()
    torch.testing.assert_close(log_ratio.grad, -advantages[:, None])


def test_cispo_and_weighted_reinforce_hand_values():
    log_ratio = torch.log(torch.tensor([[0.5, 3.0]])).requires_grad_()
    weights = losses.cispo_weights(log_ratio, epsilon_max=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 2.0]]))
    assert not weights.requires_grad  # a weight, not a path for the gradient
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = losses.weighted_reinforce_loss(logps, weights, torch.tensor([3.0]))
    torch.testing.assert_close(loss, torch.tensor([[1.5, 12.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.5, -6.0]]))  # -w A


def test_vespo_weights_hand_values():
    # sequence ratios w = e^0.5 (masked 3rd token ignored) with A ≥ 0, and w = 1 with A < 0
    log_ratio = torch.tensor([[0.2, 0.3, 5.0], [0.4, -0.4, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    weights = losses.vespo_weights(log_ratio, mask, torch.tensor([1.0, -1.0]), k_pos=2.0, lambda_pos=3.0, k_neg=3.0,
                                   lambda_neg=2.0)
    w = math.exp(0.5)
    expected = torch.tensor([[math.exp(3.0) * w**2 * math.exp(-3.0 * w)], [1.0]])
    torch.testing.assert_close(weights, expected)
    # a huge ratio is clamped to e^20, where φ underflows to 0 (not NaN)
    huge = losses.vespo_weights(torch.full((1, 4), 30.0), torch.ones(1, 4), torch.tensor([1.0]), 2.0, 3.0, 3.0, 2.0)
    assert huge.item() == 0.0


def test_off_policy_sequence_mask_hand_values():
    logps = torch.full((4, 2), -1.0)
    old = torch.tensor([[-0.5, -0.7], [-0.5, -0.7], [-0.9, -1.0], [-1.0, -3.0]])  # mean drifts 0.4, 0.4, 0.05, -1.0
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1]])
    kept = losses.off_policy_sequence_mask(torch.tensor([1.0, -1.0, -1.0, -1.0]), logps, old, mask, threshold=0.1)
    # positive advantage: kept whatever the drift; negative: dropped only when drifted beyond the threshold
    torch.testing.assert_close(kept, torch.tensor([[1.0], [0.0], [1.0], [1.0]]))


def test_high_entropy_mask_hand_values():
    entropy = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.3, 2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # 2.0 is padding
    # five tokens 0.1 0.3 0.5 0.7 0.9: the 0.6 quantile is 0.58, so the top 40% are 0.7 and 0.9
    kept = losses.high_entropy_mask(entropy, mask, quantile=0.4)
    assert kept.tolist() == [[False, True, False], [True, False, False]]
    assert losses.high_entropy_mask(entropy, mask, 1.0).tolist() == mask.bool().tolist()
    assert losses.high_entropy_mask(entropy, mask, 0.0).sum() == 1  # only the highest
    # ranked among a larger pool (other processes' tokens), fewer of these pass
    pool = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 1.1, 1.2])
    assert losses.high_entropy_mask(entropy, mask, 0.4, pool=pool).sum() == 0
    assert not losses.high_entropy_mask(entropy, torch.zeros_like(mask), 0.5).any()


def test_adaptive_entropy_coef_hand_values():
    up = losses.adaptive_entropy_coef(0.1, entropy=0.2, target=0.3, step=0.05, coef_min=0.0, coef_max=1.0)
    down = losses.adaptive_entropy_coef(0.1, entropy=0.4, target=0.3, step=0.05, coef_min=0.0, coef_max=1.0)
    assert (up, down) == (pytest.approx(0.15), pytest.approx(0.05))
    assert losses.adaptive_entropy_coef(0.1, entropy=0.3, target=0.3, step=0.05, coef_min=0.0, coef_max=1.0) > 0.1
    assert losses.adaptive_entropy_coef(0.98, 0.2, 0.3, 0.05, 0.0, 1.0) == 1.0  # bounded above
    assert losses.adaptive_entropy_coef(0.02, 0.4, 0.3, 0.05, 0.0, 1.0) == 0.0  # and below


def test_aggregation_of_the_new_loss_types_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # luspo: each sequence's sum, averaged over sequences
    torch.testing.assert_close(losses.aggregate_token_loss(per_token, mask, "luspo"), torch.tensor(5.0))
    # sapo as grpo: (2 + 4) / 2; cispo and vespo as dapo: 10 / 8 tokens in the generation batch
    torch.testing.assert_close(losses.aggregate_token_loss(per_token, mask, "sapo"), torch.tensor(3.0))
    for loss_type in ("cispo", "vespo"):
        total = losses.aggregate_token_loss(per_token, mask, loss_type, num_items_in_batch=8)
        torch.testing.assert_close(total, torch.tensor(1.25))


def test_adaptive_entropy_control_resumes_from_a_checkpoint(tiny_model_path, embedded_data, tmp_path):
    def trainer():
        args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          use_adaptive_entropy=True, entropy_coef=0.1, **QUIET)
        return GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=embedded_data("prompts", 4))

    first = trainer()
    assert (first.entropy_control.coef, first.entropy_control.last_step_entropy) == (0.1, math.inf)
    first.entropy_control.coef, first.entropy_control.last_step_entropy = 0.3, 1.5
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    first.save_training_state(str(checkpoint))
    resumed = trainer()
    resumed.load_training_state(str(checkpoint))
    assert (resumed.entropy_control.coef, resumed.entropy_control.last_step_entropy) == (0.3, 1.5)


def test_cast_lm_head_to_fp32_with_a_peft_adapter_on_the_head(tiny_model_path, embedded_data, tmp_path):
    # TRL refuses an adapter on the head (its fused head reads the base weight); hf_align calls the head as a module,
    # so the adapter applies on top of the fp32 base layer.
    from peft import LoraConfig

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, cast_lm_head_to_fp32=True, model_init_kwargs={"dtype": "bfloat16"},
                      **QUIET)
    trainer = GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=embedded_data("prompts", 4),
                          peft_config=LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    head = trainer.model.get_base_model().lm_head
    assert head.base_layer.weight.dtype == torch.float32
    before = head.lora_B["default"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(head.lora_B["default"].weight, before)  # the adapter on the head trains
    with torch.no_grad():
        assert trainer.model(torch.tensor([[5, 6, 7]])).logits.dtype == torch.float32
