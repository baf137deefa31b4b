"""Exact and near de-duplication across every input file, after the per-row work.

    rows = converted_and_tokenised.materialize()
    rejected = find_duplicates(rows, data)        # row id -> "duplicate" / "near_duplicate"
    marked = mark_duplicates(arrow_block, ref)    # per block, with rejected put in the object store

Rows are cleaned and tokenised in one pass with no barrier in between; duplicates are then
found from small columns only. Exact: (row id, content key) shuffled by a hash of the key in
two rounds of plain Ray tasks (`exact_duplicates`). Near: MinHash signatures (computed in the
per-row pass) banded into LSH band keys, grouped by a bucket of the key; per band group, each
row's earliest similar rows are confirmed against the threshold. Only the ids to reject and
those (earlier, later) pairs, a few per row, reach the driver; the task that counts and splits
each block marks them (a lookup per row, cheaper than materialising the rows again). No single
actor sees every row.

The verdicts are those of de-duplicating before tokenisation: only rows that passed cleaning
count, the lowest row id of a key stays, near-duplicates resolve as one sequential pass in
row-id order would (`clean.near_duplicate_verdicts`), and a duplicate's reason replaces any
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
from ray_jobs.preprocess.process_cache import broadcast_value

KEY_BUCKETS = 64
"""Keys are grouped by a bucket of the key, not the key itself: one pandas call per bucket
instead of one per distinct row."""
MATCHES_PER_BAND = 2
"""Earlier similar rows listed per row and LSH band on the first pass (`clean.earlier_matches`)."""
MATCH_COLUMNS = ["band", "earlier", "later", "more"]
PASSED = "passed_cleaning"
"""Column set by the per-row pass: the row survived reading, conversion and cleaning."""


def _bucket(key: str, buckets: int = KEY_BUCKETS) -> int:
    return zlib.crc32(key.encode()) % buckets


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


def exact_duplicates(blocks: list[Any], parts: int) -> list[str]:
    """The row ids that repeat an earlier row's content key (the lowest row id of a key stays),
    from the materialised blocks' references: a shuffle of (row id, key) partitioned by a hash of
    the key, in two rounds of plain Ray tasks. Each block's keys are cut into `parts`, then each
    part of every block is searched by one task. Ray Data's sort-based groupby did the same in
    1.6 s of a 10 s warm run on 16 CPUs, most of it planning, sampling and scheduling."""
    import ray

    cut = ray.remote(_key_parts).options(num_returns=parts)
    pieces = [cut.remote(block, parts) for block in blocks]
    if parts == 1:
        pieces = [[piece] for piece in pieces]
    search = ray.remote(later_copies)
    found = ray.get([search.remote(*[block_pieces[part] for block_pieces in pieces]) for part in range(parts)])
    return [row_id for row_ids in found for row_id in row_ids]


def _key_parts(block: Any, parts: int) -> Any:
    """The cleaned rows' (row id, content key) of an Arrow block, cut into `parts` by key hash."""
    import pyarrow as pa

    if block.num_rows == 0:  # Ray Data passes an empty block on without its columns
        kept = pa.table({"row_id": pa.array([], pa.string()), "dedupe_key": pa.array([], pa.string())})
        return kept if parts == 1 else (kept,) * parts
    # Select before filtering: the block also holds every row's text and token lists.
    kept = block.select(["row_id", "dedupe_key"]).filter(block.column(PASSED))
    if parts == 1:
        return kept
    part = np.fromiter((_bucket(key, parts) for key in kept.column("dedupe_key").to_pylist()), np.int64, kept.num_rows)
    return tuple(kept.filter(pa.array(part == index)) for index in range(parts))


def later_copies(*pieces: Any) -> list[str]:
    """The row ids in the (row id, content key) Arrow tables `pieces` that repeat an earlier
    row's key (the lowest row id of a key stays)."""
    import pyarrow as pa

    pieces = [piece for piece in pieces if piece.num_rows]  # empty ones may be typed differently
    if not pieces:
        return []
    keys = pa.concat_tables(pieces).to_pandas().sort_values(["dedupe_key", "row_id"], kind="stable")
    return keys.loc[keys["dedupe_key"].duplicated(keep="first"), "row_id"].tolist()


def band_rows(batch: pd.DataFrame, bands: list[tuple[int, int]], skip_ref: Any, keys_ref: Any = None) -> pd.DataFrame:
    """One row per (cleaned row, LSH band): key, bucket, id, signature. Rows in `skip_ref` (rejected
    already) are left out; with `keys_ref`, only the band keys it holds are kept."""
    from ray_jobs.preprocess.clean import band_keys

    skip = broadcast_value(skip_ref)
    keys = None if keys_ref is None else broadcast_value(keys_ref)
    out: dict[str, list] = {"band": [], "bucket": [], "row_id": [], "signature": []}
    for row_id, signature, passed in zip(batch["row_id"], batch["signature"], batch[PASSED]):
        if not passed or row_id in skip:
            continue
        for key in band_keys(np.asarray(signature, dtype=np.uint64), bands):
            if keys is not None and key not in keys:
                continue
            out["band"].append(key)
            out["bucket"].append(_bucket(key))
            out["row_id"].append(row_id)
            out["signature"].append(signature)
    return pd.DataFrame(out)


def band_matches(bucket: pd.DataFrame, threshold: float, limit: int | None, only_ref: Any) -> pd.DataFrame:
    """(band, earlier, later, more) rows of every LSH band group in the bucket
    (`clean.earlier_matches`); `only_ref`, when set, holds the later rows to list in full."""

    from ray_jobs.preprocess.clean import earlier_matches

    only = None if only_ref is None else broadcast_value(only_ref)
    shared = bucket[bucket["band"].duplicated(keep=False)]
    if only is not None:
        shared = shared[shared["band"].isin(shared.loc[shared["row_id"].isin(only), "band"])]
    found = []
    for band, group in shared.groupby("band", sort=False):
        signatures = np.asarray(group["signature"].tolist())
        matches = earlier_matches(group["row_id"].tolist(), signatures, threshold, limit=limit, only=only)
        found += [(band, *match) for match in matches]
    return pd.DataFrame(found, columns=MATCH_COLUMNS)


def mark_duplicates(batch, rejected_ref: Any):
    """Set the reason of every rejected duplicate and drop the de-duplication columns. Arrow in
    and out: the token lists pass through untouched."""
    import pyarrow as pa

    rejected = broadcast_value(rejected_ref)
    batch = batch.drop_columns([c for c in ("signature", "dedupe_key", PASSED) if c in batch.column_names])
    if not rejected or batch.num_rows == 0:
        return batch  # no duplicates, or no rows (and maybe no columns): no lookup per row
    reasons = [
        rejected.get(row_id, reason)
        for row_id, reason in zip(batch.column("row_id").to_pylist(), batch.column("reject_reason").to_pylist())
    ]
    index = batch.column_names.index("reject_reason")
    return batch.set_column(index, "reject_reason", pa.array(reasons, type=pa.string()))


def find_duplicates(rows, data: DataConfig) -> dict[str, str]:
    """Row id -> "duplicate" or "near_duplicate", for every row de-duplication rejects."""
    import ray

    rejected: dict[str, str] = {}
    if not (data.clean.dedupe or data.clean.near_dedupe):
        return rejected
    if data.clean.dedupe:
        blocks = rows.to_arrow_refs()
        parts = max(1, min(len(blocks), int(ray.cluster_resources().get("CPU", 1))))
        rejected.update(dict.fromkeys(exact_duplicates(blocks, parts), "duplicate"))
    if data.clean.near_dedupe:
        rejected.update(dict.fromkeys(_near_duplicates(rows, data, set(rejected)), "near_duplicate"))
    return rejected


def _near_duplicates(rows, data: DataConfig, exact: set[str]) -> set[str]:
    """The near-duplicates to reject. The earliest MATCHES_PER_BAND matches of each row per band
    decide almost every row. The rows they leave undecided get full lists in a second pass over
    only the band groups where their lists were cut, without the rows already known rejected
    (those cannot keep or reject anyone); the verdicts are then the sequential pass's."""
    import ray

    from ray_jobs.preprocess.clean import lsh_bands, near_duplicate_verdicts

    threshold = data.clean.near_dedupe_threshold
    bands = lsh_bands(threshold)

    def matches(limit: int | None, skip: set[str], only: set[str] | None, keys: set[str] | None) -> pd.DataFrame:
        band_kwargs = {"bands": bands, "skip_ref": ray.put(skip), "keys_ref": None if keys is None else ray.put(keys)}
        found = (
            rows.select_columns(["row_id", "signature", PASSED])
            .map_batches(band_rows, fn_kwargs=band_kwargs, batch_format="pandas")
            .groupby("bucket")
            .map_groups(
                band_matches,
                fn_kwargs={"threshold": threshold, "limit": limit, "only_ref": None if only is None else ray.put(only)},
                batch_format="pandas",
            )
        )
        frames = list(found.iter_batches(batch_format="pandas", batch_size=None))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=MATCH_COLUMNS)

    found = matches(MATCHES_PER_BAND, exact, None, None)
    complete: set[str] = set()
    while True:
        cut = found[found["more"].astype(bool) & ~found["later"].isin(complete)]
        truncated = set(cut["later"])
        near, undecided = near_duplicate_verdicts(found, truncated)
        fetch = undecided & truncated  # the others follow once these are decided
        if not fetch:
            return near
        keys = set(cut.loc[cut["later"].isin(fetch), "band"])
        found = pd.concat([found, matches(None, exact | near, fetch, keys)], ignore_index=True)
        complete |= fetch
