"""Where a run's metrics go: metrics.jsonl and TensorBoard events (synced to the run's
storage folder), MLflow / W&B when the recipe configures them, and a progress line.

Only rank 0 writes any of them. A resumed run logs the steps after its checkpoint again:
metrics.jsonl and TensorBoard drop the failed attempt's entries past that checkpoint so
each step stands there once.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray_jobs.core.recipe import Recipe

METRICS_FILE = "metrics.jsonl"
"""Every logged step's metrics, one JSON object per line, in the run's tensorboard/ folder."""


@dataclass(frozen=True)
class TensorboardFolder:
    """The worker's local TensorBoard folder and where it is synced to in storage."""

    local_dir: str
    """On the worker's node; rank 0 writes the event files and metrics.jsonl here."""
    storage_root: str
    """The recipe's storage root (a directory or s3:// URI)."""
    storage_rel: str
    """The copy's path under `storage_root`: runs/<run>/tensorboard."""

    @property
    def metrics_path(self) -> Path:
        return Path(self.local_dir) / METRICS_FILE


def metrics_line(metrics: dict[str, Any]) -> str:
    """One metrics.jsonl line. A non-finite float (a diverged loss) is written as null:
    json.dumps would write NaN or Infinity, which no strict JSON reader accepts."""
    finite = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in metrics.items()
    }
    return json.dumps(finite) + "\n"


def append_metrics(path: Path, metrics: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(metrics_line(metrics))


def keep_metrics_through(path: Path, step: int) -> None:
    """Drop the lines logged after `step`: a run resumed from the checkpoint at `step` logs
    those steps again, and the failed attempt's lines would stand beside them twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by the crash that this run resumes from
        if logged <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    path.write_text("".join(kept))


def resume_metrics(folder: TensorboardFolder, step: int) -> None:
    """Rank 0's metrics.jsonl as a run resumed at `step` continues it.

    A restarted worker may land on another node, without the failed attempt's local file:
    the copy synced to storage at the last checkpoint then carries the earlier steps on
    (the next sync would otherwise overwrite it with the resumed steps alone).
    """
    from ray_jobs.core.storage import Storage

    path = folder.metrics_path
    if not path.exists():
        storage = Storage.from_uri(folder.storage_root)
        synced = posixpath.join(folder.storage_rel, METRICS_FILE)
        if storage.exists(synced):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(storage.read_text(synced))
    keep_metrics_through(path, step)


def sync_tensorboard(folder: TensorboardFolder) -> None:
    """Copy the TensorBoard event files and metrics.jsonl to <storage>/runs/<run>/tensorboard/."""
    from ray_jobs.core.storage import Storage

    if not Path(folder.local_dir).is_dir():
        return
    Storage.from_uri(folder.storage_root).upload_dir(folder.local_dir, folder.storage_rel, complete=False)


class Tracker:
    """Optional MLflow / W&B logging from rank 0, only when the recipe configures them."""

    def __init__(self, recipe: Recipe, run_name: str | None, rank: int):
        tracking = recipe.train.tracking
        self.mlflow = self.wandb = None
        if rank != 0:
            return
        run = run_name or recipe.name
        if tracking.mlflow_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking.mlflow_uri)
            mlflow.set_experiment(recipe.name)
            mlflow.start_run(run_name=run)
            self.mlflow = mlflow
        if tracking.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=tracking.wandb_project, name=run, resume="allow", config=recipe.model_dump(mode="json")
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.mlflow:
            self.mlflow.log_metrics(numbers, step=step)
        if self.wandb:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.mlflow:
            self.mlflow.end_run()
        if self.wandb:
            self.wandb.finish()


def tensorboard_writer(folder: TensorboardFolder | None, rank: int, resumed_from: int | None):
    if rank != 0 or folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; stay alive if an image lacks it
        return None
    Path(folder.local_dir).mkdir(parents=True, exist_ok=True)
    # As for metrics.jsonl: TensorBoard hides the failed attempt's events past the checkpoint.
    purge = resumed_from + 1 if resumed_from is not None else None
    return SummaryWriter(folder.local_dir, purge_step=purge)


class MetricsLog:
    """Every destination of one worker's logged metrics; all but the tracker's rank check
    are rank 0's alone as well."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        run_name: str | None,
        folder: TensorboardFolder | None,
        rank: int,
        total_steps: int,
        resumed_from: int | None,
    ):
        self.folder, self.rank, self.total_steps = folder, rank, total_steps
        self.writer = tensorboard_writer(folder, rank, resumed_from)
        self.first_logged: tuple[int, float] | None = None
        """(step, time) of this attempt's first logged step: the pace the ETA extrapolates."""
        self.tracker = Tracker(recipe, run_name, rank)

    def write(self, metrics: dict[str, Any], step: int) -> None:
        self.tracker.log(metrics, step)
        if self.rank == 0 and self.folder is not None:
            # Plain JSON lines next to the TensorBoard events: readable without TensorBoard.
            append_metrics(self.folder.metrics_path, metrics)
        if self.writer:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key not in ("step", "final"):
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.rank == 0:
            extra = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
            print(
                f"[medtune] step {step}/{self.total_steps} loss {metrics['loss']:.4f}"
                f"{extra} lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s{self._eta(step)}",
                flush=True,
            )

    def _eta(self, step: int) -> str:
        """` ETA 3m12s`: the remaining steps at this attempt's pace so far ("" at its first line)."""
        now = time.monotonic()
        if self.first_logged is None:
            self.first_logged = (step, now)
            return ""
        first_step, first_time = self.first_logged
        if step <= first_step:
            return ""
        seconds = (self.total_steps - step) * (now - first_time) / (step - first_step)
        minutes, secs = divmod(int(seconds), 60)
        return f" ETA {minutes}m{secs:02d}s" if minutes else f" ETA {secs}s"

    def sync(self) -> None:
        """Flush the events and copy the folder to storage (at each checkpoint)."""
        if self.writer:
            self.writer.flush()
        if self.rank == 0 and self.folder is not None:
            sync_tensorboard(self.folder)

    def close(self) -> None:
        self.tracker.close()
        if self.writer:
            self.writer.close()
        if self.rank == 0 and self.folder is not None:
            sync_tensorboard(self.folder)
