"""The adapter registry: which adapter version a request's `model` names, and getting it onto
this node and into the engine once, however many requests ask for it."""

from __future__ import annotations

import asyncio
import json

import pytest

from ray_jobs.core.storage import Storage, adapter_prefix
from ray_jobs.serve.protocol import APIError
from ray_jobs.serve.registry import BASE_TARGET, AdapterRegistry


class RecordingEngine:
    """The two engine calls the registry makes, recorded (the real engines are exercised by
    test_serve.py and test_serve_vllm_gpu.py; here what matters is how often they are asked)."""

    def __init__(self):
        self.loaded: dict[str, str] = {}
        self.load_calls: list[str] = []

    def loaded_adapters(self) -> list[str]:
        return list(self.loaded)

    async def load_adapter(self, key: str, local_path: str) -> float:
        self.load_calls.append(key)
        await asyncio.sleep(0.01)  # a load takes time: concurrent requests must not start a second
        self.loaded[key] = local_path
        return 0.01


def publish(storage: Storage, tmp_path, name: str, version: str, complete: bool = True) -> None:
    folder = tmp_path / "src" / name / version
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    storage.upload_dir(folder, adapter_prefix(name, version), complete=complete)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    storage = Storage.from_uri(str(tmp_path / "storage"))
    publish(storage, tmp_path, "ner", "v1")
    publish(storage, tmp_path, "ner", "v2")
    publish(storage, tmp_path, "ner", "v3", complete=False)  # an upload still running
    registry = AdapterRegistry(storage, "tiny-base", refresh_s=3600)
    registry.engine = RecordingEngine()
    return registry


def test_a_bare_name_is_its_latest_complete_version(registry):
    assert registry.resolve("ner") == ("ner", "v2")
    assert registry.resolve("ner@v1") == ("ner", "v1")
    assert registry.resolve("tiny-base:ner") == ("ner", "v2")
    assert registry.resolve("tiny-base") is None and registry.resolve("base") is None


@pytest.mark.parametrize(
    "model, status",
    [("ner@v3", 404), ("nobody", 404), ("other-base:ner", 404), ("../etc", 400), ("NER", 400), ("ner@v 1", 400)],
)
def test_unknown_incomplete_and_unsafe_names_are_refused(registry, model, status):
    with pytest.raises(APIError) as raised:
        registry.resolve(model)
    assert raised.value.status == status


def test_a_version_published_after_start_is_served_without_waiting_for_a_refresh(registry, tmp_path):
    assert registry.resolve("ner") == ("ner", "v2")
    publish(registry.storage, tmp_path, "ner", "v4")
    assert registry.resolve("ner@v4") == ("ner", "v4")  # named: listed again at once


def test_concurrent_requests_load_an_adapter_once_and_later_ones_skip_the_engine(registry):
    async def scenario():
        first = await asyncio.gather(*(registry.load("ner") for _ in range(8)))
        later = await asyncio.gather(*(registry.load("ner@v2") for _ in range(8)))
        return first, later

    first, later = asyncio.run(scenario())
    assert {target.key for target in first + later} == {"ner@v2"}
    assert registry.engine.load_calls == ["ner@v2"], "one engine load for 16 requests"
    assert first[0].local_path.endswith("ner/v2") and (registry.engine.loaded["ner@v2"] == first[0].local_path)


def test_an_adapter_the_engine_evicted_is_loaded_again(registry):
    asyncio.run(registry.load("ner"))
    registry.engine.loaded.clear()  # the engine's LRU removed it
    asyncio.run(registry.load("ner"))
    assert registry.engine.load_calls == ["ner@v2", "ner@v2"]


def test_the_base_model_needs_no_adapter(registry):
    assert asyncio.run(registry.load("tiny-base")) is BASE_TARGET
    assert registry.engine.load_calls == []
