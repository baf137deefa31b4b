"""stats.json of a preprocessed dataset: counts per split and reject reason, tokens, a length
histogram, PHI replacements, metadata counts and packing efficiency.

Each block of tokenised rows is summarised where it lives (`partial_stats`, a few numbers per
block) and only those summaries reach the driver (`merge_stats`), never the rows.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from ray_jobs.core.recipe import DataConfig

STATS_COLUMNS = ("row_id", "split", "reject_reason", "num_tokens", "num_target_tokens", "stat_tags")
"""What `partial_stats` reads of a tokenised row."""
LENGTH_BUCKETS = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 1 << 30]
"""Edges of stats.json's token-length histogram (the last bucket is open-ended)."""
META_STAT_KEYS = ("step", "domain", "pattern", "category", "audience")
"""The `meta` fields whose values stats.json counts (`metadata_counts`)."""


def stat_tags(phi: Counter[str], meta: dict[str, Any]) -> list[str]:
    """What a converted row adds to stats.json's counts, as tags counted by value: `phi:TYPE`
    once per replacement and `meta:KEY=VALUE` per counted metadata field. Made by the per-row
    pass from its own values: parsing every row's JSON again for the counts cost 7-12 us a row."""
    tags = [f"phi:{phi_type}" for phi_type, n in phi.items() for _ in range(n)]
    return tags + [f"meta:{key}={meta[key]}" for key in META_STAT_KEYS if key in meta]


NO_ROWS: dict[str, Any] = {
    "rows_in": 0,
    "rejects": {},
    "splits": {},
    "phi": {},
    "tokens": {"train": 0, "eval": 0},
    "target_tokens": {"train": 0, "eval": 0},
    "meta": {},
    "rejected_rows": [],
    "histogram": [0] * (len(LENGTH_BUCKETS) - 1),
}
"""`partial_stats` of a block without rows."""


def partial_stats(block) -> str:
    """One Arrow block's statistics as JSON, summed on the driver (a few numbers per block), and
    its rejected rows as (row id, reason) for rejects.jsonl. Arrow compute over the columns; only
    the rejected rows become Python values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if block.num_rows == 0:  # Ray Data passes an empty block on without its columns
        return json.dumps(NO_ROWS)
    reasons = block.column("reject_reason")
    ok = pc.is_null(reasons)
    kept = block.filter(ok)
    rejected = block.select(["row_id", "reject_reason"]).filter(pc.invert(ok))

    def counts(values) -> dict[str, int]:
        if len(values) == 0:
            return {}
        found = pc.value_counts(values)
        return dict(zip(found.field("values").to_pylist(), found.field("counts").to_pylist()))

    tags = counts(pc.list_flatten(kept.column("stat_tags")))
    stats: dict[str, Any] = {
        "rows_in": block.num_rows,
        "rejects": counts(rejected.column("reject_reason")),
        "splits": counts(kept.column("split")),
        "phi": {tag.removeprefix("phi:"): n for tag, n in tags.items() if tag.startswith("phi:")},
        "tokens": {},
        "target_tokens": {},
        "meta": {tag.removeprefix("meta:"): n for tag, n in tags.items() if tag.startswith("meta:")},
        "rejected_rows": [
            [row_id, reason]
            for row_id, reason in zip(
                rejected.column("row_id").to_pylist(), rejected.column("reject_reason").to_pylist()
            )
        ],
    }
    for split in ("train", "eval"):
        in_split = kept.filter(pc.equal(kept.column("split"), split))
        for key, column in (("tokens", "num_tokens"), ("target_tokens", "num_target_tokens")):
            stats[key][split] = pc.sum(in_split.column(column)).as_py() or 0
    lengths = kept.column("num_tokens").cast(pa.int64()).to_numpy()
    stats["histogram"] = np.histogram(lengths, bins=LENGTH_BUCKETS)[0].tolist()
    return json.dumps(stats)


def merge_stats(partials: list[str]) -> dict[str, Any]:
    total: dict[str, Any] = {
        "rows_in": 0,
        "rejects": Counter(),
        "splits": Counter(),
        "phi": Counter(),
        "tokens": Counter(),
        "target_tokens": Counter(),
        "histogram": np.zeros(len(LENGTH_BUCKETS) - 1, dtype=np.int64),
        "meta": Counter(),
        "rejected_rows": [],
    }
    for blob in partials:
        part = json.loads(blob)
        total["rows_in"] += part["rows_in"]
        for key in ("rejects", "splits", "phi", "tokens", "target_tokens", "meta"):
            total[key].update(part[key])
        total["histogram"] += np.asarray(part["histogram"])
        total["rejected_rows"] += part["rejected_rows"]
    return total


def dataset_stats(totals: dict[str, Any], data: DataConfig, packed_rows: int) -> dict[str, Any]:
    """stats.json: counts per split and reject reason, tokens, lengths, PHI and packing."""
    return {
        "rows_in": totals["rows_in"],
        "rows_out": dict(totals["splits"]),
        "rejected": sum(totals["rejects"].values()),
        "rejects_by_reason": dict(totals["rejects"].most_common()),
        "tokens": dict(totals["tokens"]),
        "target_tokens": dict(totals["target_tokens"]),
        "length_histogram": {"bucket_edges": LENGTH_BUCKETS[:-1], "counts": totals["histogram"].tolist()},
        "phi_replacements": dict(totals["phi"]),
        "metadata_counts": dict(totals["meta"]),
        "packing": {
            "enabled": data.packing,
            "max_seq_len": data.max_seq_len,
            "rows": packed_rows,
            "efficiency": round(totals["tokens"].get("train", 0) / max(1, packed_rows * data.max_seq_len), 4),
        },
    }
