"""Training against a failing S3 server: a checkpoint upload that fails fails the step, Ray Train
restarts the worker, and the run ends with every checkpoint whole and the adapter published.

The module's Ray cluster starts with AWS_ENDPOINT_URL on `FaultyProxy` in front of the S3 test
server, so the Train workers' own uploads (checkpoints) cross it too. Ray's default checkpoint
upload (`pyarrow.fs.copy_files`) dropped an UploadPart error: the checkpoint was registered
without its weights. medtune uploads checkpoints itself (`trainer.upload_checkpoint`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from faulty_proxy import FaultyProxy
from ray_jobs import pipeline
from ray_jobs.core.recipe import parse_recipe
from ray_jobs.core.storage import Storage, adapter_prefix, run_prefix
from ray_jobs.synthetic import entity_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SDK_ATTEMPTS, OUR_ATTEMPTS = 5, 3
"""The AWS SDK's standard retry strategy tries a request 5 times (storage.s3_filesystem), and
copy_tree tries each file 3 times: 15 refusals in a row fail one checkpoint upload."""


@pytest.fixture(scope="module")
def proxy(s3_server: str):
    with FaultyProxy(s3_server) as running:
        previous = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = running.url
        try:
            yield running
        finally:
            os.environ["AWS_ENDPOINT_URL"] = previous


@pytest.fixture(scope="module")
def cluster(proxy: FaultyProxy, ray_cluster):
    """The local Ray cluster, started after the proxy: its workers inherit the proxied endpoint."""
    yield


def test_a_checkpoint_upload_the_server_refuses_restarts_the_worker_and_no_checkpoint_is_partial(
    proxy: FaultyProxy, cluster, s3_bucket: str, tmp_path: Path
):
    (tmp_path / "notes.json").write_text(json.dumps(entity_rows(48, seed=3)))
    recipe = parse_recipe(
        {
            "name": "faulty-s3",
            "model": {"base": "tiny:llama"},
            "data": {"format": "entities", "train": [str(tmp_path / "notes.json")], "max_seq_len": 256},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "attention"},
            "train": {"max_steps": 4, "micro_batch_size": 2, "checkpoint_every": 2, "cpus_per_worker": 0.5},
            "storage": {"root": f"{s3_bucket}/medtune"},
        }
    )
    # Every try at the first checkpoint's weights is refused, once the whole way through.
    rule = proxy.fail(
        "PUT", r"/runs/[^?]*/checkpoint[^?]*adapter_model\.safetensors", status=500, times=SDK_ATTEMPTS * OUR_ATTEMPTS
    )

    result = pipeline.train(recipe, run_name="faulty-s3-r1")

    assert rule.hits == SDK_ATTEMPTS * OUR_ATTEMPTS and rule.times == 0
    storage = Storage.from_uri(recipe.storage.root)
    assert storage.is_complete(adapter_prefix("faulty-s3", result.adapter_version))
    run = run_prefix("faulty-s3-r1")
    checkpoints = [
        name for name in storage.listdir(run) if name.startswith("checkpoint_") and not name.endswith(".json")
    ]
    assert checkpoints
    for name in checkpoints:  # each checkpoint Ray kept holds the weights it was saved with
        files = storage.list_files(f"{run}/{name}")
        assert any(f.endswith("adapter_model.safetensors") for f in files), (name, files)
