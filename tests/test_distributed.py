"""`hf_align.distributed`: frozen models and generation under each accelerate backend, and GRPO under real 2-process
DDP.

DeepSpeed itself runs in `test_deepspeed.py` (real ZeRO-2 / ZeRO-3 launches); here only the inference config it is
given is checked, from accelerate's real `DeepSpeedPlugin`. FSDP cannot be selected through accelerate on a CPU
(with ACCELERATE_USE_CPU=1 the FSDP config runs as plain DDP), so FSDP v1 generation runs on torch's own
FullyShardedDataParallel over gloo. The plain path and DDP run for real.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from test_reinforce import launch_two_processes
from transformers import AutoModelForSequenceClassification

from hf_align import distributed, generation
from hf_align.logprobs import completion_logprobs
from hf_align.rewards import RewardScorer

TRAINING_CONFIG = {
    "train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
    "bf16": {"enabled": True}, "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "scheduler": {"type": "WarmupLR"},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "none"},
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 1000,
                          "stage3_gather_16bit_weights_on_model_save": True},
}


def deepspeed_training_config(stage: int) -> dict:
    """The DeepSpeed config accelerate's real `DeepSpeedPlugin` holds for `TRAINING_CONFIG` at ZeRO-`stage`: what
    hf_align reads as `accelerator.state.deepspeed_plugin.deepspeed_config`."""
    from accelerate.utils import DeepSpeedPlugin

    config = json.loads(json.dumps(TRAINING_CONFIG))
    config["zero_optimization"]["stage"] = stage
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    assert plugin.zero_stage == stage
    return plugin.deepspeed_config


# ------------------------------------------------------------------------------------------------ DeepSpeed configs

def test_zero3_inference_config_keeps_partitioning_and_drops_training_state(tiny_model):
    hidden = tiny_model.config.hidden_size
    config = distributed.inference_deepspeed_config(deepspeed_training_config(3), tiny_model)
    assert "optimizer" not in config and "scheduler" not in config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero and zero["offload_param"] == {"device": "none"}
    # "auto" sized from the hidden size; a size the run set is kept; the rest as the run has it
    assert zero["reduce_bucket_size"] == hidden * hidden and zero["stage3_param_persistence_threshold"] == 10 * hidden
    assert zero["stage3_prefetch_bucket_size"] == 1000 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 2, 4)
    assert config["bf16"] == {"enabled": True}
    assert TRAINING_CONFIG["zero_optimization"]["reduce_bucket_size"] == "auto" and "optimizer" in TRAINING_CONFIG


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_below_3_inference_config_is_stage_0(stage, tiny_model):
    config = distributed.inference_deepspeed_config(deepspeed_training_config(stage), tiny_model)
    assert config["zero_optimization"] == {"stage": 0}
    assert "optimizer" not in config and "scheduler" not in config
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["bf16"] == {"enabled": True}


# ----------------------------------------------------------------------------------------------- frozen models

def test_plain_frozen_model_is_frozen_on_the_device(tiny_model):
    accelerator = Accelerator(cpu=True)
    prepared = distributed.prepare_frozen_model(accelerator, tiny_model)
    assert prepared is tiny_model and not prepared.training
    assert all(not p.requires_grad and p.device == accelerator.device for p in prepared.parameters())


def test_reward_models_are_scored_through_the_prepared_module(tiny_seqcls_path):
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_seqcls_path)
    calls = []

    class Placed(torch.nn.Module):  # what a DeepSpeed / FSDP wrapper is to the scorer: a module holding the model
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.device = torch.device("cpu")

        def forward(self, **inputs):
            calls.append(inputs["input_ids"].shape)
            return self.module(**inputs)

    scorer = RewardScorer(reward_model, prepare_model=Placed)
    expected = RewardScorer(AutoModelForSequenceClassification.from_pretrained(tiny_seqcls_path))
    args = (["Question: 1 + 1?", "Hi"], [" 2", " there"], [[0], [0]])
    torch.testing.assert_close(scorer.score(*args), expected.score(*args))
    assert len(calls) == 1 and scorer.reward_funcs == [reward_model] and scorer.names == expected.names


# --------------------------------------------------------------------------------------------------- generation

def test_plain_generation_unwraps_the_policy(tiny_model):
    wrapped = torch.nn.Module()
    wrapped.module = tiny_model  # a DDP-like wrapper
    with distributed.gathered_for_generation(Accelerator(cpu=True), wrapped) as generator:
        assert generator is tiny_model


# Ends a two-process script once both ranks have written their results (a barrier), without the process group's and
# the interpreter's teardown: in CI a rank once aborted there ("terminate called without an active exception").
END_WITHOUT_TEARDOWN = """
import os
dist.barrier()
os._exit(0)
"""

FSDP_SCRIPT = """
import functools, json, sys
from types import SimpleNamespace
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from accelerate.utils import DistributedType
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from hf_align import distributed, generation
from hf_align.logprobs import completion_logprobs

dist.init_process_group("gloo")
model_path, out = sys.argv[1:3]
tokenizer = AutoTokenizer.from_pretrained(model_path)
policy = FullyShardedDataParallel(
    AutoModelForCausalLM.from_pretrained(model_path), device_id=torch.device("cpu"), use_orig_params=True,
    auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}))
# The two attributes of accelerate's Accelerator that `gathered_for_generation` reads (FSDP cannot be selected on a CPU).
accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
prompts, sampling = json.loads(sys.argv[3]), generation.SamplingConfig(max_new_tokens=6, temperature=0)
with distributed.gathered_for_generation(accelerator, policy) as generator:
    texts = generation.generate_completions(generator, tokenizer, prompts, sampling).texts
try:  # without the root's parameters summoned
    generation.generate_completions(policy.module, tokenizer, prompts, sampling)
    unsummoned = "ran"
except RuntimeError as error:
    unsummoned = str(error)
with open(f"{out}/rank{dist.get_rank()}.json", "w") as file:
    json.dump({"texts": texts, "unsummoned": unsummoned, "local": sum(p.numel() for p in policy.parameters())}, file)
""" + END_WITHOUT_TEARDOWN


def test_slow_fsdp_v1_generation_summons_the_root_parameters(tiny_model_path, tiny_model, tiny_tokenizer, tmp_path):
    """Two CPU processes over gloo, each holding half of a FULL_SHARD policy (decoder layers wrapped one by one):
    greedy completions generated inside `gathered_for_generation` are the unsharded model's."""
    prompts = ["Question: What is 2 + 2?\nAnswer:", "Hello"]
    launch_two_processes(FSDP_SCRIPT, tmp_path, tiny_model_path, tmp_path, json.dumps(prompts))
    expected = generation.generate_completions(tiny_model, tiny_tokenizer, prompts,
                                               generation.SamplingConfig(max_new_tokens=6, temperature=0)).texts
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = sum(p.numel() for p in tiny_model.parameters())
    for rank in ranks:
        assert rank["local"] < full  # sharded
        assert rank["texts"] == expected
        assert rank["unsummoned"] != "ran"


FSDP_LOGPROBS_SCRIPT = """
import functools, json, sys
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from hf_align.logprobs import completion_logprobs

dist.init_process_group("gloo")
model_path, out = sys.argv[1:3]
policy = FullyShardedDataParallel(
    AutoModelForCausalLM.from_pretrained(model_path), device_id=torch.device("cpu"), use_orig_params=True,
    auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}))
batch = json.loads(sys.argv[3])
logps = completion_logprobs(policy, *(torch.tensor(batch[key]) for key in ("input_ids", "attention_mask", "mask")))
(logps.token_logps * logps.mask).sum().backward()
grad_norm = policy.clip_grad_norm_(1e9)
with open(f"{out}/rank{dist.get_rank()}.json", "w") as file:
    json.dump({"sums": logps.sum.tolist(), "grad_norm": float(grad_norm)}, file)
""" + END_WITHOUT_TEARDOWN


def test_slow_fsdp_v1_log_probs_and_gradients_are_the_unsharded_models(tiny_model_path, tiny_model, tmp_path):
    """The LM head runs inside the model's forward (`logprobs.scored_forward`), where FSDP holds the root's parameters
    gathered: completion log-probs of a FULL_SHARD policy and the gradient norm they give are the unsharded model's."""
    batch = {"input_ids": [[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]], "attention_mask": [[1] * 5, [1, 1, 1, 0, 0]],
             "mask": [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]}
    launch_two_processes(FSDP_LOGPROBS_SCRIPT, tmp_path, tiny_model_path, tmp_path, json.dumps(batch))
    expected = completion_logprobs(tiny_model, *(torch.tensor(batch[key]) for key in ("input_ids", "attention_mask",
                                                                                      "mask")))
    (expected.token_logps * expected.mask).sum().backward()
    grad_norm = torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None]).norm()
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["sums"] == pytest.approx(expected.sum.tolist(), rel=1e-5)
        assert result["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-4)


# ---------------------------------------------------------------------------------------------- 2-process DDP

DDP_SCRIPT = """
import hashlib, json, sys
import torch
torch.set_num_threads(1)
from accelerate.utils import gather
from datasets import Dataset
from hf_align import models
from hf_align.trainers.grpo import GRPOConfig, GRPOTrainer

model_path, reward_model_path, rows_path, out = sys.argv[1:5]
local = []

def length_reward(completions, completion_ids, **kwargs):
    local.append({"ids": [list(ids) for ids in completion_ids], "rewards": [float(len(ids)) for ids in completion_ids]})
    return local[-1]["rewards"]

gathered = []
original = GRPOTrainer.estimate
def estimate(self, rollout):
    gathered.append(gather(rollout.rewards_per_func).tolist())
    return original(self, rollout)
GRPOTrainer.estimate = estimate

def weights_hash(model):
    digest = hashlib.sha256()
    for name, tensor in sorted(models.unwrap_causal_lm(model).state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()

args = GRPOConfig(output_dir=out, per_device_train_batch_size=2, num_generations=4, max_completion_length=6, beta=0.1,
                  learning_rate=1e-2, max_steps=2, logging_steps=1, report_to="none", save_strategy="no",
                  disable_tqdm=True)
trainer = GRPOTrainer(model_path, [length_reward, reward_model_path], args=args,
                      train_dataset=Dataset.from_list(json.load(open(rows_path))))
initial = weights_hash(trainer.model)
trainer.train()
rank = trainer.accelerator.process_index
json.dump({"world": trainer.accelerator.num_processes, "wrapper": type(trainer.model_wrapped).__name__,
           "local": local, "gathered": gathered, "initial": initial, "final": weights_hash(trainer.model),
           "log": trainer.state.log_history}, open(f"{out}/rank{rank}.json", "w"))
"""


def test_slow_ddp_grpo_gathers_both_processes_rollouts(tiny_model_path, tiny_seqcls_path, embedded_data, tmp_path):
    """GRPO with a reference (beta > 0), a reward function and a reward model, 2 steps over 2 CPU processes: each step's
    group of 4 completions is split between the processes (2 each), both score the same gathered rewards, in process
    order; the processes sample their halves independently; both end with the same trained weights."""
    (tmp_path / "rows.json").write_text(json.dumps(embedded_data("prompts", 4).to_list()))
    launch_two_processes(DDP_SCRIPT, tmp_path, tiny_model_path, tiny_seqcls_path, tmp_path / "rows.json", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and {r["wrapper"] for r in ranks} == {"DistributedDataParallel"}
    assert ranks[0]["gathered"] == ranks[1]["gathered"] and len(ranks[0]["gathered"]) == 2
    for step, gathered in enumerate(ranks[0]["gathered"]):
        assert len(gathered) == 4  # one group of num_generations = 4
        lengths = [row[0] for row in gathered]
        assert lengths == ranks[0]["local"][step]["rewards"] + ranks[1]["local"][step]["rewards"]
        # the same prompt on both processes, sampled independently (each process seeds its own generator)
        assert ranks[0]["local"][step]["ids"] != ranks[1]["local"][step]["ids"]
        logged = next(entry for entry in ranks[0]["log"] if entry.get("step") == step + 1 and "reward" in entry)
        assert logged["reward"] == pytest.approx(sum(row[0] + row[1] for row in gathered) / 4, rel=1e-4)
    assert ranks[0]["final"] == ranks[1]["final"] != ranks[0]["initial"] == ranks[1]["initial"]
