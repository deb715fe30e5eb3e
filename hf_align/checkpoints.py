"""Checkpoint folders that have a checkpoint's name only once they are complete.

`transformers.Trainer` writes `checkpoint-N` in place, file by file: a run killed during a save leaves a folder with a
checkpoint's name that lacks files, and from then on `train(resume_from_checkpoint=True)` picks it and fails.
`AlignTrainer._save_checkpoint` writes each checkpoint under `STAGING_FOLDER` in the output dir (`clear_for_save`
first) and, once every process has written its part, renames it to `checkpoint-N` (`publish`).

A checkpoint is *complete* when its folder holds `REQUIRED_FILES`: Trainer's `trainer_state.json` (the last file
Trainer writes, read by every resume) and hf_align's `hf_align_state.json` (`AlignTrainer.save_training_state`, read
by every hf_align resume). Every checkpoint this module publishes is. A folder named like a checkpoint that lacks one
of them (left by an older version killed during a save, or by another tool) is skipped with a warning by
`last_complete_checkpoint`, and `rotate` neither counts nor deletes it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

TRAINING_STATE_NAME = "hf_align_state.json"  # in each checkpoint, beside Trainer's trainer_state.json
REQUIRED_FILES = (TRAINER_STATE_NAME, TRAINING_STATE_NAME)
# Not matched by Trainer's `checkpoint-*` patterns; a leading "_" keeps it out of Trainer's pushes to the Hub.
STAGING_FOLDER = "_checkpoint-in-progress"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # what `get_last_checkpoint` recognises


def checkpoint_folders(folder: str) -> list[str]:
    """The folders in `folder` named like a checkpoint (`checkpoint-N`), complete or not, in the order of their step."""
    steps = {int(match.group(1)): os.path.join(folder, name) for name in os.listdir(folder)
             if (match := _CHECKPOINT_NAME.match(name)) and os.path.isdir(os.path.join(folder, name))}
    return [steps[step] for step in sorted(steps)]


def missing_files(checkpoint: str) -> list[str]:
    """Which of `REQUIRED_FILES` the folder `checkpoint` lacks: none when it is a complete checkpoint."""
    return [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(checkpoint, name))]


def last_complete_checkpoint(folder: str) -> str | None:
    """The complete checkpoint in `folder` with the highest step, None when there is none; warns about each folder
    named like a checkpoint that is not complete."""
    last = None
    for checkpoint in checkpoint_folders(folder):
        if missing := missing_files(checkpoint):
            logger.warning("Skipping %s: not a complete checkpoint (it lacks %s), e.g. a save was interrupted.",
                           checkpoint, ", ".join(missing))
        else:
            last = checkpoint
    return last


def clear_for_save(staging_folder: str, checkpoint: str) -> None:
    """Removes what is in the way of writing `checkpoint` under `staging_folder`: a staging folder left by a save that
    was killed (with a warning), and a checkpoint of the same name from an earlier run, which the new one replaces."""
    if os.path.exists(staging_folder):
        logger.warning("Removing %s, left by a checkpoint save that was interrupted.", staging_folder)
        shutil.rmtree(staging_folder, ignore_errors=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def publish(staging_folder: str, staged: str, checkpoint: str) -> None:
    """Renames the written checkpoint `staged` (inside `staging_folder`) to `checkpoint`, then removes
    `staging_folder`. Processes that save on each node may share one file system: the first renames, the others find
    the checkpoint in place."""
    os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
    try:
        os.rename(staged, checkpoint)
    except FileNotFoundError:
        if not os.path.isdir(checkpoint):
            raise
    shutil.rmtree(staging_folder, ignore_errors=True)


def rotate(folder: str, save_total_limit: int | None, keep: tuple[str | None, ...]) -> None:
    """Deletes the complete checkpoints in `folder` with the lowest steps until `save_total_limit` are left (all kept
    when it is None or 0, as in Trainer), never one in `keep` (the checkpoint just published, the best one). Incomplete
    folders are neither counted nor deleted: they can never push out a complete checkpoint."""
    if not save_total_limit:
        return
    complete = [checkpoint for checkpoint in checkpoint_folders(folder) if not missing_files(checkpoint)]
    kept = {os.path.abspath(path) for path in keep if path}
    deletable = [checkpoint for checkpoint in complete if os.path.abspath(checkpoint) not in kept]
    for checkpoint in deletable[:max(len(complete) - save_total_limit, 0)]:
        logger.info("Deleting older checkpoint [%s] due to args.save_total_limit", checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)
