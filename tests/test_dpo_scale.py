"""DPO beyond a single full-precision process: LoRA, QLoRA (4-bit on CPU), real 2-process DDP, push_to_hub against a
loopback Hub, and the example script.

Everything runs on the CPU with the embedded tiny model (`tiny_model_path` from conftest.py, or the embedded default
"hf-align/tiny-chat" for the example script). The multi-process test is `test_slow_ddp_two_processes_...`; the
subprocesses run with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from hf_align import DPOConfig, DPOTrainer  # noqa: E402
from hf_align.logprobs import completion_logprobs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "dpo.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer  # noqa: E402

FAKE_TOKEN = "hf_fAkEtOkEnDpoScaleTest0123456789abcd"


# ------------------------------------------------------------------------------------------------------- helpers


def _child_env(**extra) -> dict:
    """Environment of a subprocess: one thread, no progress bars, hf_align importable, $HF_ALIGN_HOME inherited."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


def _run(cmd, env, timeout, cwd=REPO) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-6000:]}"
    )
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _logged(trainer, key) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _batch(trainer, n=4):
    rows = [trainer.train_dataset[i] for i in range(n)]
    return trainer.data_collator(rows)


def _logps(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum


def _lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **kwargs})


def _args(output_dir, **kwargs) -> DPOConfig:
    base = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=5,
        report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
    )
    return DPOConfig(**{**base, **kwargs})


# ------------------------------------------------------------------------------------------------------------- 1


def test_lora_dpo_trains_adapter_against_disabled_adapter_reference(tiny_model_path, preference_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    trainer = DPOTrainer(
        tiny_model_path, args=_args(tmp_path / "run", max_steps=20), train_dataset=preference_data(n=80),
        peft_config=_lora(),
    )
    assert isinstance(trainer.model, PeftModel)
    assert trainer.ref_model is None  # the reference is the policy with its adapter disabled: no second copy
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    batch = _batch(trainer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    base_logps = _logps(base, batch)

    trainer.train()

    losses, margins = _logged(trainer, "loss"), _logged(trainer, "rewards/margins")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    assert margins[-1] > margins[0], margins
    assert _logged(trainer, "rewards/accuracies")[-1] >= 0.75

    # Reference log-probs (adapter disabled) are the base model's, although the adapter has moved the policy.
    reference = trainer.reference_logps(batch)
    ref_logps = torch.cat([reference["ref_chosen_logps"], reference["ref_rejected_logps"]])
    torch.testing.assert_close(ref_logps, base_logps, rtol=1e-5, atol=1e-4)
    trained_logps = _logps(trainer.model, batch)
    assert (trained_logps - base_logps).abs().max() > 0.1
    # ...and disabling the adapter left it enabled again afterwards.
    torch.testing.assert_close(_logps(trainer.model, batch), trained_logps)

    # save_model writes the adapter only.
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files, files
    assert not files & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}, files
    full_size = (Path(tiny_model_path) / "model.safetensors").stat().st_size
    assert (out / "adapter_model.safetensors").stat().st_size < 0.5 * full_size
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # The saved adapter on a fresh base gives the trained log-probs.
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh_base, str(out))
    torch.testing.assert_close(_logps(reloaded, batch), trained_logps, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------- 2


def test_qlora_4bit_on_cpu_trains(tiny_model_path, preference_data, tmp_path):
    try:
        import bitsandbytes as bnb
    except Exception as error:  # noqa: BLE001 - any import failure means bitsandbytes cannot run here
        pytest.skip(f"bitsandbytes cannot be imported here: {type(error).__name__}: {error}")
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    torch.manual_seed(0)
    trainer = DPOTrainer(
        tiny_model_path, args=_args(tmp_path / "run", max_steps=10, logging_steps=2),
        train_dataset=preference_data(n=40),
        quantization_config=quantization, peft_config=_lora(),
    )
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit
    quantized = {name: m for name, m in trainer.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized, "no bitsandbytes Linear4bit layer in the model"
    layer = next(iter(quantized.values()))
    assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.device.type == "cpu" and layer.weight.dtype == torch.uint8
    assert layer.compute_dtype == torch.float32
    assert all(not m.weight.requires_grad for m in quantized.values())
    assert trainer.ref_model is None

    trainer.train()

    losses = _logged(trainer, "loss")
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.05, losses
    assert _logged(trainer, "rewards/margins")[-1] > _logged(trainer, "rewards/margins")[0]


# ------------------------------------------------------------------------------------------------------------- 3

# Runs an example script (argv[2:]) under `accelerate launch` exactly as `python script ...` would, with probes: each
# rank writes `rank{N}.json` to argv[1]: its world size, backend, model wrapper, the hash of its weights before and
# after training, and the per-example values it passed to `record_metric` (before they are gathered); rank 0 adds
# `log_history`.
DDP_PROBE = r'''
import hashlib, json, os, runpy, sys
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from hf_align import DPOTrainer, defaults, models, scripts

report_dir, script = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
local = []

def weights_hash(trainer):
    digest = hashlib.sha256()
    for name, tensor in sorted(models.unwrap_causal_lm(trainer.model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

original_record = DPOTrainer.record_metric
def record_metric(self, name, values, *args, **kwargs):
    if self.mode == "train":
        values_list = values.detach().float().reshape(-1).tolist()
        local.append({"step": self.state.global_step + 1, "name": name, "values": values_list})
    return original_record(self, name, values, *args, **kwargs)
DPOTrainer.record_metric = record_metric

original_tokens = DPOTrainer.record_tokens
def record_tokens(self, attention_mask):
    if self.mode == "train":
        local.append({"step": self.state.global_step + 1, "name": "tokens", "values": [float(attention_mask.sum())]})
    return original_tokens(self, attention_mask)
DPOTrainer.record_tokens = record_tokens

original_train = DPOTrainer.train
def train(self, *args, **kwargs):
    self._probe_initial_hash = weights_hash(self)
    return original_train(self, *args, **kwargs)
DPOTrainer.train = train

original_run = scripts.run
def run(*args, **kwargs):
    trainer = original_run(*args, **kwargs)
    rank = trainer.accelerator.process_index
    # Every rank can build the tiny model (transformers >= 5 writes weights from rank 0 of a torch.distributed
    # group only, unless told otherwise): what DDP ranks racing to fill the default-model cache rely on.
    built = sorted(os.listdir(defaults.build_tiny_model(os.path.join(report_dir, f"build-rank{rank}"))))
    report = {
        "built": built,
        "rank": rank, "pid": os.getpid(), "num_processes": trainer.accelerator.num_processes,
        "dist_initialized": dist.is_initialized(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "wrapper": type(trainer.model_wrapped).__name__,
        "initial_hash": trainer._probe_initial_hash, "final_hash": weights_hash(trainer),
        "global_step": trainer.state.global_step, "local": local,
        "log_history": trainer.state.log_history if rank == 0 else None,
    }
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    return trainer
scripts.run = run

runpy.run_path(script, run_name="__main__")
# The example's run ended its process group (`run_recipe`), not left to interpreter exit.
with open(os.path.join(report_dir, f"rank{os.environ['RANK']}-exit.json"), "w") as f:
    json.dump({"dist_initialized": dist.is_initialized()}, f)
'''


def _window_means(local_by_rank, name, steps):
    """Per logging window (steps in `steps`), the mean over steps of the per-step mean of `name` over both ranks'
    examples (what a gathered metric logs), and the same from rank 0's examples alone."""
    combined, rank0 = [], []
    for window in steps:
        per_step_all, per_step_rank0 = [], []
        for step in window:
            values = [
                [v for rec in local if rec["name"] == name and rec["step"] == step for v in rec["values"]]
                for local in local_by_rank
            ]
            assert all(values), f"no local {name} at step {step}"
            merged = [v for rank_values in values for v in rank_values]
            per_step_all.append(sum(merged) / len(merged))
            per_step_rank0.append(sum(values[0]) / len(values[0]))
        combined.append(sum(per_step_all) / len(per_step_all))
        rank0.append(sum(per_step_rank0) / len(per_step_rank0))
    return combined, rank0


def test_slow_ddp_two_processes_example_dpo_in_sync_with_gathered_metrics(tmp_path):
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/dpo.py` (the embedded default):
    real DDP over gloo, both ranks end with identical (trained) weights, logged metrics average both ranks."""
    probe = tmp_path / "ddp_probe.py"
    probe.write_text(textwrap.dedent(DDP_PROBE))
    reports, out = tmp_path / "reports", tmp_path / "out"
    reports.mkdir()
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(probe), str(reports), str(EXAMPLE),
        "--max_steps", "6", "--logging_steps", "2", "--output_dir", str(out),
    ]
    result = _run(cmd, _child_env(ACCELERATE_USE_CPU="1"), timeout=400)

    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Two processes, one DDP group of two over gloo.
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    for r in ranks:
        assert r["num_processes"] == 2 and r["world_size"] == 2 and r["dist_initialized"], r
        assert r["backend"] == "gloo" and r["wrapper"] == "DistributedDataParallel", r
        assert r["global_step"] == 6
    for r in ranks:  # the default-model cache is filled by whichever rank finishes first: each must build it whole
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(r["built"]), r["built"]
    # Same start, weights changed by training, and identical on both ranks afterwards (gradients all-reduced).
    assert ranks[0]["initial_hash"] == ranks[1]["initial_hash"]
    assert ranks[0]["final_hash"] != ranks[0]["initial_hash"]
    assert ranks[0]["final_hash"] == ranks[1]["final_hash"]
    # Each rank's process group was ended by the run, before the interpreter's exit.
    assert [json.loads((reports / f"rank{r}-exit.json").read_text()) for r in (0, 1)] == [
        {"dist_initialized": False}] * 2

    # Each rank trained on its own shard of every batch (per_device_train_batch_size=8 from the example's defaults).
    local_by_rank = [r["local"] for r in ranks]
    logps = [
        next(rec["values"] for rec in local if rec["name"] == "logps/chosen" and rec["step"] == 1)
        for local in local_by_rank
    ]
    assert len(logps[0]) == len(logps[1]) == 8 and logps[0] != logps[1]

    # Logged metrics = means over both ranks' examples (not rank 0's alone).
    history = ranks[0]["log_history"]
    logs = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4, 6]
    assert logs[0]["epoch"] == pytest.approx(2 * 16 / 400)  # 400 pairs, 16 per step across two ranks
    windows = [range(entry["step"] - 1, entry["step"] + 1) for entry in logs]
    for name in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen"):
        combined, rank0_only = _window_means(local_by_rank, name, windows)
        logged = [entry[name] for entry in logs]
        assert logged == pytest.approx(combined, rel=1e-5, abs=1e-6), (name, logged, combined, rank0_only)
        if name != "rewards/accuracies":  # accuracies can saturate at 1.0 on both ranks
            assert logged != pytest.approx(rank0_only, rel=1e-5, abs=1e-6), name
    # num_tokens counts both ranks' tokens.
    tokens = [sum(rec["values"][0] for rec in local if rec["name"] == "tokens") for local in local_by_rank]
    assert logs[-1]["num_tokens"] == sum(tokens) and min(tokens) > 0

    # Rank 0 alone wrote the example's outputs.
    for name in ("model.safetensors", "config.json", "README.md", "training_metrics.png", "tokenizer.json"):
        assert (out / name).is_file(), (name, sorted(os.listdir(out)), result.stdout[-2000:])


# ------------------------------------------------------------------------------------------------------------- 4

PUSH_CHILD = r'''
import json, os, sys
import torch
torch.set_num_threads(1)
from hf_align import DPOConfig, DPOTrainer
from hf_align.defaults import load_default_dataset

model_path, out, token = sys.argv[1:4]
args = DPOConfig(
    output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=5e-4, logging_steps=2,
    report_to="none", disable_tqdm=True, save_strategy="steps", save_steps=2,
    push_to_hub=True, hub_model_id="me/tiny-dpo", hub_token=token,
)
trainer = DPOTrainer(model_path, args=args, train_dataset=load_default_dataset("preference").select(range(16)))
trainer.train()
commit = trainer.push_to_hub()
print("PUSHED", json.dumps({"hub_model_id": trainer.hub_model_id, "commit_url": commit.commit_url}))
'''


def test_push_to_hub_to_loopback_hub_uploads_model_tokenizer_card_and_no_token(tiny_model_path, tmp_path):
    """DPO with `push_to_hub=True, hub_model_id="me/tiny-dpo"` (a checkpoint push mid-training, then
    `trainer.push_to_hub()`), run in a subprocess whose HF_ENDPOINT is the loopback hub and whose HF_TOKEN and
    `hub_token` are a fake token."""
    from huggingface_hub import ModelCard
    from safetensors.torch import load as load_safetensors

    child = tmp_path / "push_child.py"
    child.write_text(textwrap.dedent(PUSH_CHILD))
    out = tmp_path / "out"
    with HubServer() as hub:
        env = _child_env(
            HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_TOKEN, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
            NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        )
        result = _run([sys.executable, str(child), tiny_model_path, str(out), FAKE_TOKEN], env, timeout=240)
    pushed = json.loads(result.stdout.split("PUSHED", 1)[1].strip().splitlines()[0])
    assert pushed["hub_model_id"] == "me/tiny-dpo" and pushed["commit_url"].startswith(hub.url)

    assert not hub.errors, hub.errors
    # Every call of the push is one the stand-in serves as the Hub does; bitsandbytes' kernel lookup (it falls back
    # when that fails, as offline) is the only other request.
    assert all("/kernels-community/" in path for _, path in hub.unhandled), hub.unhandled
    assert "me/tiny-dpo" in hub.repos
    authorized = [auth for method, path, auth in hub.requests if path.startswith("/api/repos") or "/commit/" in path]
    assert authorized and all(auth == f"Bearer {FAKE_TOKEN}" for auth in authorized)  # the token authenticated
    assert hub.commits[-1]["summary"] == "End of training" and hub.commits[-1]["repo_id"] == "me/tiny-dpo"
    assert any(c["summary"].startswith("Training in progress") for c in hub.commits)  # the checkpoint push

    files = hub.files["me/tiny-dpo"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert name in files, (name, sorted(files))
    assert not any(path.startswith("checkpoint-") for path in files)
    # The weights pushed last are the final ones saved in output_dir, and load.
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "model.embed_tokens.weight" in load_safetensors(files["model.safetensors"])
    assert json.loads(files["config.json"])["model_type"] == "llama"

    card = ModelCard(files["README.md"].decode())
    assert {"hf_align", "dpo"} <= set(card.data.tags), card.data.tags
    assert "2305.18290" in card.text and "DPOTrainer" in card.text

    # The token is in no uploaded file (training_args.bin included) and in nothing saved locally either.
    needle = FAKE_TOKEN.encode()
    assert not [path for path, content in files.items() if needle in content]
    for commit in hub.commits:
        assert not [path for path, content in commit["files"].items() if needle in content], commit["summary"]
    assert not [str(p) for p in out.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert "training_args.bin" in files
    saved_args = torch.load(io.BytesIO(files["training_args.bin"]), weights_only=False)
    assert isinstance(saved_args, DPOConfig) and saved_args.hub_model_id == "me/tiny-dpo"
    assert saved_args.hub_token is None


def test_config_pickles_without_hub_token_but_copies_keep_it():
    import copy
    import pickle

    args = DPOConfig(output_dir="unused", hub_token=FAKE_TOKEN, beta=0.25, report_to="none")
    restored = pickle.loads(pickle.dumps(args))
    assert restored.hub_token is None and restored.beta == 0.25 and isinstance(restored, DPOConfig)
    assert FAKE_TOKEN not in str(args) and FAKE_TOKEN not in json.dumps(args.to_dict())
    assert copy.deepcopy(args).hub_token == FAKE_TOKEN and copy.copy(args).hub_token == FAKE_TOKEN
    assert args.hub_token == FAKE_TOKEN


# ------------------------------------------------------------------------------------------------------------- 5


def test_example_script_full_and_peft(tmp_path):
    """`python examples/dpo.py` with no model or dataset trains the embedded default; `--use_peft` saves an adapter."""
    from huggingface_hub import ModelCard

    env = _child_env()
    full, adapter = tmp_path / "full", tmp_path / "peft"
    _run([sys.executable, str(EXAMPLE), "--output_dir", str(full), "--max_steps", "10"], env, timeout=240)
    files = set(os.listdir(full))
    assert {"model.safetensors", "config.json", "README.md", "training_metrics.png", "tokenizer.json"} <= files, files
    assert (full / "training_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard((full / "README.md").read_text())
    assert {"hf_align", "dpo"} <= set(card.data.tags) and "2305.18290" in card.text

    cmd = [sys.executable, str(EXAMPLE), "--use_peft", "--max_steps", "5", "--output_dir", str(adapter)]
    _run(cmd, env, timeout=240)
    files = set(os.listdir(adapter))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files, files
    assert "model.safetensors" not in files
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
