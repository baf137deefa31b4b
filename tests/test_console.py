"""The quiet terminal: medtune's lines on screen, everything (those too) in the log file.

The quickstart test checks the same behaviour end to end on a real run; these pin the rules."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs.core.console import LineGate, show_on_stderr, show_on_stdout

REPO = Path(__file__).resolve().parents[1]


def gate(show) -> tuple[LineGate, io.StringIO, io.StringIO]:
    terminal, log = io.StringIO(), io.StringIO()
    return LineGate(terminal, log, show), terminal, log


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("== 2/5 train", "== 2/5 train"),
        ("(RayTrainWorker pid=4242) [medtune] step 5/40 loss 2.1", "[medtune] step 5/40 loss 2.1"),
        ("(MapBatches(tokenize) pid=12, ip=10.0.0.3) [medtune] x", "[medtune] x"),
        ("(RayTrainWorker pid=4242) Setting up process group for: env://", None),
        ("(raylet) Task ServeController.graceful_shutdown failed.", None),
        ("[2026-12-03 23:29:35,621] [WARNING] [real_accelerator.py:213:get_accelerator] Setting ...", None),
    ],
)
def test_stdout_passes_this_process_and_medtunes_worker_lines(line, shown):
    assert show_on_stdout(line) == shown


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("medtune: error: train.lr: must be > 0", "medtune: error: train.lr: must be > 0"),
        ("[medtune] serve stopped", "[medtune] serve stopped"),
        (
            "(ServeReplica:medtune:Api pid=7) [medtune] serve: replica ready in 3 s",
            "[medtune] serve: replica ready in 3 s",
        ),
        ("2026-12-03 17:02:44,905\tINFO streaming_executor.py:215 -- Starting execution", None),
        ("/x/transformers/modeling_utils.py:12: FutureWarning: `foo` is deprecated", None),
        ("(RayTrainWorker pid=1) UserWarning: torch.utils.checkpoint", None),
    ],
)
def test_stderr_passes_only_medtunes_lines(line, shown):
    assert show_on_stderr(line) == shown


def test_every_line_reaches_the_log_and_partial_lines_wait_for_their_end():
    stream, terminal, log = gate(show_on_stderr)
    stream.write("INFO noise\n[medtune] step 1")
    assert terminal.getvalue() == ""
    stream.write("/4\nprogress 10%\rprogress 100%\n")
    assert terminal.getvalue() == "[medtune] step 1/4\n"
    assert log.getvalue() == "INFO noise\n[medtune] step 1/4\nprogress 10%\rprogress 100%\n"


QUIET_SCRIPT = """
import logging, sys, warnings
from ray_jobs.core import console
path = console.quiet("probe", sys.argv[1])
print("== a stage header")
print("(RayTrainWorker pid=1) [medtune] step 1/2", flush=True)
logging.getLogger("ray.data").info("Starting execution of Dataset")
logging.getLogger("ray_jobs.preprocess").info("dataset is up to date")
warnings.warn("library deprecation", FutureWarning)
import os; os.write(2, b"raw C++ line from the core worker\\n")
print("medtune: error: data.train: no such file", file=sys.stderr)
raise RuntimeError("an unexpected crash")
"""


def test_a_quiet_process_shows_medtunes_lines_and_logs_everything(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MEDTUNE_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    (log,) = (tmp_path / "logs").glob("probe-*.log")
    shown = done.stdout + done.stderr
    for line in ("== a stage header", "[medtune] step 1/2", "[medtune] dataset is up to date"):
        assert line in shown
    assert "medtune: error: data.train: no such file" in shown
    assert "RuntimeError: an unexpected crash" in shown and f"full log: {log}" in shown
    for noise in ("Starting execution", "library deprecation", "raw C++ line"):
        assert noise not in shown
        assert noise in log.read_text()


def test_medtune_log_level_shows_everything(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEDTUNE_LOG_LEVEL": "INFO"}
    done = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    shown = done.stdout + done.stderr
    assert "Starting execution" in shown and "raw C++ line" in shown and "library deprecation" in shown
    assert not (tmp_path / "logs").exists()


RAY_SCRIPT = """
import sys
from ray_jobs.core import console
console.quiet("probe", sys.argv[1])  # as the CLI does: before Ray starts
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

ray.init(num_cpus=2, include_dashboard=False)


def loop():
    print("[medtune] step 1/1 loss 1.0000 from the train worker", flush=True)


@ray.remote
def task():
    print("[medtune] a line from a plain task", flush=True)


config = RunConfig(storage_path=sys.argv[1] + "/ray", name="probe")
TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1), run_config=config).fit()
ray.get(task.remote())
print("[medtune] driver done", flush=True)
ray.shutdown()
"""


@pytest.mark.integration
def test_a_line_printed_in_a_ray_train_worker_or_task_is_shown_once(tmp_path: Path):
    # Ray Train's own `print` in its workers writes each line to stdout and logs it to stderr as
    # well: Ray forwarded both, and the quiet terminal showed every training step twice.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("MEDTUNE_LOG_LEVEL", "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_DEDUP_LOGS", "RAY_ADDRESS"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", RAY_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = (done.stdout + done.stderr).splitlines()
    expected = [
        "[medtune] step 1/1 loss 1.0000 from the train worker",
        "[medtune] a line from a plain task",
        "[medtune] driver done",
    ]
    assert [line for line in shown if line in expected] == expected, shown
    assert len(shown) == len(set(shown)), shown
    (log,) = (tmp_path / "logs").glob("probe-*.log")
    forwarded = [line for line in log.read_text().splitlines() if line.endswith(expected[0])]
    assert len(forwarded) == 1, forwarded
