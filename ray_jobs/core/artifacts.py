"""What the stages hand each other through storage: a preprocessed dataset and published
adapter versions. A stage receives a DatasetRef or an adapter name and never calls the stage
that made it; entry points (ray_jobs.pipeline, cli, quickstart) chain the stages."""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
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


LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class Lineage:
    """Where an adapter or merged model came from: one schema for every producer.

    `kind` says which producer wrote it: "trained" (a training run: run, dataset, recipe hash,
    metrics), "combined" (peft's weighted combination: `sources` with weights) or "merged" (an
    adapter merged into its base: `sources` has the one adapter). `parent` is the adapter a
    training run continued from (`lora.init_from`), if any."""

    kind: str
    name: str
    version: str
    base_model: str
    resolved_base_model: str | None = None
    run: str | None = None
    dataset: str | None = None
    dataset_fingerprint: str | None = None
    recipe_hash: str | None = None
    method: str | None = None
    quantization: str | None = None
    dtype: str | None = None
    density: float | None = None
    parent: dict[str, str] | None = None
    sources: tuple[dict[str, Any], ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["sources"] = list(self.sources)
        return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Lineage:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {key: value for key, value in data.items() if key in known}
        data["sources"] = tuple(data.get("sources") or ())
        return cls(**data)

    @classmethod
    def read(cls, storage: Storage, name: str, version: str) -> Lineage:
        return cls.from_json(storage.read_text(posixpath.join(adapter_prefix(name, version), LINEAGE_FILE)))


def stamp_artifact(directory: Path, lineage: Lineage) -> None:
    """Write `lineage.json` into an adapter or model directory about to be published, and
    name the recipe's base (not a local path) in its adapter_config.json: vLLM and Ray Serve
    LLM read the base model from there, and a scratch path would mean nothing to them."""
    config_path = directory / "adapter_config.json"
    if config_path.exists():
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = lineage.base_model
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    (directory / LINEAGE_FILE).write_text(lineage.to_json())
