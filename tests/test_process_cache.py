"""What a long-lived Ray worker process keeps between tasks and runs (`process_cache`)."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from ray_jobs.preprocess import process_cache
from ray_jobs.preprocess.process_cache import cached


@pytest.fixture
def empty_caches(monkeypatch):
    monkeypatch.setattr(process_cache, "_BUILT", OrderedDict())


def test_a_built_object_is_reused_and_only_the_most_recent_ones_are_kept(empty_caches):
    builds: list[str] = []

    def get(name: str) -> str:
        return cached(name, lambda: builds.append(name) or name.upper())

    assert [get(name) for name in "abcd"] == ["A", "B", "C", "D"]
    assert get("a") == "A"  # reused, and now the most recent
    get("e")  # one over the limit: "b", the least recently used, goes
    get("b")
    assert builds == ["a", "b", "c", "d", "e", "b"]
    assert len(process_cache._BUILT) == process_cache.BUILT_ENTRIES
