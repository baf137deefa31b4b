"""Exact and near de-duplication across every input file, after the per-row work.

    rows = converted_and_tokenised.materialize()
    rows = with_duplicates_marked(rows, find_duplicates(rows, data))   # "duplicate" / "near_duplicate"

Rows are cleaned and tokenised in one pass with no barrier in between; duplicates are then
found from small columns only. Exact: (row id, content key) grouped by a bucket of the key.
Near: MinHash signatures (computed in the per-row pass) banded into LSH band keys, grouped by
a bucket of the key, similar pairs confirmed per group. Only the ids to reject (and the similar
pairs, few) reach the driver; each later pass over the rows marks them on the way (a lookup
per row, cheaper than materialising the rows again). No single actor sees every row.

The verdicts are those of de-duplicating before tokenisation: only rows that passed cleaning
count, the lowest row id of a key stays, near-duplicates resolve as one sequential pass in
row-id order would (`clean.rejected_near_duplicates`), and a duplicate's reason replaces any
tokenisation reason it got (it would not have been tokenised). Tokenising the duplicates is the
price: a few percent of rows in real corpora, against a shuffle of every row's text.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np
import pandas as pd

from ray_jobs.core.recipe import DataConfig
from ray_jobs.preprocess.process_cache import cached

KEY_BUCKETS = 64
"""Keys are grouped by a bucket of the key, not the key itself: one pandas call per bucket
instead of one per distinct row."""
PASSED = "passed_cleaning"
"""Column set by the per-row pass: the row survived reading, conversion and cleaning."""


def _bucket(key: str) -> int:
    return zlib.crc32(key.encode()) % KEY_BUCKETS


def with_signature(batch: pd.DataFrame) -> pd.DataFrame:
    """The MinHash signature of each cleaned row's non-system text (empty for rejected rows)."""
    from ray_jobs.preprocess.clean import minhash_signature

    batch = batch.copy()
    batch["signature"] = [
        minhash_signature(" ".join(m["content"] for m in json.loads(messages) if m["role"] != "system")).tolist()
        if passed
        else []
        for messages, passed in zip(batch["messages"], batch[PASSED])
    ]
    return batch


def key_buckets(batch: pd.DataFrame) -> pd.DataFrame:
    """(row id, content key, bucket) of each cleaned row."""
    keep = batch[batch[PASSED]]
    buckets = [_bucket(str(key)) for key in keep["dedupe_key"]]
    return pd.DataFrame(
        {"row_id": keep["row_id"].tolist(), "dedupe_key": keep["dedupe_key"].tolist(), "bucket": buckets}
    )


def later_copies(bucket: pd.DataFrame) -> pd.DataFrame:
    """The row ids that repeat an earlier row's key (the lowest row id of a key stays)."""
    bucket = bucket.sort_values(["dedupe_key", "row_id"], kind="stable")
    repeated = bucket["dedupe_key"].duplicated(keep="first")
    return pd.DataFrame({"row_id": bucket.loc[repeated, "row_id"].tolist()})


def band_rows(batch: pd.DataFrame, bands: list[tuple[int, int]], exact_ref: Any) -> pd.DataFrame:
    """One row per (cleaned row that is no exact duplicate, LSH band): key, bucket, id, signature."""
    import ray

    from ray_jobs.preprocess.clean import band_keys

    exact = cached(f"dedupe:{exact_ref.hex()}", lambda: ray.get(exact_ref))
    out: dict[str, list] = {"band": [], "bucket": [], "row_id": [], "signature": []}
    for row_id, signature, passed in zip(batch["row_id"], batch["signature"], batch[PASSED]):
        if not passed or row_id in exact:
            continue
        for key in band_keys(np.asarray(signature, dtype=np.uint64), bands):
            out["band"].append(key)
            out["bucket"].append(_bucket(key))
            out["row_id"].append(row_id)
            out["signature"].append(signature)
    return pd.DataFrame(out)


def similar_pairs(bucket: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """(earlier, later) row-id pairs that share a band and pass the similarity threshold."""
    from ray_jobs.preprocess.clean import similar_pairs as confirmed

    shared = bucket[bucket["band"].duplicated(keep=False)]
    pairs = []
    for _, group in shared.groupby("band", sort=False):
        pairs += confirmed(group["row_id"].tolist(), np.asarray(group["signature"].tolist()), threshold)
    return pd.DataFrame(pairs, columns=["earlier", "later"])


def mark_duplicates(batch: pd.DataFrame, rejected_ref: Any) -> pd.DataFrame:
    """Set the reason of every rejected duplicate and drop the de-duplication columns."""
    import ray

    rejected = cached(f"dedupe:{rejected_ref.hex()}", lambda: ray.get(rejected_ref))
    batch = batch.drop(columns=[c for c in ("signature", "dedupe_key", PASSED) if c in batch])
    reasons = batch["row_id"].map(rejected)
    hit = reasons.notna()
    batch.loc[hit, "reject_reason"] = reasons[hit]
    return batch


def find_duplicates(rows, data: DataConfig) -> dict[str, str]:
    """Row id -> "duplicate" or "near_duplicate", for every row de-duplication rejects."""
    import ray

    from ray_jobs.preprocess.clean import lsh_bands, rejected_near_duplicates

    rejected: dict[str, str] = {}
    if not (data.clean.dedupe or data.clean.near_dedupe):
        return rejected
    if data.clean.dedupe:
        copies = (
            rows.select_columns(["row_id", "dedupe_key", PASSED])
            .map_batches(key_buckets, batch_format="pandas")
            .groupby("bucket")
            .map_groups(later_copies, batch_format="pandas")
            .take_all()
        )
        rejected.update((row["row_id"], "duplicate") for row in copies)
    if data.clean.near_dedupe:
        threshold = data.clean.near_dedupe_threshold
        pairs = (
            rows.select_columns(["row_id", "signature", PASSED])
            .map_batches(
                band_rows,
                fn_kwargs={"bands": lsh_bands(threshold), "exact_ref": ray.put(set(rejected))},
                batch_format="pandas",
            )
            .groupby("bucket")
            .map_groups(similar_pairs, fn_kwargs={"threshold": threshold}, batch_format="pandas")
            .take_all()
        )
        for row_id in rejected_near_duplicates(sorted({(p["earlier"], p["later"]) for p in pairs})):
            rejected[row_id] = "near_duplicate"
    return rejected


def with_duplicates_marked(rows, rejected: dict[str, str]):
    """`rows` with every rejected duplicate's reason set, lazily: each pass that reads the result
    marks the rows it reads."""
    import ray

    if not rejected:
        return rows
    return rows.map_batches(mark_duplicates, fn_kwargs={"rejected_ref": ray.put(rejected)}, batch_format="pandas")
