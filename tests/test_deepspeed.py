"""The trainers under real DeepSpeed ZeRO-2 and ZeRO-3 (accelerate launch, CPU), against the same runs without it.

`tests/distributed_child.py` trains each run for 4 steps and writes its logs and what it saw of the frozen models
(reference, reward model) to JSON. The launches (plain `python`; ZeRO-2 and ZeRO-3 with one process; ZeRO-3 and DDP
with two processes) run two at a time in one module fixture, each with one thread per process. The one-process ZeRO-3
launch also trains GRPO with `ds3_gather_for_generation=False`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

CHILD = Path(__file__).with_name("distributed_child.py")
ALL_RUNS = ("dpo", "kto", "sft", "reward", "grpo", "grpo-fixed", "rloo", "online_dpo", "ppo")
COMPARED = ("dpo", "grpo-fixed")  # deterministic given the seed: no sampling
WITH_REFERENCE = ("dpo", "kto", "grpo", "grpo-fixed", "rloo", "online_dpo", "ppo")
WITH_REWARD_MODEL = ("grpo", "online_dpo")
TOLERANCE = 1e-4

LAUNCHES = {  # name: (accelerate options or None for plain python, processes, runs)
    "plain": (None, 1, COMPARED),
    "zero2": ("DEEPSPEED", 1, ALL_RUNS),
    "zero3": ("DEEPSPEED", 1, ALL_RUNS + ("grpo-nogather",)),
    "zero3-2p": ("DEEPSPEED", 2, COMPARED + ("grpo",)),
    "ddp-2p": ("DDP", 2, COMPARED),
}


def _deepspeed_config(path: Path, stage: int, processes: int) -> Path:
    path.write_text("\n".join([
        "distributed_type: DEEPSPEED", f"num_processes: {processes}", "num_machines: 1", "machine_rank: 0",
        'mixed_precision: "no"', "use_cpu: true", "deepspeed_config:", f"  zero_stage: {stage}",
        "  offload_optimizer_device: none", "  offload_param_device: none", "  zero3_init_flag: false",
    ]) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(name: str, root: Path, model_path: str, seqcls_path: str) -> dict[str, dict]:
    distributed_type, processes, runs = LAUNCHES[name]
    out = root / name
    out.mkdir()
    child_args = [str(CHILD), str(out), model_path, seqcls_path, *runs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(_free_port())]
    if distributed_type is None:
        cmd = [sys.executable, *child_args]
    elif distributed_type == "DDP":  # DDP over gloo: `--cpu` would start one process (MACHINE-NOTES)
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [*launch, "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *child_args]
    else:
        stage = 2 if name.startswith("zero2") else 3
        cmd = [*launch, "--config_file", str(_deepspeed_config(root / f"{name}.yaml", stage, processes)), *child_args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name}:\n{result.stderr[-6000:]}"
    return {run: json.loads((out / f"{run}.json").read_text()) for run in runs}


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model_path, tiny_seqcls_path) -> dict[str, dict[str, dict]]:
    """launch name -> run name -> the run's JSON."""
    root = tmp_path_factory.mktemp("deepspeed")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_launch, name, root, tiny_model_path, tiny_seqcls_path) for name in LAUNCHES}
        return {name: future.result() for name, future in futures.items()}


def _losses(run: dict) -> list[float]:
    return [entry["loss"] for entry in run["logs"]]


@pytest.mark.parametrize("launch", ["zero2", "zero3"])
@pytest.mark.parametrize("run", ALL_RUNS)
def test_every_trainer_trains_under_zero(results, launch, run):
    result = results[launch][run]
    losses = _losses(result)
    assert len(losses) == 4 and all(abs(loss) < 1e3 for loss in losses)
    assert result["world_size"] == 1 and result["weights_moved"]
    stage = int(launch[-1])
    # Frozen models are inference engines: ZeRO-3 keeps them partitioned, below 3 they run at stage 0.
    for frozen, runs in (("reference", WITH_REFERENCE), ("reward_model", WITH_REWARD_MODEL)):
        if run in runs:
            assert result[frozen] == {"type": "DeepSpeedEngine", "zero_stage": stage if stage == 3 else 0,
                                      "training": False, "requires_grad": False}, frozen


@pytest.mark.parametrize("launch", ["zero2", "zero3"])
@pytest.mark.parametrize("run", COMPARED)
def test_loss_curve_equals_the_run_without_deepspeed(results, launch, run):
    assert _losses(results[launch][run]) == pytest.approx(_losses(results["plain"][run]), abs=TOLERANCE)


def test_dpo_learns_under_zero(results):
    for launch in ("zero2", "zero3", "zero3-2p"):
        run = results[launch]["dpo"]
        losses = _losses(run)
        assert losses[0] == pytest.approx(0.693147, abs=1e-5) and losses[-1] < losses[0] - 0.2, launch
        assert run["logs"][-1]["rewards/margins"] > 0.1


@pytest.mark.parametrize("run", COMPARED)
def test_two_process_zero3_equals_two_process_ddp(results, run):
    """Over two CPU processes (the config names no backend; hf_align picks gloo, where TRL's batch sizes mismatch)."""
    assert results["zero3-2p"][run]["world_size"] == 2 and results["ddp-2p"][run]["world_size"] == 2
    assert _losses(results["zero3-2p"][run]) == pytest.approx(_losses(results["ddp-2p"][run]), abs=TOLERANCE)


@pytest.mark.parametrize("launch", ["zero3", "zero3-2p"])
def test_zero3_generation_gathers_every_parameter(results, launch):
    """Each sampling round (4 steps of GRPO, one rollout per step) holds all of the policy's parameters gathered, as
    TRL's `ds3_gather_for_generation` does; ZeRO-2 gathers nothing."""
    run = results[launch]["grpo"]
    assert run["gathered"].count(run["num_parameters"]) == 4
    assert results["zero2"]["grpo"]["gathered"] == []


def test_zero3_generation_without_gathering(results):
    """`ds3_gather_for_generation=False`: sampling runs through ZeRO-3's hooks, which gather one layer at a time, so
    no `GatheredParameters` call holds the policy (the calls of at most one parameter are made while the trainer is
    built, in every run); GRPO still samples and trains."""
    run = results["zero3"]["grpo-nogather"]
    losses = _losses(run)
    assert run["num_parameters"] in results["zero3"]["grpo"]["gathered"]  # the gathering run holds the policy whole
    assert run["gathered"] and max(run["gathered"]) <= 1 and run["weights_moved"]
    assert len(losses) == 4 and all(abs(loss) < 1e3 for loss in losses)
    assert run["logs"][-1]["completions/mean_length"] > 0
