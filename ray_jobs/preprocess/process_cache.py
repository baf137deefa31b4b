"""One instance per Ray worker process of what is costly to build (a tokenizer, a compiled PHI
scrubber, a broadcast set of row ids): Ray reuses task workers, so later tasks and later runs
on the same cluster find it built, without pinning CPUs to an actor pool.

Both caches keep only the most recently used entries: a long-lived cluster runs many recipes,
and each run broadcasts new id sets (near-dedupe's can hold every rejected row's id), which
would otherwise stay in every worker process for good."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

BUILT_ENTRIES = 4
"""Built objects kept per process: a recipe's converter and tokenizer, and another recipe's."""
BROADCAST_ENTRIES = 4
"""Broadcast values kept per process: the most one pass uses at once (near-dedupe's second
pass reads three)."""

_BUILT: OrderedDict[str, Any] = OrderedDict()
_BROADCAST: OrderedDict[str, Any] = OrderedDict()


def cached(key: str, build: Callable[[], Any]) -> Any:
    """`build()`'s result, built once per process while `key` stays among the recent ones."""
    return _lookup(_BUILT, BUILT_ENTRIES, key, build)


def broadcast_value(ref: Any) -> Any:
    """The value behind a `ray.put` reference, fetched once per process while it stays recent."""
    import ray

    return _lookup(_BROADCAST, BROADCAST_ENTRIES, ref.hex(), lambda: ray.get(ref))


def _lookup(entries: OrderedDict[str, Any], limit: int, key: str, build: Callable[[], Any]) -> Any:
    if key in entries:
        entries.move_to_end(key)
        return entries[key]
    value = entries[key] = build()
    while len(entries) > limit:
        entries.popitem(last=False)
    return value
