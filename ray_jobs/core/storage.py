"""One URI layer for local directories and s3:// prefixes, used by every stage.

    store = Storage.from_uri("s3://bucket/medtune")      # or "./medtune-output"
    store.upload_dir(local_dir, "adapters/ner/v1")        # then writes the marker
    store.is_complete("adapters/ner/v1")                  # readers check this first

Design decisions:
- pyarrow filesystems, because Ray Data and Ray Train take the very same object
  (`filesystem=` / `RunConfig(storage_filesystem=)`): one S3 client configuration for all.
- Endpoint and credentials only from the standard AWS chain: `AWS_ENDPOINT_URL_S3` or
  `AWS_ENDPOINT_URL` for MinIO/Ceph/test servers, keys from the environment, profile or
  instance role (IRSA on EKS). A recipe file never carries secrets.
- A tree is complete only once its marker (`_COMPLETE`, a small JSON file) exists. It is
  written after every other file, so a crash mid-upload leaves a tree readers ignore.
- Trees are uploaded file by file through output streams that are closed explicitly, and each
  stored size is checked, not with `pyarrow.fs.copy_files`: copy_files drops the error of an
  S3 upload that fails (arrow logs "Error ignored when destroying file" and carries on, with or
  without threads), so a server error mid-upload left a tree marked complete without the file
  (tests/test_storage_faults.py). `copy_tree` is the one upload path, for Ray Train's
  checkpoints too.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

COMPLETE_MARKER = "_COMPLETE"


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parsed.netloc
        options["scheme"] = parsed.scheme
        # Test servers and most MinIO set-ups use path-style addressing.
        options["force_virtual_addressing"] = False
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=5))


COPY_CHUNK = 16 * 1024 * 1024
UPLOAD_THREADS = 8
UPLOAD_ATTEMPTS = 3
"""Tries per file; each try is itself retried by the AWS SDK (AwsStandardS3RetryStrategy)."""


def _copy_file(source: str, filesystem: pafs.FileSystem, destination: str) -> None:
    size = os.path.getsize(source)
    for attempt in range(UPLOAD_ATTEMPTS):
        try:
            # Closing the stream (the with block) finishes the upload and raises its error.
            with open(source, "rb") as reader, filesystem.open_output_stream(destination) as writer:
                while chunk := reader.read(COPY_CHUNK):
                    writer.write(chunk)
            stored = filesystem.get_file_info(destination).size
            if stored != size:
                raise OSError(f"{stored} bytes stored of {size}")
            return
        except OSError as exc:
            if attempt == UPLOAD_ATTEMPTS - 1:
                raise OSError(f"uploading {source} to {destination} failed: {exc}") from exc
            time.sleep(2**attempt)


def copy_tree(local_dir: str | Path, filesystem: pafs.FileSystem, destination: str) -> None:
    """Upload every file under `local_dir` to `destination` on `filesystem`, several at a
    time; raises OSError naming the first file that could not be stored whole."""
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    for folder in sorted({posixpath.dirname(p.relative_to(local_dir).as_posix()) for p in files}):
        filesystem.create_dir(posixpath.join(destination, folder) if folder else destination, recursive=True)
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        uploads = [
            pool.submit(
                _copy_file, str(p), filesystem, posixpath.join(destination, p.relative_to(local_dir).as_posix())
            )
            for p in files
        ]
        for upload in uploads:
            upload.result()


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


@dataclass(frozen=True)
class Storage:
    """A root URI and the filesystem that reaches it.

    `path(...)` gives filesystem paths (what pyarrow, Ray Data and Ray Train want);
    `uri(...)` gives user-facing URIs (what goes into logs, lineage and manifests).
    """

    root_uri: str
    filesystem: pafs.FileSystem
    root_path: str

    @classmethod
    def from_uri(cls, uri: str) -> Storage:
        if is_remote(uri):
            return cls(uri.rstrip("/"), s3_filesystem(), uri[len("s3://") :].rstrip("/"))
        local = str(Path(uri).expanduser().resolve())
        return cls(local, pafs.LocalFileSystem(), local)

    @property
    def remote(self) -> bool:
        return is_remote(self.root_uri)

    # ---------------------------------------------------------------- naming
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root_path, *parts) if parts else self.root_path

    def uri(self, *parts: str) -> str:
        return posixpath.join(self.root_uri, *parts) if parts else self.root_uri

    # ---------------------------------------------------------------- queries
    def exists(self, rel: str) -> bool:
        return self.filesystem.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the direct children of `rel` (empty when it does not exist)."""
        info = self.filesystem.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in info)

    def list_files(self, rel: str = "") -> list[str]:
        """Every file under `rel`, recursively, as paths relative to `rel`."""
        base = self.path(rel)
        infos = self.filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(posixpath.relpath(i.path, base) for i in infos if i.type == pafs.FileType.File)

    def is_complete(self, rel: str) -> bool:
        return self.exists(posixpath.join(rel, COMPLETE_MARKER))

    def complete_versions(self, rel: str) -> list[str]:
        """Sorted names of the children of `rel` that are complete trees (e.g. adapter versions)."""
        return sorted(v for v in self.listdir(rel) if self.is_complete(posixpath.join(rel, v)))

    def read_marker(self, rel: str) -> dict[str, Any]:
        return json.loads(self.read_text(posixpath.join(rel, COMPLETE_MARKER)))

    # ---------------------------------------------------------------- bytes
    def read_bytes(self, rel: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(rel)) as stream:
            return stream.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self.filesystem.create_dir(posixpath.dirname(target), recursive=True)
        if self.remote:
            with self.filesystem.open_output_stream(target) as stream:
                stream.write(data)
            return
        # Local: write beside the target and rename, so a reader never sees half a file.
        tmp = f"{target}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, payload: Any) -> None:
        self.write_text(rel, json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def mark_complete(self, rel: str, info: dict[str, Any] | None = None) -> None:
        """Write the completion marker of tree `rel`. Call it after every other file."""
        # The nonce makes every completion distinct, so caches keyed on the marker refresh
        # even when a tree is replaced twice within one second.
        payload = {
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "nonce": uuid.uuid4().hex,
            **(info or {}),
        }
        self.write_json(posixpath.join(rel, COMPLETE_MARKER), payload)

    # ---------------------------------------------------------------- trees
    def upload_dir(
        self, local_dir: str | Path, rel: str, *, complete: bool = True, info: dict[str, Any] | None = None
    ) -> str:
        """Copy a local tree to `rel` and (by default) mark it complete; returns its URI.

        An existing marker is removed first, so a tree being replaced is never read as
        complete while its files change.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"not a directory: {local_dir}")
        self.delete_file(posixpath.join(rel, COMPLETE_MARKER))
        target = self.path(rel)
        self.filesystem.create_dir(target, recursive=True)
        try:
            copy_tree(local_dir, self.filesystem, target)  # S3 hiccups are retried per file
        except OSError as exc:
            raise OSError(f"{self.uri(rel)} is incomplete: {exc}") from exc
        if complete:
            self.mark_complete(rel, info)
        return self.uri(rel)

    def download_dir(self, rel: str, local_dir: str | Path, *, require_complete: bool = False) -> Path:
        """Copy the tree at `rel` into `local_dir` (created); returns `local_dir`."""
        if require_complete and not self.is_complete(rel):
            raise FileNotFoundError(f"{self.uri(rel)} is not complete (no {COMPLETE_MARKER} marker)")
        if not self.exists(rel):
            raise FileNotFoundError(f"{self.uri(rel)} does not exist")
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            shutil.copytree(self.path(rel), local_dir, dirs_exist_ok=True)
            return local_dir
        try:  # reads do raise their errors (only copy_files' uploads drop them)
            pafs.copy_files(
                self.path(rel),
                str(local_dir),
                source_filesystem=self.filesystem,
                destination_filesystem=pafs.LocalFileSystem(),
                use_threads=True,
            )
        except OSError as exc:
            raise OSError(f"downloading {self.uri(rel)} failed: {exc}") from exc
        return local_dir

    def local_view(self, rel: str, cache_dir: str | Path) -> Path:
        """A local directory holding tree `rel`: the tree itself when storage is local,
        otherwise a cached download (refreshed when the marker changes)."""
        if not self.remote:
            return Path(self.path(rel))
        cache = Path(cache_dir)
        stamp = cache / COMPLETE_MARKER
        marker = self.read_text(posixpath.join(rel, COMPLETE_MARKER)) if self.is_complete(rel) else None
        if marker is not None and stamp.exists() and stamp.read_text() == marker:
            return cache
        # Download beside the cache and move it in whole: the tree's marker comes down first
        # (it sorts first), so a download that failed midway into the cache itself left a cache
        # whose stamp matched, and the next call served its half-written files.
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.parent / f".{cache.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            self.download_dir(rel, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        try:
            partial.rename(cache)
        except OSError:  # another process on this node moved its whole copy in first
            shutil.rmtree(partial, ignore_errors=True)
        return cache

    def delete_file(self, rel: str) -> None:
        try:
            self.filesystem.delete_file(self.path(rel))
        except (FileNotFoundError, OSError):
            pass

    def delete_dir(self, rel: str) -> None:
        try:
            self.filesystem.delete_dir(self.path(rel))
        except (FileNotFoundError, OSError):
            pass


# ---------------------------------------------------------------- storage layout
def dataset_prefix(name: str, fingerprint: str) -> str:
    return posixpath.join("datasets", name, fingerprint)


def run_prefix(run: str) -> str:
    return posixpath.join("runs", run)


def adapter_prefix(name: str, version: str | None = None) -> str:
    return posixpath.join("adapters", name, version) if version else posixpath.join("adapters", name)


def report_prefix(run: str) -> str:
    return posixpath.join("reports", run)


def model_prefix(name: str) -> str:
    return posixpath.join("models", name)
