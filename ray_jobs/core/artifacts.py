"""What the stages hand each other through storage: a preprocessed dataset and published
adapter versions. A stage receives a DatasetRef or an adapter name and never calls the stage
that made it; entry points (ray_jobs.pipeline, cli, quickstart) chain the stages."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.storage import Storage, adapter_prefix


class AdapterNotFoundError(MedtuneError, LookupError):
    """No complete adapter (version) by that name; the message lists the ones that exist."""


@dataclass(frozen=True)
class DatasetRef:
    """Where a preprocessed dataset lives and what it holds (its stats.json)."""

    prefix: str
    uri: str
    fingerprint: str
    stats: dict[str, Any]
    reused: bool

    @property
    def train_path(self) -> str:
        return posixpath.join(self.prefix, "train")

    @property
    def eval_path(self) -> str:
        return posixpath.join(self.prefix, "eval")


def resolve_adapter(storage: Storage, spec: str) -> tuple[str, str]:
    """`name` or `name@version` -> (name, version) of a complete adapter; a bare name is its
    latest complete version (versions sort by name: the trainer names them by time)."""
    name, _, version = spec.partition("@")
    versions = storage.complete_versions(adapter_prefix(name))
    if not versions:
        existing = storage.listdir("adapters")
        raise AdapterNotFoundError(
            f"adapter {name!r} not found under {storage.uri('adapters')}; existing: {existing or 'none'}"
        )
    if version and version not in versions:
        raise AdapterNotFoundError(f"adapter {name} has no complete version {version!r}; versions: {versions}")
    return name, version or versions[-1]
