"""Which adapter a request's `model` names, and getting it onto this node and into the engine.

    registry.resolve("ner")              # ("ner", latest complete version)
    registry.resolve("ner@20250101-1")   # that version, if complete
    registry.resolve("base:ner")         # Ray Serve LLM's form
    await registry.load("ner")           # Target: key, local path, metric tag, version

Adapters live under `<storage>/adapters/<name>/<version>/`; a version counts once its upload
is complete. Version lists are re-read at most every serve.adapter_refresh_s, and at once when
a request names a version not yet seen, so a newly published version is served without a
restart. Names are checked against a strict pattern before they touch storage, so a request
can never reach outside the adapters prefix. Replicas on one node share one download.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

from ray_jobs.core.recipe import NAME_PATTERN
from ray_jobs.core.storage import Storage, adapter_prefix
from ray_jobs.serve.engines.base import AdapterLoadError
from ray_jobs.serve.metrics import BASE_TAG
from ray_jobs.serve.protocol import APIError, not_found

NAME_RE = re.compile(NAME_PATTERN)
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Target:
    """What answers a request: the base model (key None) or one adapter version."""

    key: str | None
    local_path: str | None
    tag: str
    version: str | None


BASE_TARGET = Target(None, None, BASE_TAG, None)


class AdapterRegistry:
    def __init__(self, storage: Storage, base_name: str, refresh_s: float):
        self.storage, self.base_name, self.refresh_s = storage, base_name, refresh_s
        self.versions_cache: dict[str, tuple[float, list[str]]] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.local_paths: dict[str, str] = {}
        """name@version -> its folder on this node, once fetched and loaded."""
        self.engine: Any = None
        """Set once the engine exists (its limits may depend on the adapters fetched first)."""

    def versions(self, name: str, refresh: bool = False) -> list[str]:
        """Complete versions of adapter `name`, oldest first."""
        cached = self.versions_cache.get(name)
        if cached and not refresh and time.monotonic() - cached[0] < self.refresh_s:
            return cached[1]
        versions = self.storage.complete_versions(adapter_prefix(name))
        self.versions_cache[name] = (time.monotonic(), versions)
        return versions

    def resolve(self, model: str) -> tuple[str, str] | None:
        """The request's `model` as (adapter name, version); None for the base model.

        Raises:
            APIError: 400 for a name that is not a safe slug, 404 for an unknown one.
        """
        if model in (self.base_name, "base"):
            return None
        if ":" in model:  # Ray Serve LLM form: base:adapter
            base, _, model = model.rpartition(":")
            if base not in (self.base_name, "base"):
                raise not_found(f"{base}:{model}")
        name, _, version = model.partition("@")
        if not NAME_RE.match(name) or (version and not VERSION_RE.match(version)):
            raise APIError(
                400,
                "invalid model name: adapter names are lower-case letters, digits, '.', '_' "
                "and '-', optionally followed by @version",
                code="invalid_model_name",
                param="model",
            )
        versions = self.versions(name)
        if version and version not in versions:  # maybe published since the last listing
            versions = self.versions(name, refresh=True)
        if not versions:
            raise not_found(model)
        version = version or versions[-1]
        if version not in versions:
            raise APIError(
                404,
                f"adapter {name} has no complete version {version!r}; versions: {versions}",
                code="model_not_found",
                param="model",
            )
        return name, version

    def fetch(self, name: str, version: str) -> str:
        """The adapter version's files on this node (downloaded once per node and version)."""
        from ray_jobs.core.modeling import cache_root, node_lock

        with node_lock(f"adapter-{name}-{version}"):  # replicas on one node share the cache
            local = self.storage.local_view(adapter_prefix(name, version), cache_root() / "adapters" / name / version)
        return str(local)

    async def load(self, model: str) -> Target:
        """Resolve `model` and make it servable; one download and one load per version however
        many requests ask at once.

        Raises:
            APIError: 400/404 from resolve; 500 adapter_load_failed naming why it did not load.
        """
        resolved = await asyncio.to_thread(self.resolve, model)
        if resolved is None:
            return BASE_TARGET
        name, version = resolved
        key = f"{name}@{version}"
        # The hot path: a loaded adapter costs no lock, file lock or engine call. Asking the HF
        # engine would wait for its next decoding step, one request after another per adapter
        # (32 s to first token at 32 concurrent requests on the 8B shape, measured).
        if key in self.local_paths and key in self.engine.loaded_adapters():
            return Target(key, self.local_paths[key], name, version)
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self.local_paths and key in self.engine.loaded_adapters():  # loaded while we waited
                return Target(key, self.local_paths[key], name, version)
            try:
                local = await asyncio.to_thread(self.fetch, name, version)
                await self.engine.load_adapter(key, local)
            except (AdapterLoadError, OSError) as error:
                raise APIError(
                    500, f"adapter {key} could not be loaded: {error}", "server_error", "adapter_load_failed", "model"
                ) from None
        self.local_paths[key] = local
        return Target(key, local, name, version)

    def model_entries(self) -> list[dict[str, Any]]:
        """/v1/models: the base model, then each adapter's versions and its bare name (latest)."""
        base = self.base_name
        data = [{"id": base, "object": "model", "owned_by": "medtune", "root": base}]
        for name in self.storage.listdir("adapters"):
            if not NAME_RE.match(name):
                continue
            versions = self.versions(name, refresh=True)
            for version in versions:
                data.append(
                    {"id": f"{name}@{version}", "object": "model", "owned_by": "medtune", "root": base, "parent": base}
                )
            if versions:
                data.append(
                    {
                        "id": name,
                        "object": "model",
                        "owned_by": "medtune",
                        "root": base,
                        "parent": base,
                        "latest_version": versions[-1],
                    }
                )
        return data
