"""The storage layer: the same tree round-trips through a local directory and through S3.

Every stage hands trees (checkpoints, adapters, datasets) to `Storage`; readers trust a tree
only once its `_COMPLETE` marker exists, so the marker must come last and must disappear
while a tree is being replaced.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import ray_jobs.core.storage as storage_module
from ray_jobs.core.storage import COMPLETE_MARKER, Storage

CHECKPOINT = "runs/ner/checkpoint-000010"


def checkpoint_files(step: int = 10) -> dict[str, bytes]:
    """A nested, checkpoint-like tree: relative path -> content."""
    return {
        "adapter_config.json": json.dumps({"r": 8, "lora_alpha": 16}).encode(),
        "adapter_model.safetensors": bytes(range(256)) * 64 + step.to_bytes(4, "little"),
        "optimizer/state.pt": os.urandom(4096),
        "trainer/rng/rank-0.bin": b"\x00\x01" * 100,
        "trainer/state.json": json.dumps({"global_step": step}).encode(),
    }


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A Storage rooted in a fresh local directory, or under a prefix of a fresh S3 bucket."""
    if request.param == "local":
        return Storage.from_uri(str(tmp_path / "storage-root"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage.from_uri(f"{bucket}/medtune")


# --------------------------------------------------------------------------- round trips
def test_a_checkpoint_tree_round_trips_byte_for_byte(store: Storage, tmp_path: Path):
    files = checkpoint_files()
    uri = store.upload_dir(write_tree(tmp_path / "ckpt", files), CHECKPOINT, info={"step": 10})

    assert uri == store.uri(CHECKPOINT)
    assert uri.startswith("s3://") == store.remote
    assert store.is_complete(CHECKPOINT)
    assert store.list_files(CHECKPOINT) == sorted([*files, COMPLETE_MARKER])
    assert store.listdir(CHECKPOINT) == sorted(
        [COMPLETE_MARKER, "adapter_config.json", "adapter_model.safetensors", "optimizer", "trainer"]
    )
    assert store.listdir("runs/ner") == ["checkpoint-000010"]
    assert store.read_marker(CHECKPOINT)["step"] == 10

    downloaded = store.download_dir(CHECKPOINT, tmp_path / "downloaded", require_complete=True)
    assert read_tree(downloaded) == {**files, COMPLETE_MARKER: store.read_bytes(f"{CHECKPOINT}/{COMPLETE_MARKER}")}


def test_json_round_trips_and_missing_paths_read_as_empty(store: Storage):
    payload = {"loss": 1.25, "steps": [1, 2, 3], "name": "ner"}
    store.write_json("reports/ner/metrics.json", payload)
    assert store.read_json("reports/ner/metrics.json") == payload
    assert store.exists("reports/ner/metrics.json")
    assert not store.exists("reports/ner/absent.json")
    assert store.listdir("nowhere") == []
    assert store.list_files("nowhere") == []
    assert not store.is_complete("nowhere")


def test_write_json_replaces_an_existing_file(store: Storage):
    store.write_json("state.json", {"step": 1})
    store.write_json("state.json", {"step": 2})
    assert store.read_json("state.json") == {"step": 2}
    assert store.list_files() == ["state.json"]  # no temporary files left behind


def test_local_view_gives_the_tree_contents_on_local_disk(store: Storage, tmp_path: Path):
    files = checkpoint_files()
    store.upload_dir(write_tree(tmp_path / "ckpt", files), CHECKPOINT)
    view = store.local_view(CHECKPOINT, tmp_path / "cache")
    assert {k: v for k, v in read_tree(view).items() if k != COMPLETE_MARKER} == files
    if not store.remote:
        assert view == Path(store.path(CHECKPOINT))  # local storage is used in place, not copied


@pytest.mark.integration
def test_an_s3_local_view_is_refreshed_when_the_tree_is_replaced(s3_bucket: str, tmp_path: Path):
    store = Storage.from_uri(s3_bucket)
    store.upload_dir(write_tree(tmp_path / "v1", checkpoint_files(step=1)), CHECKPOINT, info={"version": 1})
    first = read_tree(store.local_view(CHECKPOINT, tmp_path / "cache"))
    store.upload_dir(write_tree(tmp_path / "v2", checkpoint_files(step=2)), CHECKPOINT, info={"version": 2})
    second = read_tree(store.local_view(CHECKPOINT, tmp_path / "cache"))
    assert json.loads(first["trainer/state.json"]) == {"global_step": 1}
    assert json.loads(second["trainer/state.json"]) == {"global_step": 2}


@pytest.mark.integration
def test_an_s3_local_view_is_refreshed_even_within_the_same_second(s3_bucket: str, tmp_path: Path, monkeypatch):
    frozen = time.gmtime()
    monkeypatch.setattr(storage_module.time, "gmtime", lambda *args: frozen)  # both uploads in one second
    store = Storage.from_uri(s3_bucket)
    store.upload_dir(write_tree(tmp_path / "v1", checkpoint_files(step=1)), CHECKPOINT)
    store.local_view(CHECKPOINT, tmp_path / "cache")
    store.upload_dir(write_tree(tmp_path / "v2", checkpoint_files(step=2)), CHECKPOINT)
    view = store.local_view(CHECKPOINT, tmp_path / "cache")
    assert json.loads((view / "trainer/state.json").read_text()) == {"global_step": 2}


# --------------------------------------------------------------------------- the completion marker
def test_a_tree_uploaded_without_completing_is_not_complete(store: Storage, tmp_path: Path):
    store.upload_dir(write_tree(tmp_path / "ckpt", checkpoint_files()), CHECKPOINT, complete=False)
    assert not store.is_complete(CHECKPOINT)
    assert COMPLETE_MARKER not in store.list_files(CHECKPOINT)
    with pytest.raises(FileNotFoundError, match="is not complete"):
        store.download_dir(CHECKPOINT, tmp_path / "out", require_complete=True)
    # Without require_complete the partial tree can still be inspected.
    assert "trainer/state.json" in read_tree(store.download_dir(CHECKPOINT, tmp_path / "out"))


def test_re_uploading_a_tree_removes_its_marker_until_the_upload_completes(store: Storage, tmp_path: Path):
    store.upload_dir(write_tree(tmp_path / "v1", checkpoint_files(step=1)), CHECKPOINT)
    assert store.is_complete(CHECKPOINT)
    store.upload_dir(write_tree(tmp_path / "v2", checkpoint_files(step=2)), CHECKPOINT, complete=False)
    assert not store.is_complete(CHECKPOINT)
    store.mark_complete(CHECKPOINT, {"step": 2})
    assert store.is_complete(CHECKPOINT)
    assert store.read_json(f"{CHECKPOINT}/trainer/state.json") == {"global_step": 2}


def test_the_marker_is_the_last_file_written(tmp_path: Path):
    store = Storage.from_uri(str(tmp_path / "root"))
    store.upload_dir(write_tree(tmp_path / "ckpt", checkpoint_files()), CHECKPOINT)
    root = Path(store.path(CHECKPOINT))
    written = {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    marker_time = written.pop(COMPLETE_MARKER)
    assert all(marker_time >= t for t in written.values())


# --------------------------------------------------------------------------- errors and naming
def test_uploading_a_missing_directory_fails_clearly(store: Storage, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        store.upload_dir(tmp_path / "absent", CHECKPOINT)
    assert not store.exists(CHECKPOINT)


def test_downloading_a_missing_tree_fails_clearly(store: Storage, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.download_dir("runs/absent", tmp_path / "out")


def test_uris_and_filesystem_paths_of_an_s3_root():
    store = Storage.from_uri("s3://bucket/medtune/")
    assert store.remote
    assert isinstance(store.filesystem, pafs.S3FileSystem)
    assert store.uri("adapters", "ner") == "s3://bucket/medtune/adapters/ner"
    assert store.path("adapters", "ner") == "bucket/medtune/adapters/ner"  # what pyarrow and Ray want


def test_a_local_root_is_made_absolute(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = Storage.from_uri("./out")
    assert not store.remote
    assert store.uri("datasets") == str(tmp_path.resolve() / "out" / "datasets")
