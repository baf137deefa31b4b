"""Which run a training submission is: a stable name, so a resubmitted job resumes.

Ray Train keeps a run's checkpoints under `<storage>/runs/<run>/` and, given the same run
name and storage path again, restores the latest one (its checkpoint manager reloads its
snapshot), whether the previous attempt lost a worker, its driver, its head pod or the whole
cluster. So the name must not change between submissions: it is `--run`, `train.run_name`,
or `<recipe name>-<training hash>-<dataset fingerprint>`.

`runs/<run>/medtune-run.json` records what the run trains (the recipe's training hash and the
dataset) and, once its adapter is published, where that is. A submission of a finished run
returns that adapter instead of training again (`force` starts a new run); a submission whose
recipe or dataset differs from the run's is refused, so two recipes never write into one
run's checkpoints.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import asdict, dataclass
from typing import Any

from ray_jobs.core.artifacts import DatasetRef
from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.recipe import Recipe
from ray_jobs.core.storage import Storage, run_prefix

RUN_RECORD = "medtune-run.json"


class RunConflictError(MedtuneError):
    """The run name belongs to a run of another recipe or dataset."""


@dataclass
class RunRecord:
    run: str
    training_hash: str
    dataset_fingerprint: str
    started: str
    adapter: dict[str, Any] | None = None
    """Once published: name, version, uri and metrics of the run's adapter."""


def default_run_name(recipe: Recipe, dataset: DatasetRef) -> str:
    return f"{recipe.name}-{recipe.training_hash()[:8]}-{dataset.fingerprint[:8]}"


def _record_path(run: str) -> str:
    return posixpath.join(run_prefix(run), RUN_RECORD)


def read_record(storage: Storage, run: str) -> RunRecord | None:
    try:
        return RunRecord(**storage.read_json(_record_path(run)))
    except (FileNotFoundError, OSError):
        return None


def claim_run(
    storage: Storage, recipe: Recipe, dataset: DatasetRef, run: str | None, *, force: bool = False
) -> tuple[str, RunRecord, bool]:
    """The run to train (`run`, the recipe's, or the default name), its record, and whether
    the run existed before (so Ray Train resumes it from its latest checkpoint).

    A finished run's record comes back with its `adapter` set: the caller returns that
    adapter. With `force`, a finished run is trained again under a new, timestamped name.
    Raises RunConflictError when the run was started with another recipe or dataset."""
    name = run or recipe.train.run_name or default_run_name(recipe, dataset)
    record = read_record(storage, name)
    if record is not None and record.adapter and force:
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        record = None
    if record is not None:
        if record.training_hash != recipe.training_hash() or record.dataset_fingerprint != dataset.fingerprint:
            raise RunConflictError(
                f"run {name!r} ({storage.uri(run_prefix(name))}) was started with another recipe or dataset "
                f"(training hash {record.training_hash}, dataset {record.dataset_fingerprint}; this submission: "
                f"{recipe.training_hash()}, {dataset.fingerprint}); resuming it would mix two trainings. "
                f"Give this one another name (medtune train --run NAME, or train.run_name)"
            )
        return name, record, True
    record = RunRecord(
        run=name,
        training_hash=recipe.training_hash(),
        dataset_fingerprint=dataset.fingerprint,
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    storage.write_json(_record_path(name), asdict(record))
    return name, record, False


def finish_run(storage: Storage, record: RunRecord, adapter: dict[str, Any]) -> None:
    """Record the published adapter: a later submission of this run returns it."""
    record.adapter = adapter
    storage.write_json(_record_path(record.run), asdict(record))
