"""TRL 1.16's remaining options of the online Configs (GRPOConfig, RLOOConfig, OnlineDPOConfig) and trainers:

- the vLLM fields (accepted; `use_vllm=True` raises), `pad_to_multiple_of` as "none" / "null";
- `chat_template_kwargs`: reach the template that renders prompts for sampling and the reward model's template;
- completion logging (`log_completions`, `num_completions_to_print`, `log_unique_prompts`, `log_multimodal`,
  `log_completions_hub_repo`): the printed table, the parquet files, the trackers' table, the Hub push (a subprocess
  whose `HF_ENDPOINT` is the loopback hub of `hub_server.py`);
- transformers' continuous batching (`use_transformers_continuous_batching`, `use_transformers_paged`,
  `transformers_continuous_batching_config`): greedy completions equal `generate`'s, sampling trains, options it
  cannot honour raise;
- Online DPO's `reward_model_path`; GRPO's `tools` / `rollout_func` / `environment_factory` (not run yet: an error)
  and `max_tool_calling_iterations`.

`ds3_gather_for_generation=False` is tested under real DeepSpeed ZeRO-3 in `test_deepspeed.py`.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_align.generation
import hf_align.rollout
from hf_align import DataError, OnlineDPOConfig, OnlineDPOTrainer, RLOOConfig, RLOOTrainer, losses
from hf_align.completion_log import CompletionLog, active_trackers
from hf_align.defaults import CHAT_TEMPLATE
from hf_align.generation import SamplingConfig, encode_prompts, generate_completions, stop_token_ids
from hf_align.trainers.grpo import GRPOConfig, GRPOTrainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer  # noqa: E402

QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, bf16=False, seed=0)
# A paged cache sized for these tests: on a CPU, continuous batching otherwise sizes it from the machine's RAM.
SMALL_CACHE = {"num_blocks": 16, "max_batch_tokens": 256}
MARKED_TEMPLATE = "{%- if marked %}{{- 'MARKED ' }}{%- endif %}" + CHAT_TEMPLATE


def _settings(tmp_path, **overrides) -> dict:
    return {**dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_steps=2,
                   max_completion_length=6, learning_rate=1e-3, logging_steps=1, **QUIET), **overrides}


def _prompts(n: int = 4, conversational: bool = False) -> Dataset:
    prompts = [f"<<P{i}>> say something" for i in range(n)]
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    return Dataset.from_dict({"prompt": prompts, "index": list(range(n))})


def length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"]) % 5) for c in completions]


def vowel_reward(completions, index, log_extra, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    log_extra("prompt_index", list(index))
    return [float(sum(ch in "aeiou" for ch in text)) for text in texts]


@pytest.fixture
def sampled(monkeypatch) -> list:
    """Every `(sampling, completions)` the online trainers' sampling produced (the real `generate_completions`)."""
    calls = []
    real = hf_align.rollout.generate_completions

    def spy(model, tokenizer, prompts, sampling):
        completions = real(model, tokenizer, prompts, sampling)
        calls.append((sampling, completions))
        return completions

    monkeypatch.setattr(hf_align.rollout, "generate_completions", spy)
    return calls


# ------------------------------------------------------------------------------------------- Config fields


def test_vllm_fields_are_accepted_and_use_vllm_raises(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), vllm_mode="server", vllm_server_port=8123, **QUIET)
    assert (config.vllm_mode, config.vllm_server_port, config.vllm_gpu_memory_utilization) == ("server", 8123, 0.3)
    assert config.vllm_importance_sampling_mode == "sequence_mask" and config.ds3_gather_for_generation is True
    assert RLOOConfig(output_dir=str(tmp_path), **QUIET).vllm_tensor_parallel_size == 1
    assert OnlineDPOConfig(output_dir=str(tmp_path), **QUIET).vllm_gpu_memory_utilization == 0.55  # TRL's own
    for config_class in (GRPOConfig, RLOOConfig, OnlineDPOConfig):
        with pytest.raises(ValueError, match="use_vllm"):
            config_class(output_dir=str(tmp_path), use_vllm=True, **QUIET)


@pytest.mark.parametrize("value, expected", [("none", None), ("NULL", None), ("64", 64), (8, 8), ("auto", None)])
def test_pad_to_multiple_of_parses_trls_strings(tmp_path, value, expected):
    assert GRPOConfig(output_dir=str(tmp_path), pad_to_multiple_of=value, **QUIET).pad_to_multiple_of == expected


def test_json_strings_and_logging_fields(tmp_path):
    config = RLOOConfig(output_dir=str(tmp_path), chat_template_kwargs='{"marked": true}', log_completions=True,
                        log_multimodal=False, num_completions_to_print=3, log_unique_prompts=True, **QUIET)
    assert config.chat_template_kwargs == {"marked": True} and config.num_completions_to_print == 3
    with pytest.raises(ValueError, match="log_completions=True"):
        GRPOConfig(output_dir=str(tmp_path), log_completions_hub_repo="me/logs", **QUIET)


def test_tool_calling_arguments_are_checked_before_training(tmp_path, tiny_model_path):
    """TRL's multi-turn arguments: what cannot work is an error when the trainer is built (runs: test_grpo_tools)."""
    args = GRPOConfig(**_settings(tmp_path, max_tool_calling_iterations=3))
    assert args.max_tool_calling_iterations == 3  # accepted without tools, as TRL accepts it
    # The embedded tiny model's ChatML template renders no tool calls.
    with pytest.raises(ValueError, match="renders a full tool-calling conversation"):
        GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=_prompts(), tools=[length_reward])
    with pytest.raises(ValueError, match="must define a callable `reset`"):
        GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=_prompts(), environment_factory=object)
    with pytest.raises(ValueError, match="rollout_func samples the completions itself"):
        GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=_prompts(), tools=[length_reward],
                    rollout_func=lambda prompts, trainer: {})
    parameters = list(inspect.signature(GRPOTrainer.__init__).parameters)
    assert parameters[-4:] == ["peft_config", "tools", "rollout_func", "environment_factory"]
    # TRL's RLOOTrainer takes none of them, and neither does hf_align's.
    assert not {"tools", "rollout_func", "environment_factory"} & set(inspect.signature(RLOOTrainer.__init__).parameters)
    trainer = GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=_prompts(), tools=[])
    assert trainer.args.max_tool_calling_iterations == 3  # an empty list of tools is no tools


# ------------------------------------------------------------------------------------------- chat_template_kwargs


def test_chat_template_kwargs_reach_the_sampling_and_reward_model_templates(tmp_path, tiny_model_path,
                                                                            tiny_seqcls_path, sampled):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.chat_template = MARKED_TEMPLATE
    prompts = list(_prompts(2, conversational=True)["prompt"])
    assert "MARKED" not in tokenizer.decode(encode_prompts(tokenizer, prompts)[0])
    assert tokenizer.decode(encode_prompts(tokenizer, prompts, {"marked": True})[0]).startswith("MARKED ")

    reward_tokenizer = AutoTokenizer.from_pretrained(tiny_seqcls_path)
    reward_tokenizer.chat_template = MARKED_TEMPLATE
    args = GRPOConfig(**_settings(tmp_path, max_steps=1, chat_template_kwargs={"marked": True}))
    trainer = GRPOTrainer(tiny_model_path, tiny_seqcls_path, args=args, train_dataset=_prompts(conversational=True),
                          processing_class=tokenizer, reward_processing_classes=[reward_tokenizer])
    scored = []
    reward_model = trainer.reward_scorer.reward_funcs[0]
    reward_model.register_forward_pre_hook(lambda module, args, kwargs: scored.append(kwargs["input_ids"]),
                                           with_kwargs=True)
    trainer.train()
    (sampling, completions), = sampled
    assert sampling.chat_template_kwargs == {"marked": True}
    assert all(tokenizer.decode(ids).startswith("MARKED <|im_start|>user") for ids in completions.prompt_ids)
    assert scored and all(reward_tokenizer.decode(ids).startswith("MARKED ") for ids in scored[0])


def test_prompts_are_checked_with_the_chat_template_kwargs(tmp_path, tiny_model_path):
    """A template that needs a kwarg renders the dataset's prompts at the check with it, and fails without."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.chat_template = "{% if not marked %}{{ raise_exception('needs marked') }}{% endif %}" + MARKED_TEMPLATE
    dataset = _prompts(conversational=True)
    args = GRPOConfig(**_settings(tmp_path, max_steps=1, chat_template_kwargs={"marked": True}))
    GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(DataError, match="row 0, column 'prompt'.*needs marked"):
        GRPOTrainer(tiny_model_path, length_reward, args=GRPOConfig(**_settings(tmp_path, max_steps=1)),
                    train_dataset=dataset, processing_class=tokenizer)


# ------------------------------------------------------------------------------------------- completion logging


def test_log_completions_prints_saves_and_reports_the_last_generation_batch(tmp_path, tiny_model_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's width: wide enough for whole column names
    args = GRPOConfig(**_settings(tmp_path, log_completions=True, num_completions_to_print=2))
    trainer = GRPOTrainer(tiny_model_path, [length_reward, vowel_reward], args=args, train_dataset=_prompts())
    capsys.readouterr()
    trainer.train()
    printed = capsys.readouterr().out
    for step in (1, 2):
        assert f"Step {step}" in printed
    assert "length_reward" in printed and "Advantage" in printed and "prompt_index" in printed
    # num_completions_to_print rows of the table at each of the 2 logging steps (and the final log)
    assert printed.count("<<P") == 2 * printed.count("Step ")

    folder = tmp_path / "out" / "completions"
    assert sorted(os.listdir(folder)) == ["completions_00001.parquet", "completions_00002.parquet"]
    table = pandas.read_parquet(folder / "completions_00002.parquet")
    assert list(table.columns) == ["step", "prompt", "completion", "length_reward", "vowel_reward", "prompt_index",
                                   "advantage"]
    assert len(table) == args.generation_batch_size and set(table["step"]) == {2}
    # Groups of num_generations rows: the prompt, its log_extra column, and the rewards and advantages of each row.
    assert list(table["prompt"][::2]) == list(table["prompt"][1::2])
    assert [f"<<P{i}>> say something" for i in table["prompt_index"]] == list(table["prompt"])
    assert list(table["length_reward"]) == length_reward(list(table["completion"]))
    rewards = torch.tensor(table[["length_reward", "vowel_reward"]].to_numpy(), dtype=torch.float32)
    expected = losses.group_relative_advantages(rewards.sum(-1), 2, "group")
    torch.testing.assert_close(torch.tensor(table["advantage"].to_numpy(), dtype=torch.float32), expected)


def test_online_dpo_loads_reward_model_path_and_logs_no_advantage(tmp_path, tiny_model_path, tiny_seqcls_path):
    args = OnlineDPOConfig(**_settings(tmp_path, max_steps=1, max_new_tokens=6, max_length=64, log_completions=True,
                                       reward_model_path=tiny_seqcls_path, max_completion_length=None))
    trainer = OnlineDPOTrainer(tiny_model_path, args=args, train_dataset=_prompts(conversational=True))
    reward_name = os.path.basename(tiny_seqcls_path)
    assert trainer.reward_scorer.names == [reward_name]  # loaded from reward_model_path (TRL's script does so)
    trainer.train()
    table = pandas.read_parquet(tmp_path / "out" / "completions" / "completions_00001.parquet")
    assert list(table.columns) == ["step", "prompt", "completion", reward_name]
    assert len(table) == 4 and all(c[0]["role"] == "assistant" for c in table["completion"])


def test_reward_model_path_is_second_to_the_trainers_rankers(tmp_path, tiny_model_path, tiny_seqcls_path, caplog):
    args = OnlineDPOConfig(**_settings(tmp_path, max_new_tokens=6, max_length=64, max_completion_length=None,
                                       reward_model_path=tiny_seqcls_path))
    trainer = OnlineDPOTrainer(tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=_prompts())
    assert trainer.reward_scorer.names == ["length_reward"] and "is not loaded" in caplog.text
    args = OnlineDPOConfig(**_settings(tmp_path, max_new_tokens=6, max_length=64, max_completion_length=None))
    with pytest.raises(ValueError, match="reward_model_path"):
        OnlineDPOTrainer(tiny_model_path, args=args, train_dataset=_prompts())


def test_trackers_get_the_table_and_unique_prompts_dedupes_it(tmp_path, monkeypatch):
    """The real trackio client (local) takes the table, deduplicated by prompt with `log_unique_prompts`; the saved
    parquet keeps every row."""
    trackio = pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    assert active_trackers(["trackio"]) == [trackio] and active_trackers(["tensorboard"]) == []
    prompts = [[{"role": "user", "content": "a"}]] * 2 + [[{"role": "user", "content": "b"}]] * 2
    trackio.init(project="hf_align-test")
    logged = []
    log = trackio.log

    def recorded_log(values, *args, **kwargs):
        logged.append(values)
        return log(values, *args, **kwargs)

    monkeypatch.setattr(trackio, "log", recorded_log)
    try:
        for unique, rows in ((False, 4), (True, 2)):
            completion_log = CompletionLog(str(tmp_path / str(unique)), capacity=4, unique_prompts=unique)
            completion_log.record(prompts, ["w", "x", "y", "z"], {"r": [1.0, 2.0, 3.0, 4.0]}, [0.5, -0.5, 0.5, -0.5],
                                  {})
            completion_log.write(7, [trackio])
            table = logged[-1]["completions"].data
            assert [row["completion"] for row in table] == (["w", "y"] if unique else ["w", "x", "y", "z"])
            assert len(table) == rows
            assert len(pandas.read_parquet(tmp_path / str(unique) / "completions_00007.parquet")) == 4
    finally:
        trackio.finish()
    completion_log.record(["c"] * 4, ["1", "2", "3", "4"], {"r": [0.0] * 4}, None, {"note": ["n"] * 4})
    assert completion_log.columns(8)["completion"] == ["1", "2", "3", "4"]  # the oldest rows dropped out
    assert list(completion_log.columns(8)) == ["step", "prompt", "completion", "r", "note"]


def test_a_real_wandb_run_takes_the_completions_table(tmp_path, monkeypatch):
    """The real W&B client, offline: a table is logged only once a run is started, and the run gets it."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert active_trackers(["wandb"]) == []  # no run yet
    run = wandb.init(project="hf_align-test", dir=str(tmp_path))
    try:
        assert active_trackers(["wandb"]) == [wandb]
        log = CompletionLog(str(tmp_path / "completions"), capacity=4)
        log.record(["p"] * 2, ["x", "y"], {"r": [1.0, 0.0]}, [0.5, -0.5], {})
        log.write(3, active_trackers(["wandb"]))
        assert "completions" in dict(run.summary)
    finally:
        run.finish()


HUB_CHILD = '''
import os, sys
import torch
torch.set_num_threads(1)
from datasets import Dataset
from hf_align import GRPOConfig, GRPOTrainer

model_path, out = sys.argv[1], sys.argv[2]
args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=2, max_steps=2, logging_steps=1,
                  max_completion_length=4, report_to="none", save_strategy="no", disable_tqdm=True, bf16=False,
                  log_completions=True, log_completions_hub_repo="me/tiny-completions")
dataset = Dataset.from_dict({"prompt": ["one", "two", "three", "four"]})
trainer = GRPOTrainer(model_path, lambda completions, **kw: [float(len(c)) for c in completions], args=args,
                      train_dataset=dataset)
trainer.train()
os._exit(0)  # skips the scheduler's push at interpreter exit: what is on the Hub now was pushed by training's end
'''


def test_completions_are_pushed_to_the_hub_dataset_repo(tiny_model_path, tmp_path):
    child = tmp_path / "hub_child.py"
    child.write_text(textwrap.dedent(HUB_CHILD))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    with HubServer() as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_fake",
                   OMP_NUM_THREADS="1", TQDM_DISABLE="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
        result = subprocess.run([sys.executable, str(child), tiny_model_path, str(out)], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    assert not hub.errors and "me/tiny-completions" in hub.repos
    assert ("POST", "/api/repos/create", "Bearer hf_fake") in hub.requests
    pushed = hub.files["me/tiny-completions"]
    local = {path.name: path.read_bytes() for path in (out / "completions").iterdir()}
    assert sorted(pushed) == sorted(local) == ["completions_00001.parquet", "completions_00002.parquet"]
    assert pushed == local  # the files as they were at the end of training, pushed before the process ended
    assert any(commit["repo_id"] == "me/tiny-completions" for commit in hub.commits)


# ------------------------------------------------------------------------------------------- continuous batching


def test_continuous_batching_greedy_equals_generate(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = ["hello there", "what is two plus two?", "a b c d e f g", "why"]
    greedy = dict(max_new_tokens=8, temperature=0, num_generations=2, batch_size=3)
    plain = generate_completions(model, tokenizer, prompts, SamplingConfig(**greedy))
    # Make a token the first prompt's greedy completion reaches a stop token, so that rows end at different lengths.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, int(plain.completion_ids[0, 2])]
    plain = generate_completions(model, tokenizer, prompts, SamplingConfig(**greedy))
    model.generate = None  # continuous batching runs `generate_batch`, never `generate`
    continuous = generate_completions(model, tokenizer, prompts, SamplingConfig(
        **greedy, continuous_batching=True, continuous_batching_config=SMALL_CACHE))
    assert len(set(plain.lengths.tolist())) > 1 and plain.lengths.max() == 8
    assert continuous.prompt_ids == plain.prompt_ids and continuous.texts == plain.texts
    assert torch.equal(continuous.completion_ids, plain.completion_ids)
    assert torch.equal(continuous.completion_mask, plain.completion_mask)
    assert model.config._attn_implementation == "sdpa" and not model.training


def test_continuous_batching_samples_and_trains(tmp_path, tiny_model_path, sampled, monkeypatch):
    monkeypatch.setattr(hf_align.generation, "_generate_in_batches", None)  # `generate` is not the engine
    args = GRPOConfig(**_settings(tmp_path, use_transformers_continuous_batching=True, temperature=0.9, top_k=50,
                                  top_p=0.95, min_p=0.01, transformers_continuous_batching_config=json.dumps(SMALL_CACHE)))
    assert args.transformers_continuous_batching_config == SMALL_CACHE
    trainer = GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=_prompts())
    trainer.train()
    assert len(sampled) == 2 and all(sampling.continuous_batching for sampling, _ in sampled)
    stop_ids = torch.tensor(stop_token_ids(trainer.model, trainer.tokenizer))
    for _, completions in sampled:
        mask, ids = completions.completion_mask, completions.completion_ids
        assert ids.shape == mask.shape and ids.size(0) == 4 and ids.size(1) <= 6
        lengths = mask.sum(-1)
        assert torch.equal(mask, (torch.arange(ids.size(1)) < lengths[:, None]).long())  # ones, then zeros
        for row, length in zip(ids, lengths):
            assert not torch.isin(row[: length - 1], stop_ids).any()  # nothing after a stop token
            assert (row[length:] == trainer.tokenizer.pad_token_id).all()
    assert len(set(completions.texts)) > 1  # sampled, not greedy
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)


def test_continuous_batching_refuses_what_it_cannot_honour(tmp_path):
    base = dict(output_dir=str(tmp_path), use_transformers_continuous_batching=True, **QUIET)
    with pytest.raises(ValueError, match=r"cannot honour \['repetition_penalty'\]"):
        GRPOConfig(**base, repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"cannot honour \['no_repeat_ngram_size'\]"):
        RLOOConfig(**base, generation_kwargs={"no_repeat_ngram_size": 2})
    with pytest.raises(ValueError, match=r"cannot honour \['cache_implementation'\]"):
        GRPOConfig(**base, cache_implementation="static")
    with pytest.raises(ValueError, match="not a set of ContinuousBatchingConfig arguments"):
        GRPOConfig(**base, transformers_continuous_batching_config={"page_sise": 16})
    with pytest.raises(ValueError, match="needs continuous_batching=True"):
        GRPOConfig(output_dir=str(tmp_path), transformers_continuous_batching_config=SMALL_CACHE, **QUIET)
    GRPOConfig(**base, generation_kwargs={"suppress_tokens": [5]}, min_p=0.1)  # scores-only options are honoured
    with pytest.warns(FutureWarning, match="use_transformers_paged is deprecated"):
        config = GRPOConfig(output_dir=str(tmp_path), use_transformers_paged=True, **QUIET)
    assert config.use_transformers_continuous_batching and config.sampling(4).continuous_batching
