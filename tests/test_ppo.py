"""PPOTrainer: it learns (a verifier's held-out accuracy rises from a fixed seed), LoRA keeps one copy of the base
weights for policy, reference and value head, a separate critic trains and stays out of the saved policy, the KL
controllers, the GAE wiring of a rollout recomputed by hand, and clear configuration errors."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig,
                          LlamaForSequenceClassification, PreTrainedModel)

import hf_align.rollout
from hf_align import losses
from hf_align.defaults import load_default_dataset
from hf_align.generation import Completions, encode_prompts
from hf_align.sequence_logprobs import completion_token_logprobs
from hf_align.scripts import verifier_accuracy
from hf_align.trainers.ppo import PPOConfig, PPOTrainer
from hf_align.value import CRITIC_ATTRIBUTE
from hf_align.value import ValueHead
from hf_align.verifiers import exact_match_reward

QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True)
MAX_COMPLETION = 6


def _args(tmp_path, **overrides) -> PPOConfig:
    settings = dict(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=2,
                    max_completion_length=MAX_COMPLETION, learning_rate=1e-2, num_iterations=1, logging_steps=1,
                    seed=0, **QUIET)
    return PPOConfig(**{**settings, **overrides})


def _prompts(n: int = 16) -> Dataset:
    return load_default_dataset("prompts").select(range(n))


def length_reward(completion_ids, **kwargs):
    return [0.25 * len(ids) - 1.0 for ids in completion_ids]


def capture_rollouts(trainer) -> list[dict]:
    """The trainer's rollouts as `make_rollout` returns them (whole and unshuffled), in order."""
    rollouts = []
    make_rollout = trainer.make_rollout

    def capturing(rows):
        rollouts.append(make_rollout(rows))
        return rollouts[-1]

    trainer.make_rollout = capturing
    return rollouts


def fake_completion(prompt_ids: list[int], row: int, eos: int) -> list[int]:
    """1 to MAX_COMPLETION tokens depending on the prompt and the row; every third row runs to the limit with no eos."""
    length = 1 + (sum(prompt_ids) + row) % MAX_COMPLETION
    tokens = [(sum(prompt_ids) * (row + 1) + 17 * k) % 200 + 10 for k in range(MAX_COMPLETION)]
    return tokens if row % 3 == 2 else tokens[: length - 1] + [eos]


@pytest.fixture
def fixed_completions(monkeypatch, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id

    def generate(model, tokenizer, prompts, sampling):
        prompt_ids = encode_prompts(tokenizer, prompts)
        ids = [torch.tensor(fake_completion(p, i, eos)) for i, p in enumerate(prompt_ids)]
        return Completions(prompt_ids, hf_align.data.pad(ids, tokenizer.pad_token_id),
                           hf_align.data.pad([torch.ones_like(row) for row in ids], 0),
                           tokenizer.batch_decode(ids, skip_special_tokens=True))

    monkeypatch.setattr(hf_align.rollout, "generate_completions", generate)


# -- learning ----------------------------------------------------------------------------------------------------------
def test_ppo_with_a_verifier_raises_held_out_accuracy(rlvr_start_path, tmp_path):
    """RLVR on the embedded "Which is larger, a or b?" task, from the short SFT warm start `run_rlvr` makes."""
    start = rlvr_start_path
    tokenizer = AutoTokenizer.from_pretrained(start)
    test = load_default_dataset("comparisons", "test")
    verifier = exact_match_reward()
    before = verifier_accuracy(AutoModelForCausalLM.from_pretrained(start), tokenizer, test, verifier)

    args = _args(tmp_path, learning_rate=1e-3, max_steps=200, per_device_train_batch_size=16, num_iterations=2,
                 logging_steps=20)
    trainer = PPOTrainer(start, verifier, args=args, train_dataset=load_default_dataset("comparisons"))
    trainer.train()
    after = verifier_accuracy(trainer.model, tokenizer, test, verifier)

    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(f"[ppo] held-out accuracy {before:.3f} -> {after:.3f}; train reward by 20 steps {rewards}")
    assert after > before + 0.15
    assert rewards[-1] > rewards[0]


# -- memory: one copy of the base under LoRA ---------------------------------------------------------------------------
def _live_models() -> list[PreTrainedModel]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)]


def test_lora_shares_one_copy_of_the_base_weights(tiny_model_path, fixed_completions, tmp_path):
    """Policy (adapter on), reference (adapter off) and value head (on the policy's hidden state) use one set of base
    weights: no frozen copy is made, before or during training, and only the adapter and the head train."""
    existing = weakref.WeakSet(_live_models())
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = PPOTrainer(tiny_model_path, length_reward, args=_args(tmp_path, beta=0.1), train_dataset=_prompts(),
                         peft_config=lora)
    rollouts = capture_rollouts(trainer)
    policy = trainer.model.get_base_model()
    assert trainer.ref_model is None and isinstance(trainer.critic, ValueHead)

    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or CRITIC_ATTRIBUTE in name for name in trainable)
    assert any(CRITIC_ATTRIBUTE in name for name in trainable) and any("lora_" in name for name in trainable)

    trainer.train()
    created = [model for model in _live_models() if model not in existing]
    assert policy in created and all(any(model is part for part in policy.modules()) for model in created)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    base_storages = {p.data_ptr(): p.numel() for name, p in trainer.model.named_parameters()
                     if "lora_" not in name and CRITIC_ATTRIBUTE not in name}
    assert sum(base_storages.values()) == base.num_parameters()  # one model's worth of distinct base storages
    assert sum(p.numel() for p in trainer.critic.parameters()) == base.config.hidden_size + 1

    # The adapter has moved the policy away from its reference, and the reference is still the base model.
    first, last = rollouts[0], rollouts[-1]
    torch.testing.assert_close(first.old_logps, first.ref_logps, rtol=0, atol=1e-5)
    assert (last.old_logps - last.ref_logps).abs().max() > 1e-3
    with torch.no_grad():
        base_logps = completion_token_logprobs(base, last).token_logps
    torch.testing.assert_close(last.ref_logps, base_logps, rtol=0, atol=1e-5)


# -- a separate critic -------------------------------------------------------------------------------------------------
def test_separate_critic_trains_and_is_left_out_of_the_saved_policy(tiny_model_path, tiny_seqcls_path, tmp_path):
    """InstructGPT's layout: the reward model scores, and a copy of it, loaded from the same path, is the critic."""
    trainer = PPOTrainer(tiny_model_path, tiny_seqcls_path, args=_args(tmp_path, beta=0.1, max_steps=3),
                         train_dataset=_prompts(), value_model=tiny_seqcls_path)
    assert trainer.separate_critic
    reward_model = trainer.reward_scorer.reward_funcs[0]
    assert trainer.critic is not reward_model
    critic_before = {name: p.detach().clone() for name, p in trainer.critic.named_parameters()}
    reward_before = {name: p.detach().clone() for name, p in reward_model.named_parameters()}
    trainer.train()

    assert all(p.requires_grad for p in trainer.critic.parameters())
    changed = [name for name, p in trainer.critic.named_parameters() if not torch.equal(p, critic_before[name])]
    assert "score.weight" in changed and any(name.startswith("model.layers") for name in changed)
    assert all(torch.equal(p, reward_before[name]) for name, p in reward_model.named_parameters())
    assert "val/explained_variance" in trainer.state.log_history[-2]

    output = tmp_path / "saved"
    trainer.save_model(str(output))
    with safe_open(str(output / "model.safetensors"), "pt") as saved:
        keys = list(saved.keys())
    assert keys and not any(CRITIC_ATTRIBUTE in key for key in keys)
    assert hasattr(trainer.model, CRITIC_ATTRIBUTE)  # still attached for further training
    reloaded, info = AutoModelForCausalLM.from_pretrained(str(output), output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
    for name, p in reloaded.named_parameters():
        torch.testing.assert_close(p, trainer.model.get_parameter(name), rtol=0, atol=0)


# -- KL controllers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [True, False])
def test_kl_coefficient_between_rollouts(adaptive, tiny_model_path, tmp_path):
    """One rollout per step; horizon 4 for 8 samples a rollout, so n / horizon = 2: the adaptive β is multiplied by
    `1 + 2 · clip(KL / target - 1, ±0.2)` after each rollout (×0.6 below the target, ×1.4 above); a fixed
    one stays."""
    beta, target = 0.2, 0.05
    args = _args(tmp_path, beta=beta, adaptive_kl=adaptive, target_kl=target, kl_horizon=4, max_steps=5)
    trainer = PPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=_prompts())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "objective/kl_coef" in entry]
    kls, betas = [entry["objective/kl"] for entry in logs], [entry["objective/kl_coef"] for entry in logs]
    assert len(logs) == 5 and betas[0] == pytest.approx(beta)
    if not adaptive:
        assert betas == [pytest.approx(beta)] * 5
        return
    for kl, current, following in zip(kls, betas, betas[1:]):
        assert following == pytest.approx(current * (1 + 2 * min(max(kl / target - 1, -0.2), 0.2)), rel=1e-6)
        assert (following - current) * (kl - target) > 0  # toward the target
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and max(kls) > target  # both directions were taken
    assert trainer.kl_controller.value == pytest.approx(
        betas[-1] * (1 + 2 * min(max(kls[-1] / target - 1, -0.2), 0.2)), rel=1e-6)


# -- GAE wiring --------------------------------------------------------------------------------------------------------
def scored_unless_multiple_of_five(completion_ids, **kwargs):
    return [None if len(ids) % 5 == 0 else float(sum(ids) % 7) - 3.0 for ids in completion_ids]


def test_rollout_returns_and_advantages_are_gae_of_its_stored_values(tiny_model_path, tiny_tokenizer,
                                                                     fixed_completions, tmp_path):
    """Fixed completions (some without eos), a reward that skips some of them (None), a missing-eos penalty, γ and λ
    below 1, a value head that starts nonzero and a policy that has moved from the reference (second rollout): the
    stored returns and whitened advantages are GAE over the stored old values / old and reference log-probs."""
    beta, gamma, lam, penalty = 0.3, 0.9, 0.8, 0.5
    args = _args(tmp_path, beta=beta, gamma=gamma, lam=lam, missing_eos_penalty=penalty, per_device_train_batch_size=12)
    trainer = PPOTrainer(tiny_model_path, scored_unless_multiple_of_five, args=args, train_dataset=_prompts(24))
    torch.manual_seed(0)
    torch.nn.init.normal_(trainer.critic.linear.weight, std=0.5)
    rollouts = capture_rollouts(trainer)
    trainer.train()
    rollout = rollouts[-1]

    ids = rollout.completion_ids
    lengths = [int(n) for n in (ids != tiny_tokenizer.pad_token_id).sum(-1)]
    rows = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    scores = scored_unless_multiple_of_five(rows)
    assert None in scores and any(row[-1] != tiny_tokenizer.eos_token_id for row in rows)
    mask = torch.zeros_like(rollout.values)
    token_rewards = torch.zeros_like(mask)
    for i, (row, score) in enumerate(zip(rows, scores)):
        if score is None:
            continue  # unscorable: out of the loss
        mask[i, : len(row)] = 1
        truncated = row[-1] != tiny_tokenizer.eos_token_id
        kl = rollout.old_logps[i, : len(row)] - rollout.ref_logps[i, : len(row)]
        token_rewards[i, : len(row)] = -beta * kl
        token_rewards[i, len(row) - 1] += score - penalty * truncated
    torch.testing.assert_close(rollout.completion_mask.float(), mask)
    assert ((rollout.values.abs() > 1e-3) * mask).sum() == mask.sum()  # the critic is not trivially 0
    assert (rollout.old_logps - rollout.ref_logps).mul(mask).abs().max() > 1e-3

    advantages, returns = losses.generalized_advantage_estimation(token_rewards, rollout.values, mask, gamma,
                                                                  lam)
    torch.testing.assert_close(rollout.returns, returns, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rollout.advantages, losses.masked_whiten(advantages, mask), rtol=1e-5, atol=1e-5)


# -- errors ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    (dict(beta=-0.1), "beta and vf_coef must be >= 0"),
    (dict(vf_coef=-1.0), "beta and vf_coef must be >= 0"),
    (dict(gamma=1.5), r"gamma and lam must be in \[0, 1\]"),
    (dict(lam=-0.1), r"gamma and lam must be in \[0, 1\]"),
    (dict(cliprange_value=0.0), "cliprange_value must be > 0"),
    (dict(adaptive_kl=True, beta=0.0), "adaptive_kl needs an initial beta > 0"),
    (dict(adaptive_kl=True, target_kl=0.0), "target_kl and kl_horizon must be > 0"),
    (dict(adaptive_kl=True, kl_horizon=-1), "target_kl and kl_horizon must be > 0"),
    (dict(num_generations=0), "num_generations must be at least 1"),
])
def test_config_errors(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **settings)


def test_constructor_errors(tiny_model_path, tiny_model, tiny_seqcls_path, tmp_path):
    args, prompts = _args(tmp_path), _prompts()
    with pytest.raises(ValueError, match="`reward_funcs` is required"):
        PPOTrainer(tiny_model_path, args=args, train_dataset=prompts)
    with pytest.raises(ValueError, match="value_model must be a sequence classifier with num_labels=1"):
        PPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=prompts, value_model=tiny_model)
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_seqcls_path)
    with pytest.raises(ValueError, match="must not be the same object as a reward model"):
        PPOTrainer(tiny_model_path, reward_model, args=args, train_dataset=prompts, value_model=reward_model)
    small = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2, num_labels=1))
    with pytest.raises(ValueError, match="must use the same tokenizer"):
        PPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=prompts, value_model=small)


# -- the RLHF example --------------------------------------------------------------------------------------------------
def test_rlhf_example_pipeline_runs_offline(tmp_path, monkeypatch, capsys):
    """`python examples/ppo.py` (SFT, reward model, PPO against it, each stage's folder feeding the next), shortened."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "ppo.py"
    spec = importlib.util.spec_from_file_location("ppo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    trainer = example.main(["--sft.max_steps=2", "--reward.max_steps=2", "--max_steps=2", "--eval_steps=2",
                            "--max_completion_length=4", "--num_generations_eval=1", "--disable_tqdm=True",
                            "--sft.disable_tqdm=True", "--reward.disable_tqdm=True"])

    assert trainer.state.global_step == 2 and trainer.separate_critic
    assert trainer.model_name == "outputs/ppo-sft" and trainer.reward_scorer.names == ["ppo-reward"]
    for stage in ("ppo-sft", "ppo-reward", "ppo"):
        assert (tmp_path / "outputs" / stage / "model.safetensors").is_file()
        assert (tmp_path / "outputs" / stage / "README.md").is_file()
    summary = capsys.readouterr().out
    assert "accuracy on held-out pairs" in summary and "before PPO" in summary
