"""The completions table of the online trainers (TRL's `log_completions`): prompts, completions, each reward, the
advantage and the columns reward functions added with `log_extra`, for the latest generation batch of every process.

At each logging step (main process only) `CompletionLog.write`:

- prints a rich table of `num_completions_to_print` random rows (all of them when None), when `rich` is installed
  (TRL's `print_prompt_completions_sample`);
- writes the rows to `<output_dir>/completions/completions_<step:05d>.parquet`, with a `step` column;
- logs them as a table named "completions" to W&B (with a run started) and trackio when they are in `report_to`,
  one row per distinct prompt with `log_unique_prompts`.

With `log_completions_hub_repo` the completions folder goes to that Hub dataset repo (created if needed, private with
`hub_private_repo`): every 2 minutes through huggingface_hub's `CommitScheduler`, as TRL does, and once more when
training ends (`push`), so that a run shorter than the schedule still lands there.

Text only: hf_align samples no images, so `log_multimodal` has nothing to add to the table.
"""

from __future__ import annotations

import os
from collections import deque

import pandas
from transformers.utils import is_rich_available
from trl.trainer.utils import print_prompt_completions_sample

PUSH_EVERY_MINUTES = 2


def active_trackers(report_to: list[str]) -> list:
    """The tracker modules that take the table: `wandb` when it is reported to and has a run, `trackio` when it is
    reported to."""
    trackers = []
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            trackers.append(wandb)
    if "trackio" in report_to:
        import trackio

        trackers.append(trackio)
    return trackers


class CompletionLog:
    """The latest `capacity` rows sampled (a generation batch of every process), written at each `write(step)` into
    `folder`. `num_to_print`: rows printed (a random sample; None: all). `unique_prompts`: one row per prompt in the
    trackers' table. `hub_repo`: a Hub dataset repo the folder is pushed to (`hub_private`, `hub_token` as the run's)."""

    def __init__(self, folder: str, capacity: int, num_to_print: int | None = None, unique_prompts: bool = False,
                 hub_repo: str | None = None, hub_private: bool | None = None, hub_token: str | None = None):
        self.folder = folder
        self.num_to_print = num_to_print
        self.unique_prompts = unique_prompts
        self.rows: deque[dict] = deque(maxlen=capacity)
        self.reward_names: list[str] = []
        self.extra_names: list[str] = []  # `log_extra` columns, in the order they first appeared
        self.has_advantages = True
        os.makedirs(folder, exist_ok=True)
        self.scheduler = None
        if hub_repo is not None:
            from huggingface_hub import CommitScheduler

            self.scheduler = CommitScheduler(repo_id=hub_repo, repo_type="dataset", folder_path=folder,
                                             every=PUSH_EVERY_MINUTES, allow_patterns=["*.parquet"],
                                             private=hub_private, token=hub_token)

    def record(self, prompts: list, completions: list, rewards: dict[str, list[float]],
               advantages: list[float] | None, extra: dict[str, list]) -> None:
        """Adds one generation batch (every process's rows, in order); the oldest rows beyond `capacity` drop out.
        `advantages` None: the trainer has none (the table then has no advantage column)."""
        self.reward_names = list(rewards)
        self.extra_names += [name for name in extra if name not in self.extra_names]
        self.has_advantages = advantages is not None
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            row = {"prompt": prompt, "completion": completion}
            row.update({name: values[i] for name, values in rewards.items()})
            row.update({name: values[i] for name, values in extra.items()})
            if advantages is not None:
                row["advantage"] = advantages[i]
            self.rows.append(row)

    def columns(self, step: int) -> dict[str, list]:
        """The table: step, prompt, completion, one column per reward, the `log_extra` columns (None where a batch
        did not log one), advantage."""
        names = ["prompt", "completion", *self.reward_names, *self.extra_names]
        names += ["advantage"] if self.has_advantages else []
        return {"step": [step] * len(self.rows), **{name: [row.get(name) for row in self.rows] for name in names}}

    def write(self, step: int, trackers: list) -> None:
        """Prints, saves and logs the table of the current rows at global step `step` (nothing before any)."""
        if not self.rows:
            return
        table = self.columns(step)
        if is_rich_available():
            print_prompt_completions_sample(
                table["prompt"], table["completion"], {name: table[name] for name in self.reward_names},
                table.get("advantage"), step, self.num_to_print,
                extra={name: table[name] for name in self.extra_names},
            )
        frame = pandas.DataFrame(table)
        frame.to_parquet(os.path.join(self.folder, f"completions_{step:05d}.parquet"))
        if self.unique_prompts:  # prompts may be message lists: compare them as text
            frame = frame[~frame["prompt"].astype(str).duplicated()]
        for tracker in trackers:
            tracker.log({"completions": tracker.Table(dataframe=frame)})

    def push(self) -> None:
        """Pushes what the folder holds to the Hub repo now and waits for the commit (nothing without a repo)."""
        if self.scheduler is not None:
            self.scheduler.trigger().result()
