"""Checkpoints survive a run killed while it writes one (`hf_align.checkpoints`).

The end-to-end test trains SFT in a child process that pauses inside a save, after the weights, optimizer and RNG
state are written and before `trainer_state.json` is, and kills it there with SIGKILL, three times at three saves,
resuming with `train(resume_from_checkpoint=True)` after each; before the last resume the partial folder is put under
a checkpoint's name, as older versions left it. The run ends at the right step with the losses and weights of an
uninterrupted run. The other tests cover the helpers: which folders count as checkpoints, and rotation."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import rotate_checkpoints

from hf_align import SFTConfig, SFTTrainer, checkpoints

REPO = Path(__file__).resolve().parents[1]
STEPS, ROWS = 6, 8  # 4 steps an epoch: the later kills fall in the second epoch
ARGS = dict(max_steps=STEPS, per_device_train_batch_size=2, save_strategy="steps", save_steps=1, save_total_limit=2,
            logging_steps=1, learning_rate=1e-3, report_to="none", disable_tqdm=True, seed=0)

CHILD = r'''
import json, os, sys, time
import torch
torch.set_num_threads(1)
from transformers import Trainer
from hf_align import SFTConfig, SFTTrainer
from hf_align.defaults import load_default_dataset

model_path, output_dir, args, rows, resume, pause_step, pause_signal, start_signal = sys.argv[1:]
while not os.path.exists(start_signal):  # imported: wait for the run before to end
    time.sleep(0.05)
save_rng_state = Trainer._save_rng_state


def save_rng_state_then_pause(self, folder):
    # Weights, optimizer and scheduler are written by now, trainer_state.json is not: the parent kills the run here.
    save_rng_state(self, folder)
    if self.state.global_step == int(pause_step):
        with open(pause_signal + ".tmp", "w") as file:
            file.write(folder)
        os.replace(pause_signal + ".tmp", pause_signal)
        time.sleep(600)


Trainer._save_rng_state = save_rng_state_then_pause
trainer = SFTTrainer(model_path, args=SFTConfig(output_dir=output_dir, **json.loads(args)),
                     train_dataset=load_default_dataset("sft").select(range(int(rows))))
trainer.train(resume_from_checkpoint=resume == "resume")
'''


def start_run(tmp_path: Path, model_path: str, output_dir: Path, resume: bool, pause_step: int, run: int):
    """Starts the child run number `run`: it imports, waits for the file `start-{run}`, trains, and pauses in the
    save of `pause_step` (0: never) after writing where to `paused-{run}`. Returns the process and its stderr file."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    stderr = tmp_path / f"run-{run}.stderr"
    with open(stderr, "w") as log:
        child = subprocess.Popen(
            [sys.executable, str(script), model_path, str(output_dir), json.dumps(ARGS), str(ROWS),
             "resume" if resume else "fresh", str(pause_step), str(tmp_path / f"paused-{run}"),
             str(tmp_path / f"start-{run}")],
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
    return child, stderr


def kill_in_save(child, stderr: Path, pause_signal: Path) -> Path:
    """Waits until `child` pauses inside a save, kills it with SIGKILL; returns the folder it was writing."""
    deadline = time.monotonic() + 300
    while not pause_signal.exists():
        if child.poll() is not None:
            pytest.fail(f"the run ended (exit {child.returncode}) before the save it should be killed in:\n"
                        + stderr.read_text()[-4000:])
        assert time.monotonic() < deadline, "the run never reached the save"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return Path(pause_signal.read_text())


def test_a_run_killed_while_saving_resumes_from_its_last_complete_checkpoint(tiny_model_path, embedded_data,
                                                                            tmp_path):
    output_dir, pause_steps = tmp_path / "killed", [2, 4, 5]
    # Every run imports at once (the slow part), then each starts when the one before has ended.
    runs = [start_run(tmp_path, tiny_model_path, output_dir, run > 0, pause_step, run)
            for run, pause_step in enumerate([*pause_steps, 0])]
    try:
        uninterrupted = SFTTrainer(tiny_model_path, train_dataset=embedded_data("sft", ROWS),
                                   args=SFTConfig(output_dir=str(tmp_path / "uninterrupted"), **ARGS))
        uninterrupted.train()
        for run, pause_step in enumerate(pause_steps):
            (tmp_path / f"start-{run}").touch()
            partial = kill_in_save(*runs[run], tmp_path / f"paused-{run}")
            # The kill hit a checkpoint half written...
            assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
            assert not (partial / "trainer_state.json").exists()
            # ...and every folder with a checkpoint's name is complete, the last one the save before.
            assert all(not checkpoints.missing_files(folder) for folder in checkpoints.checkpoint_folders(output_dir))
            assert checkpoints.last_complete_checkpoint(output_dir) == str(output_dir / f"checkpoint-{pause_step - 1}")
        # What older versions left: the partial folder under the checkpoint's name.
        os.rename(partial, output_dir / "checkpoint-5")
        (tmp_path / f"start-{len(pause_steps)}").touch()
        child, stderr = runs[-1]
        assert child.wait(timeout=300) == 0, stderr.read_text()[-4000:]
    finally:
        for child, _ in runs:
            if child.poll() is None:
                child.kill()
                child.wait()
    warnings = stderr.read_text()
    assert f"Skipping {output_dir / 'checkpoint-5'}: not a complete checkpoint" in warnings
    assert f"Removing {output_dir / checkpoints.STAGING_FOLDER}, left by a checkpoint save" in warnings
    # save_total_limit=2 kept the last two; the incomplete checkpoint-5 was replaced; no staging folder is left.
    assert sorted(os.listdir(output_dir)) == ["README.md", "checkpoint-5", "checkpoint-6"]
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    expected = {entry["step"]: entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry}
    got = {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    weights = load_file(output_dir / "checkpoint-6" / "model.safetensors")
    expected_weights = uninterrupted.model.state_dict()
    assert weights and weights.keys() <= expected_weights.keys()  # tied weights are saved once
    for name, value in weights.items():
        torch.testing.assert_close(value, expected_weights[name], rtol=1e-5, atol=1e-7, msg=name)


def make_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A folder named like the checkpoint of `step`, with the files that make it complete or only some of them."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"")
    for name in checkpoints.REQUIRED_FILES if complete else checkpoints.REQUIRED_FILES[1:]:
        (checkpoint / name).write_text("{}")
    return checkpoint


def test_the_last_complete_checkpoint_skips_incomplete_ones_with_a_warning(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    last = make_checkpoint(tmp_path, 10)  # after checkpoint-9 in the order of steps, not of names
    make_checkpoint(tmp_path, 9)
    make_checkpoint(tmp_path, 11, complete=False)
    make_checkpoint(tmp_path / checkpoints.STAGING_FOLDER, 12)
    (tmp_path / "checkpoint-13.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="hf_align.checkpoints"):
        assert checkpoints.last_complete_checkpoint(str(tmp_path)) == str(last)
    skipped = [record.getMessage().split(":")[0] for record in caplog.records]
    assert skipped == [f"Skipping {tmp_path / 'checkpoint-11'}"]
    assert "trainer_state.json" in caplog.records[0].getMessage()


def test_no_complete_checkpoint_is_none(tmp_path):
    make_checkpoint(tmp_path, 1, complete=False)
    assert checkpoints.last_complete_checkpoint(str(tmp_path)) is None


def test_rotation_keeps_the_last_complete_checkpoint_and_leaves_incomplete_ones(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    for step in (4, 5):
        make_checkpoint(tmp_path, step, complete=False)

    def names():
        return sorted(os.listdir(tmp_path))

    checkpoints.rotate(str(tmp_path), 1, keep=(str(tmp_path / "checkpoint-3"), None))
    assert names() == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    # Trainer's rotation counts the incomplete folders as checkpoints and deletes the complete one.
    rotate_checkpoints(str(tmp_path), save_total_limit=2)
    assert names() == ["checkpoint-4", "checkpoint-5"]


def test_rotation_keeps_the_best_checkpoint_and_all_without_a_limit(tmp_path):
    for step in (1, 2, 3, 4):
        make_checkpoint(tmp_path, step)
    checkpoints.rotate(str(tmp_path), None, keep=())
    assert len(os.listdir(tmp_path)) == 4
    checkpoints.rotate(str(tmp_path), 2, keep=(str(tmp_path / "checkpoint-4"), str(tmp_path / "checkpoint-1")))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-4"]


def test_a_checkpoint_published_by_another_process_is_left_in_place(tmp_path):
    staging = tmp_path / checkpoints.STAGING_FOLDER
    staged = make_checkpoint(staging / "round-0", 1)
    checkpoint = tmp_path / "round-0" / "checkpoint-1"
    checkpoints.publish(str(staging), str(staged), str(checkpoint))
    assert not checkpoints.missing_files(checkpoint) and not staging.exists()
    checkpoints.publish(str(staging), str(staged), str(checkpoint))  # a second process that saves on its node
    assert not checkpoints.missing_files(checkpoint)
    with pytest.raises(FileNotFoundError):
        checkpoints.publish(str(staging), str(staged), str(tmp_path / "checkpoint-2"))


def test_the_best_checkpoint_is_named_where_it_is_published(tiny_model_path, embedded_data, tmp_path):
    # Trainer finds the best checkpoint in the folder it writes to: the staging folder, while hf_align saves.
    args = SFTConfig(output_dir=str(tmp_path), **{**ARGS, "max_steps": 3, "save_total_limit": 1},
                     eval_strategy="steps", eval_steps=1, metric_for_best_model="loss", load_best_model_at_end=True)
    trainer = SFTTrainer(tiny_model_path, args=args, train_dataset=embedded_data("sft", ROWS),
                         eval_dataset=embedded_data("sft", 2, split="test"))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == str(tmp_path / f"checkpoint-{trainer.state.best_global_step}") and not checkpoints.missing_files(best)
    saved = json.loads((Path(best) / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == best
