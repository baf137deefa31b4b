"""Run logs copied to storage (ray_jobs.runlogs), so a failed run can be read after its cluster is gone.

The selection and copy run on a log directory laid out like a Ray session's (unit), into
local storage and into S3 on the loopback test server; then against a real local Ray, where
a task's output must land in storage (integration). The state-API path across nodes is
exercised by tests/test_submit.py against a `ray start --head` cluster with a dashboard.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_jobs.core.storage import Storage
from ray_jobs.runlogs import copy_logs_from_dir, copy_run_logs

JOB, OTHER_JOB, SUBMISSION = "03000000", "04000000", "raysubmit_abc123"


def fake_session_logs(root: Path) -> Path:
    """A Ray session's logs/ directory: this job's files, another job's, and the rest."""
    logs = root / "logs"
    logs.mkdir(parents=True)
    files = {
        f"job-driver-{SUBMISSION}.log": "[medtune] training ...\nTrainError: boom\n",
        # Pre-started workers carry the nil job id in their names; Ray's marker line tells.
        "worker-aa11-ffffffff-101.out": f":job_id:{JOB}\n:actor_name:RayTrainWorker\nstep 1 loss 2.3\n",
        "worker-aa11-ffffffff-101.err": f":job_id:{JOB}\n:actor_name:RayTrainWorker\nTraceback (most recent call last):\nRuntimeError: NCCL timeout\n",
        f"worker-cc33-{JOB}-303.out": f":job_id:{JOB}\n:task_name:read_json\n",
        f"worker-bb22-{OTHER_JOB}-202.out": f":job_id:{OTHER_JOB}\nsomeone else's job\n",
        "worker-dd44-ffffffff-404.out": "",  # idle: never ran anything
        "raylet.out": "".join(f"raylet line {i}\n" for i in range(100)),
        "gcs_server.out": "not about this run\n",
        "dashboard.log": "not about this run\n",
        "job-driver-raysubmit_other.log": "another submission\n",
    }
    for name, text in files.items():
        (logs / name).write_text(text)
    (logs / "events").mkdir()  # directories are skipped
    return logs


def copied_names(storage: Storage, run: str) -> set[str]:
    return {Path(p).name for p in storage.list_files(f"runs/{run}/logs")}


def test_patterns_select_exactly_this_jobs_logs(tmp_path: Path) -> None:
    logs = fake_session_logs(tmp_path / "session")
    storage = Storage.from_uri(str(tmp_path / "store"))
    uris = copy_logs_from_dir(storage, "run-1", logs, JOB, SUBMISSION, node="10.0.0.1_abcdef12", max_lines=10)
    assert copied_names(storage, "run-1") == {
        f"job-driver-{SUBMISSION}.log",
        "worker-aa11-ffffffff-101.out",
        "worker-aa11-ffffffff-101.err",
        f"worker-cc33-{JOB}-303.out",
        "raylet.out",
    }
    assert len(uris) == 5 and all(u.startswith(storage.uri("runs/run-1/logs/10.0.0.1_abcdef12/")) for u in uris)
    node_dir = tmp_path / "store" / "runs" / "run-1" / "logs" / "10.0.0.1_abcdef12"
    assert "RuntimeError: NCCL timeout" in (node_dir / "worker-aa11-ffffffff-101.err").read_text()
    # Long logs keep their end, where a failure is.
    assert (node_dir / "raylet.out").read_text().splitlines() == [f"raylet line {i}" for i in range(90, 100)]


def test_without_a_submission_id_no_driver_log_is_claimed(tmp_path: Path) -> None:
    logs = fake_session_logs(tmp_path / "session")
    storage = Storage.from_uri(str(tmp_path / "store"))
    copy_logs_from_dir(storage, "run-2", logs, JOB, None, node="n")
    assert not [n for n in copied_names(storage, "run-2") if n.startswith("job-driver-")]


def test_copy_never_raises(tmp_path: Path) -> None:
    """Not connected to Ray at all: nothing copied, no exception to mask a training error."""
    import ray

    if ray.is_initialized():
        pytest.skip("needs a process without a Ray connection")
    assert copy_run_logs(Storage.from_uri(str(tmp_path / "store")), "run-5") == []


@pytest.mark.integration
def test_logs_land_in_s3(tmp_path: Path, s3_bucket: str) -> None:
    logs = fake_session_logs(tmp_path / "session")
    storage = Storage.from_uri(f"{s3_bucket}/medtune")
    uris = copy_logs_from_dir(storage, "run-3", logs, JOB, SUBMISSION, node="n")
    assert all(u.startswith(f"{s3_bucket}/medtune/runs/run-3/logs/n/") for u in uris)
    assert "TrainError: boom" in storage.read_text(f"runs/run-3/logs/n/job-driver-{SUBMISSION}.log")


@pytest.mark.integration
def test_a_real_ray_jobs_worker_output_is_copied(tmp_path: Path, ray_cluster: None) -> None:
    """A task of this Ray job prints a marker; after copy_run_logs it is readable in storage."""
    import ray

    marker = f"medtune-runlogs-marker-{tmp_path.name}"

    @ray.remote
    def shout(text: str) -> str:
        print(text, flush=True)
        return text

    assert ray.get(shout.remote(marker)) == marker
    storage = Storage.from_uri(str(tmp_path / "store"))
    uris = copy_run_logs(storage, "run-4")
    index = json.loads((tmp_path / "store" / "runs" / "run-4" / "logs" / "index.json").read_text())
    assert index["ray_job_id"] == ray.get_runtime_context().get_job_id()
    assert index["source"] == "local"  # the test cluster runs without a dashboard
    assert index["files"] == uris
    texts = [Path(u).read_text() for u in uris if Path(u).name.endswith(".out") and Path(u).name.startswith("worker-")]
    assert any(marker in text for text in texts), uris
