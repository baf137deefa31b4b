"""One instance per Ray worker process of what is costly to build (a tokenizer, a compiled PHI
scrubber, a broadcast set of row ids): Ray reuses task workers, so later tasks and later runs
on the same cluster find it built, without pinning CPUs to an actor pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_CACHE: dict[str, Any] = {}


def cached(key: str, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]
