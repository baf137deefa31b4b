"""Ctrl-C stops `medtune serve` (and the quickstart's --keep-serving) and the Ray it started,
within seconds, even when a shell started it in the background, which leaves SIGINT ignored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from helpers import free_port
from ray_jobs.core.recipe import parse_recipe, recipe_to_yaml

REPO = Path(__file__).resolve().parents[1]


def ignore_sigint() -> None:
    # What `cmd &` in a non-interactive shell does to the command it starts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
def test_sigint_stops_serve_and_the_ray_it_started(tmp_path: Path, tiny_llama_dir: Path):
    port = free_port()
    recipe = parse_recipe(
        {
            "name": "stop-test",
            "model": {"base": str(tiny_llama_dir)},
            "data": {"format": "chat", "train": "unused.jsonl"},
            "storage": {"root": str(tmp_path / "store")},
            "serve": {"host": "127.0.0.1", "port": port, "cpus_per_replica": 0.5, "adapter_refresh_s": 0},
        }
    )
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe_to_yaml(recipe))
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.serve", str(recipe_file)],
        env=env,
        cwd=REPO,
        preexec_fn=ignore_sigint,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while True:
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.time() < deadline, "serve did not answer within 5 minutes"
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        started = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
        assert started, "serve started no Ray processes of its own"

        stopped_at = time.time()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
        assert time.time() - stopped_at < 60
        assert "serve stopped" in process.stderr.read()
        deadline = time.time() + 30
        while [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]:
            assert time.time() < deadline, "Ray processes outlived the command"
            time.sleep(0.5)
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
