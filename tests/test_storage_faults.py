"""Storage against a failing S3 server: retried where retrying is right, a clear error where it is
not, and a partial tree never marked complete.

The S3 test server sits behind `FaultyProxy` on loopback, which answers 500s and 503s, cuts
connections or slows down the requests its rules match. Every path through Storage that moves a
tree is here: publishing (an adapter, a checkpoint, a dataset: `upload_dir`, marker last) and
reading (`download_dir`, `local_view`, what evaluation, serving and resumption use).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faulty_proxy import FaultyProxy
from ray_jobs.core.storage import COMPLETE_MARKER, Storage

pytestmark = pytest.mark.integration

ADAPTER = "adapters/ner/20261208-000000"
FILES = {
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
    "adapter_model.safetensors": os.urandom(256 * 1024),
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
}


@pytest.fixture
def proxy(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """The proxy, with the AWS endpoint pointed at it for the Storage objects a test makes."""
    with FaultyProxy(s3_server) as running:
        monkeypatch.setenv("AWS_ENDPOINT_URL", running.url)
        yield running


@pytest.fixture
def store(proxy: FaultyProxy, s3_bucket: str) -> Storage:
    return Storage.from_uri(f"{s3_bucket}/medtune")


def local_tree(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (directory / name).write_bytes(data)
    return directory


def read_tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != COMPLETE_MARKER}


# --------------------------------------------------------------------------- publishing
def test_server_errors_during_a_publish_are_retried_and_the_tree_completes(store, proxy, tmp_path):
    rule = proxy.fail("PUT", r"adapter_model\.safetensors", status=500, times=3)
    proxy.fail("PUT", r"adapter_config\.json", status=503, times=2)

    store.upload_dir(local_tree(tmp_path / "adapter"), ADAPTER)

    assert rule.hits == 3 and store.is_complete(ADAPTER)
    assert read_tree(store.download_dir(ADAPTER, tmp_path / "back")) == FILES


def test_a_slow_server_is_waited_for(store, proxy, tmp_path):
    proxy.fail("PUT", r".", action="delay", seconds=0.5)

    store.upload_dir(local_tree(tmp_path / "adapter"), ADAPTER)

    assert store.is_complete(ADAPTER)


def test_a_publish_the_server_keeps_failing_raises_naming_the_file_and_is_never_complete(store, proxy, tmp_path):
    proxy.fail("PUT", r"adapter_model\.safetensors", status=500)

    with pytest.raises(OSError, match=r"adapter_model\.safetensors"):
        store.upload_dir(local_tree(tmp_path / "adapter"), ADAPTER)

    # The other files may be there, the marker is not: readers ignore the tree.
    assert not store.is_complete(ADAPTER)
    assert COMPLETE_MARKER not in store.list_files(ADAPTER)
    with pytest.raises(FileNotFoundError, match="not complete"):
        store.download_dir(ADAPTER, tmp_path / "back", require_complete=True)
    # Once the server is well again, publishing the same tree completes it.
    proxy.clear()
    store.upload_dir(local_tree(tmp_path / "adapter"), ADAPTER)
    assert store.is_complete(ADAPTER)


def test_a_marker_the_server_refuses_leaves_the_tree_incomplete(store, proxy, tmp_path):
    proxy.fail("PUT", COMPLETE_MARKER, status=500)

    with pytest.raises(OSError):
        store.upload_dir(local_tree(tmp_path / "adapter"), ADAPTER)

    assert sorted(store.list_files(ADAPTER)) == sorted(FILES) and not store.is_complete(ADAPTER)


def test_replacing_a_tree_that_fails_midway_leaves_it_incomplete_not_old_and_new_mixed(store, proxy, tmp_path):
    store.upload_dir(local_tree(tmp_path / "v1"), ADAPTER)
    proxy.fail("PUT", r"adapter_model\.safetensors", status=500)

    with pytest.raises(OSError):
        store.upload_dir(local_tree(tmp_path / "v2"), ADAPTER)

    assert not store.is_complete(ADAPTER)


# --------------------------------------------------------------------------- reading
def test_connections_cut_mid_read_are_retried(store, proxy, tmp_path):
    store.upload_dir(local_tree(tmp_path / "adapter"), ADAPTER)
    rule = proxy.fail("GET", r"adapter_model\.safetensors", action="drop", times=2)

    local = store.local_view(ADAPTER, tmp_path / "cache")

    assert rule.hits == 2 and read_tree(local) == FILES


def test_a_server_down_for_reads_is_an_error_naming_the_tree_and_caches_nothing(store, proxy, tmp_path):
    store.upload_dir(local_tree(tmp_path / "adapter"), ADAPTER)
    proxy.fail("GET", r"adapter_model\.safetensors", status=503)

    with pytest.raises(OSError, match=f"downloading {store.uri(ADAPTER)} failed"):
        store.local_view(ADAPTER, tmp_path / "cache")

    # No half-filled cache is taken for the tree: once the server is back, the view is whole.
    proxy.clear()
    assert read_tree(store.local_view(ADAPTER, tmp_path / "cache")) == FILES
