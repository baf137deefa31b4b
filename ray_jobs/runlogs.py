"""Copy a run's Ray logs into `<storage>/runs/<run>/logs/`, so they outlive the cluster.

    from ray_jobs.runlogs import copy_run_logs

    try:
        result = trainer.fit()
    finally:
        copy_run_logs(storage, run_name)      # never raises; returns the URIs it wrote

A RayJob's cluster is deleted when the job finishes, and every node's `/tmp/ray` with it;
a failed run must still be diagnosable afterwards. Copied, per node, under
`logs/<node-ip>_<node-id>/`:
- `job-driver-<submission id>.log`: the driver's output (head node; `ray job submit` runs only),
- `worker-*.out|.err` of every worker process of this Ray job (the Ray Train workers and
  controller, Ray Data tasks): tracebacks, NCCL and DeepSpeed messages,
- `raylet.out|.err`: the node's raylet, which records OOM kills and crashed workers,
plus `logs/index.json` naming the job and every file copied.

Design decisions:
- Ray's state API (`ray.util.state.list_logs` / `get_log`) reads the files of every node
  through its dashboard agent, the maintained way to reach other nodes' disks. Without a
  dashboard (`ray.init(include_dashboard=False)`) only this node's session logs are read,
  straight from the directory.
- Worker files are picked by content, not name: Ray pre-starts workers before it knows their
  job, so their file names carry the nil job id (`ffffffff`); the `:job_id:<id>` line Ray
  writes when a worker starts on a job is what ties the file to this run.
- Each file keeps its last `max_lines` lines: the end of a log is where a failure is.
- Best effort: a copy that fails is logged and skipped, so it can never replace the
  training error the caller is about to raise.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import time
from pathlib import Path
from typing import Any

from ray_jobs.core.storage import Storage, run_prefix

log = logging.getLogger("medtune.runlogs")
MAX_LINES = 20_000
# Bytes kept from the end of a file before cutting to `max_lines` lines.
LOCAL_TAIL_BYTES = 32 * 2**20


# Bytes at the start of a worker log searched for its job marker.
HEAD_BYTES = 64 * 2**10


def log_patterns(submission_id: str | None) -> list[str]:
    """File-name globs (relative to a node's Ray log directory) that may hold a job's logs."""
    patterns = ["worker-*.out", "worker-*.err", "raylet.out", "raylet.err"]
    if submission_id:
        patterns.insert(0, f"job-driver-{submission_id}.log")
    return patterns


def belongs_to_job(name: str, head: str, job_id: str) -> bool:
    """Worker logs count only when Ray marked them with this job; the others by name alone."""
    return not name.startswith("worker-") or f":job_id:{job_id}\n" in head


def current_job() -> tuple[str, str | None]:
    """(Ray job id, job submission id or None) of the calling driver."""
    import ray

    job_id = ray.get_runtime_context().get_job_id()
    # The job supervisor hands the driver its job config, metadata included, in this variable.
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return job_id, (config.get("metadata") or {}).get("job_submission_id")


def _last_lines(text: str, max_lines: int) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(lines[-max_lines:])


def _logs_prefix(run: str, node: str) -> str:
    return posixpath.join(run_prefix(run), "logs", node)


def copy_logs_from_dir(
    storage: Storage,
    run: str,
    logs_dir: str | Path,
    job_id: str,
    submission_id: str | None,
    *,
    node: str,
    max_lines: int = MAX_LINES,
) -> list[str]:
    """Copy job `job_id`'s files of `logs_dir` to runs/<run>/logs/<node>/; returns their URIs."""
    logs_dir = Path(logs_dir)
    patterns = log_patterns(submission_id)
    copied = []
    for path in sorted(logs_dir.glob("*")):
        if not path.is_file() or not any(fnmatch.fnmatchcase(path.name, p) for p in patterns):
            continue
        try:
            with path.open("rb") as handle:
                if not belongs_to_job(path.name, handle.read(HEAD_BYTES).decode("utf-8", errors="replace"), job_id):
                    continue
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - LOCAL_TAIL_BYTES))
                text = handle.read().decode("utf-8", errors="replace")
            rel = posixpath.join(_logs_prefix(run, node), path.name)
            storage.write_text(rel, _last_lines(text, max_lines))
            copied.append(storage.uri(rel))
        except OSError as exc:
            log.warning("could not copy %s: %s", path, exc)
    return copied


def _node_label(ip: str, node_id: str) -> str:
    return f"{ip}_{node_id[:8]}"


def copy_via_state_api(
    storage: Storage, run: str, job_id: str, submission_id: str | None, *, max_lines: int = MAX_LINES
) -> list[str]:
    """Job `job_id`'s logs on every alive node, read through Ray's state API (needs the dashboard)."""
    import ray
    from ray.util.state import get_log, list_logs

    copied = []
    for node in (n for n in ray.nodes() if n.get("Alive")):
        node_id, label = node["NodeID"], _node_label(node["NodeManagerAddress"], node["NodeID"])
        names: set[str] = set()
        for pattern in log_patterns(submission_id):
            for files in list_logs(node_id=node_id, glob_filter=pattern).values():
                names.update(files)
        for name in sorted(names):
            head, text = "", ""
            try:
                # The whole file streams by (the job marker is at its start); only a bounded
                # tail is kept.
                for chunk in get_log(node_id=node_id, filename=name, tail=-1, errors="replace"):
                    if len(head) < HEAD_BYTES:
                        head += chunk[: HEAD_BYTES - len(head)]
                    text = (text + chunk)[-LOCAL_TAIL_BYTES:]
            except Exception as exc:  # one unreadable file must not stop the others
                log.warning("could not read %s on node %s: %s", name, label, exc)
                continue
            if not belongs_to_job(posixpath.basename(name), head, job_id):
                continue
            text = _last_lines(text, max_lines)
            rel = posixpath.join(_logs_prefix(run, label), posixpath.basename(name))
            storage.write_text(rel, text)
            copied.append(storage.uri(rel))
    return copied


def _local_logs_dir() -> tuple[str, str]:
    """(logs dir, node label) of this node's current Ray session."""
    import ray

    node = ray._private.worker._global_node  # the only handle on the session dir
    return node.get_logs_dir_path(), _node_label(node.node_ip_address, ray.get_runtime_context().get_node_id())


def _copy_console_log(storage: Storage, run: str, max_lines: int) -> list[str]:
    """The driver's full console log (core.console: what the quiet terminal did not show)."""
    path = os.environ.get("MEDTUNE_CONSOLE_LOG")
    if not path or not Path(path).is_file():
        return []
    rel = posixpath.join(run_prefix(run), "logs", "driver-console.log")
    storage.write_text(rel, _last_lines(Path(path).read_text(errors="replace"), max_lines))
    return [storage.uri(rel)]


def copy_run_logs(storage: Storage, run: str, *, max_lines: int = MAX_LINES) -> list[str]:
    """Copy the calling Ray job's driver, worker and raylet logs to runs/<run>/logs/.

    Call it from the driver, connected to Ray, after training and on failure (in a
    `finally`). Returns the URIs written (empty when nothing could be copied); never raises.
    """
    import ray

    if not ray.is_initialized():  # asking Ray for the job id would start a new local cluster
        log.warning("not connected to Ray: no run logs to copy")
        return []
    try:
        job_id, submission_id = current_job()
        try:
            copied = copy_via_state_api(storage, run, job_id, submission_id, max_lines=max_lines)
            source = "state-api"
        except Exception as exc:  # no dashboard: this node's files only
            log.info("Ray state API unavailable (%s); copying this node's logs only", exc)
            logs_dir, label = _local_logs_dir()
            copied = copy_logs_from_dir(storage, run, logs_dir, job_id, submission_id, node=label, max_lines=max_lines)
            source = "local"
        copied += _copy_console_log(storage, run, max_lines)
        index: dict[str, Any] = {
            "run": run,
            "ray_job_id": job_id,
            "submission_id": submission_id,
            "source": source,
            "patterns": log_patterns(submission_id),
            "files": copied,
            "max_lines": max_lines,
            "copied_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_json(posixpath.join(run_prefix(run), "logs", "index.json"), index)
        print(f"[medtune] {len(copied)} log file(s) copied to {storage.uri(run_prefix(run), 'logs')}", flush=True)
        return copied
    except Exception as exc:  # best effort: never mask the run's own outcome
        log.warning("could not copy the run's Ray logs to storage: %s", exc)
        return []
