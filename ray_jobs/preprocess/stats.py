"""stats.json of a preprocessed dataset: counts per split and reject reason, tokens, a length
histogram, PHI replacements, metadata counts and packing efficiency.

Each Ray Data batch is summarised where it lives (`partial_stats`, a few numbers per batch) and
only those summaries reach the driver (`merge_stats`), never the rows.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from ray_jobs.core.recipe import DataConfig

STATS_COLUMNS = ("row_id", "split", "reject_reason", "num_tokens", "num_target_tokens", "phi", "meta")
"""What `partial_stats` reads of a tokenised row."""
LENGTH_BUCKETS = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 1 << 30]
"""Edges of stats.json's token-length histogram (the last bucket is open-ended)."""


def partial_stats(batch: pd.DataFrame) -> pd.DataFrame:
    """Per-batch statistics, summed on the driver (a few numbers per batch), and the batch's
    rejected rows as (row id, reason) for rejects.jsonl: one pass over the rows for both."""
    ok = batch["reject_reason"].isna() if "reject_reason" in batch else pd.Series(True, index=batch.index)
    stats: dict[str, Any] = {
        "rows_in": len(batch),
        "rejects": Counter(batch.loc[~ok, "reject_reason"]),
        "splits": Counter(batch.loc[ok, "split"]),
        "phi": Counter(),
        "tokens": {},
        "target_tokens": {},
        "histogram": [0] * (len(LENGTH_BUCKETS) - 1),
        "meta": Counter(),
        "rejected_rows": [[r, reason] for r, reason in zip(batch.loc[~ok, "row_id"], batch.loc[~ok, "reject_reason"])],
    }
    for split in ("train", "eval"):
        mask = ok & (batch["split"] == split)
        stats["tokens"][split] = int(batch.loc[mask, "num_tokens"].sum())
        stats["target_tokens"][split] = int(batch.loc[mask, "num_target_tokens"].sum())
    counts, _ = np.histogram(batch.loc[ok, "num_tokens"].to_numpy(), bins=LENGTH_BUCKETS)
    stats["histogram"] = counts.tolist()
    for phi in batch.loc[ok, "phi"]:
        stats["phi"].update(json.loads(phi))
    for meta in batch.loc[ok, "meta"]:
        parsed = json.loads(meta)
        for key in ("step", "domain", "pattern", "category", "audience"):
            if key in parsed:
                stats["meta"][f"{key}={parsed[key]}"] += 1
    return pd.DataFrame([{"partial": json.dumps(stats)}])


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
