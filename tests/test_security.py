"""Security properties: no remote code unless asked for, weights saved as safetensors, nothing in the package unpickles
data, and a Hub token never reaches a file, a log, a model card or a saved config.

The Hub test runs a short SFT training in a subprocess whose `HF_ENDPOINT` is the loopback hub of `hub_server.py`
(huggingface_hub reads it at import time), with every logger at DEBUG, then scans everything the run left behind."""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hf_align import DPOConfig, DPOTrainer, PPOConfig, PPOTrainer, SFTConfig, SFTTrainer
from hf_align.rewards import RewardScorer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer  # noqa: E402

QUIET = dict(report_to="none", disable_tqdm=True, logging_steps=1, seed=0)
TOKEN = "hf_secretSecurityTest0123456789abcdefGH"


# ------------------------------------------------------------------------------------------------- remote code


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Every `from_pretrained` call of the Auto classes hf_align loads with: `(class name, keyword arguments)`."""
    calls = []
    for auto_class in (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer):
        original = auto_class.from_pretrained

        def spy(*args, _original=original, _name=auto_class.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", spy)
    return calls


def test_remote_code_is_off_unless_set(from_pretrained_calls, tiny_model_path, tiny_seqcls_path, preference_data,
                                       tmp_path):
    # Policy, tokenizer and reference model from paths; a reward model and its tokenizer from a path.
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, **QUIET)
    DPOTrainer(tiny_model_path, ref_model=tiny_model_path, args=args, train_dataset=preference_data("preference", 4))
    RewardScorer(tiny_seqcls_path)
    loaded = {name for name, _ in from_pretrained_calls}
    assert loaded == {"AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoTokenizer"}
    assert len(from_pretrained_calls) == 5
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in from_pretrained_calls)
    assert all(kwargs["use_safetensors"] is True for name, kwargs in from_pretrained_calls if name != "AutoTokenizer")

    from_pretrained_calls.clear()
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, trust_remote_code=True, **QUIET)
    DPOTrainer(tiny_model_path, args=args, train_dataset=preference_data("preference", 4))
    assert [kwargs["trust_remote_code"] for _, kwargs in from_pretrained_calls] == [True, True]


# ------------------------------------------------------------------------------------------------- safetensors

# What `Trainer` itself pickles next to the weights (none of them holds the model; it loads them with
# weights_only=True, except training_args.bin, which it never loads).
TRAINER_PICKLES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}


def _pickle_files(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")}


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_models_and_checkpoints_are_saved_as_safetensors(peft, tiny_model_path, embedded_data, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if peft else None
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, save_strategy="steps",
                     save_steps=2, **QUIET)
    trainer = SFTTrainer(tiny_model_path, args=args, train_dataset=embedded_data("sft", 8), peft_config=lora)
    trainer.train()
    trainer.save_model()
    weights = "adapter_model.safetensors" if peft else "model.safetensors"
    for folder in (tmp_path, tmp_path / "checkpoint-2"):
        saved = load_file(folder / weights)
        assert any("lora_A" in key for key in saved) if peft else "model.embed_tokens.weight" in saved
    assert _pickle_files(tmp_path) <= TRAINER_PICKLES, _pickle_files(tmp_path)


def test_ppo_saves_the_policy_as_safetensors(tiny_model_path, embedded_data, tmp_path):
    def length_reward(completion_ids, **kwargs):
        return [0.25 * len(ids) for ids in completion_ids]

    args = PPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                     max_completion_length=4, save_strategy="steps", save_steps=1, **QUIET)
    trainer = PPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=embedded_data("prompts", 8))
    trainer.train()
    trainer.save_model()
    assert "model.embed_tokens.weight" in load_file(tmp_path / "model.safetensors")
    # The critic, outside the model files, is saved in the checkpoint as safetensors too; the online trainers' rest of
    # a generation batch (tensors, read back with weights_only=True) is training state like the optimizer's.
    assert load_file(tmp_path / "checkpoint-1" / "ppo_critic.safetensors")
    assert _pickle_files(tmp_path) <= TRAINER_PICKLES | {"rollouts_0.pt"}, _pickle_files(tmp_path)


# ----------------------------------------------------------------------------------------------------- pickles

# Calls that unpickle: `(module alias, function)`; `torch.load` is allowed only with `weights_only=True`.
UNPICKLING = {("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"),
              ("cloudpickle", "loads"), ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
              ("marshal", "loads"), ("shelve", "open")}


def _unsafe_calls(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        call = (node.func.value.id, node.func.attr)
        keywords = {k.arg: k.value for k in node.keywords}
        weights_only = keywords.get("weights_only")
        if call in UNPICKLING or (
            call == ("torch", "load") and not (isinstance(weights_only, ast.Constant) and weights_only.value is True)
        ) or (call in (("np", "load"), ("numpy", "load")) and "allow_pickle" in keywords):
            found.append(f"line {node.lineno}: {call[0]}.{call[1]}")
    return found


def test_the_package_never_unpickles():
    assert _unsafe_calls("torch.load(path)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\n"
                         "torch.load(path, weights_only=False)") == ["line 1: torch.load", "line 2: pickle.loads",
                                                                     "line 3: np.load", "line 4: torch.load"]
    assert _unsafe_calls("torch.load(path, map_location='cpu', weights_only=True)\nnp.load(f)") == []
    offenders = {str(path.relative_to(REPO)): calls for path in sorted((REPO / "hf_align").rglob("*.py"))
                 if (calls := _unsafe_calls(path.read_text()))}
    assert not offenders


# ----------------------------------------------------------------------------------------------------- Hub token

HUB_CHILD = r'''
import json, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # every library's logger, at its most verbose
import torch
torch.set_num_threads(1)
import transformers
transformers.logging.set_verbosity_debug()
from hf_align import SFTConfig, SFTTrainer
from hf_align.defaults import load_default_dataset

model_path, out, token, history = sys.argv[1:5]
args = SFTConfig(
    output_dir=out, max_steps=2, per_device_train_batch_size=2, logging_steps=1, report_to="none", disable_tqdm=True,
    save_strategy="steps", save_steps=1, push_to_hub=True, hub_model_id="me/tiny-sft", hub_token=token or None,
)
print("ARGS", args, args.to_json_string(), args.to_sanitized_dict())  # what a user might print
trainer = SFTTrainer(model_path, args=args, train_dataset=load_default_dataset("sft").select(range(8)))
trainer.train()
trainer.create_model_card(model_name="tiny-sft", dataset_name="sft")
trainer.push_to_hub()
with open(history, "w") as file:
    json.dump(trainer.state.log_history, file)
'''


@pytest.mark.parametrize("source", ["hub_token", "HF_TOKEN"])
def test_hub_token_is_never_written_logged_or_uploaded(source, tiny_model_path, tmp_path):
    child = tmp_path / "hub_child.py"
    child.write_text(textwrap.dedent(HUB_CHILD))
    out, history = tmp_path / "out", tmp_path / "log_history.json"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    with HubServer() as hub:
        env.update(
            HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1",
            TQDM_DISABLE="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
            **({"HF_TOKEN": TOKEN} if source == "HF_TOKEN" else {}),
        )
        argument = TOKEN if source == "hub_token" else ""
        result = subprocess.run([sys.executable, str(child), tiny_model_path, str(out), argument, str(history)],
                                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    # The token reached the Hub as credentials, for every repo creation and commit, and training was logged.
    authorized = [auth for _, path, auth in hub.requests if path.startswith("/api/repos") or "/commit/" in path]
    assert authorized and set(authorized) == {f"Bearer {TOKEN}"}
    assert not hub.errors and "README.md" in hub.files["me/tiny-sft"]
    log_history = json.loads(history.read_text())
    assert [entry["step"] for entry in log_history if "loss" in entry] == [1, 2]
    assert "DEBUG" in result.stderr and "ARGS" in result.stdout

    needle = TOKEN.encode()
    # Not in captured logs, nor in the log history.
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    assert TOKEN not in json.dumps(log_history)
    # Not in any file left in output_dir: weights, checkpoints, trainer_state.json, README.md, training_args.bin.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"README.md", "training_args.bin", "checkpoint-1", "checkpoint-2"} <= {p.name for p in out.iterdir()}
    assert not [str(p.relative_to(out)) for p in files if needle in p.read_bytes()]
    # Not in the card, nor in any file of any commit (checkpoint pushes included).
    assert "tiny-sft" in (out / "README.md").read_text() and "hf_align" in (out / "README.md").read_text()
    assert not [path for commit in hub.commits for path, content in commit["files"].items() if needle in content]
    # training_args.bin (a pickle Trainer writes and never reads) holds the Config without its token.
    for saved in [out / "training_args.bin", *out.glob("checkpoint-*/training_args.bin")]:
        config = torch.load(io.BytesIO(saved.read_bytes()), weights_only=False)  # our own file, written just now
        assert isinstance(config, SFTConfig) and config.hub_token is None and config.hub_model_id == "me/tiny-sft"
        assert TOKEN not in json.dumps(vars(config), default=str)
