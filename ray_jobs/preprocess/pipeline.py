"""The preprocessing stage on Ray Data: raw files -> tokenised, packed Parquet shards.

    python -m ray_jobs.preprocess configs/quickstart/tiny-llama-lora.yaml
    medtune preprocess RECIPE [--set data.packing=false]
    ray job submit --working-dir . -- python -m ray_jobs.preprocess RECIPE

Steps, all inside Ray tasks (nothing but small aggregates reaches the driver):
read (row by row, bad rows quarantined; a line-based file in pieces, one block each, other files
cut into equal blocks once read) -> format adapter -> clean -> PHI scrub -> split -> chat template
+ masking (one task per block for all of these, parsing included for line-based files)
-> exact / near de-duplication across all files (`dedupe.py`) -> pack + write, a task per window
of rows (`packing.py`).

Output, under `<storage>/datasets/<name>/<fingerprint>/`:
`train/*.parquet` (packed rows: input_ids, labels, position_ids, seq_lens),
`eval/*.parquet` (one conversation per row, with messages and meta for generation metrics),
`stats.json`, `rejects.jsonl` (row id + reason, never the row's text) and `manifest.json`,
then the completion marker. The fingerprint covers the input files (path, size, mtime), the
data section of the recipe, the base model and the tokenizer, so an unchanged dataset is
reused, not rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ray_jobs.core.artifacts import DatasetRef
from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.modeling import IGNORE_INDEX, load_tokenizer, resolve_model_dir
from ray_jobs.core.recipe import DataConfig, Recipe
from ray_jobs.core.storage import Storage, dataset_prefix
from ray_jobs.preprocess import readers
from ray_jobs.preprocess.dedupe import PASSED, find_duplicates, mark_duplicates, with_signature
from ray_jobs.preprocess.formats import RowRejected, to_conversation
from ray_jobs.preprocess.packing import int32_list_array, write_packed
from ray_jobs.preprocess.process_cache import cached
from ray_jobs.preprocess.readers import expand_inputs, file_identity, input_names, parse_file
from ray_jobs.preprocess.stats import STATS_COLUMNS, dataset_stats, merge_stats, partial_stats, stat_tags
from ray_jobs.preprocess.tokenize import tokenize_conversations

log = logging.getLogger("medtune.preprocess")

PIPELINE_VERSION = "6"
"""Bump when the output of the same inputs changes, to invalidate old fingerprints."""
BATCH_ROWS = 256
"""Rows per slice of a block handed to the per-row functions (convert, tokenize) inside a task:
it bounds their memory, not how the work spreads; blocks do that (`block_count`)."""
BLOCKS_PER_CPU = 4
"""The rows are cut into this many blocks per CPU of the cluster: enough that cores do not idle
behind one slow block at the end, few enough that per-block costs stay small. Measured on 16
cores, 100k rows: in blocks of 256 rows, the driver's scheduling loop took ~20 blocks/s out of
the splitting task (~5k rows/s, most cores idle) and the dedupe shuffle made 391 x 391 pieces."""
BLOCK_BYTES = 16 << 20
"""...and at most this many input bytes per block, so a task's memory stays bounded on big inputs."""


class PreprocessError(MedtuneError):
    """The stage cannot produce a dataset (too many rejects, no rows left, bad inputs)."""


# ---------------------------------------------------------------------------- reading
def _read_split(files: list[tuple[str, Any, str]], split: str, names: dict[str, str], piece_bytes: int):
    """Raw rows of the given files, parsed row by row inside Ray tasks (line-based files in pieces
    of about `piece_bytes`, one task each). `names` maps each uri to the prefix of its row ids
    (`readers.input_names`)."""
    import ray.data

    def cut_pieces(row: dict[str, Any], remote: bool) -> list[dict[str, Any]]:
        uri = f"s3://{row['path']}" if remote else row["path"]
        pieces = readers.file_pieces(uri, row["bytes"], piece_bytes)
        return [{"path": uri, "bytes": piece, "line": line} for line, piece in pieces]

    def explode(pieces: pd.DataFrame) -> pd.DataFrame:
        rows = [
            parsed
            for uri, data, line in zip(pieces["path"], pieces["bytes"], pieces["line"])
            for parsed in parse_file(uri, data, names[uri], first_line=line)
        ]
        # Object columns: pandas would make a text column with gaps NaN-filled strings (see
        # ConvertBatch._convert).
        frame = pd.DataFrame(rows, columns=["row_id", "record", "reject_reason"], dtype=object)
        return frame.assign(split=split)

    datasets = []
    for remote in (False, True):  # local and S3 files need different filesystems
        group = [f for f in files if f[0].startswith("s3://") == remote]
        if group:
            binary = ray.data.read_binary_files([f[2] for f in group], include_paths=True, filesystem=group[0][1])
            pieces = binary.flat_map(cut_pieces, fn_kwargs={"remote": remote})
            # One piece per block, so each is parsed by its own task. A whole-block map, so Ray
            # fuses it with the per-row maps after it (a row-wise one would stand alone).
            pieces = pieces.repartition(target_num_rows_per_block=1)
            datasets.append(pieces.map_batches(explode, batch_format="pandas", batch_size=None))
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


# ---------------------------------------------------------------------------- per-row work
def _in_eval(row_id: str, seed: int, fraction: float) -> bool:
    digest = zlib.crc32(f"{seed}:{row_id}".encode()) / 0xFFFFFFFF
    return digest < fraction


def convert_batch(batch: pd.DataFrame, data: dict[str, Any]) -> pd.DataFrame:
    converter = cached("convert:" + json.dumps(data, sort_keys=True), lambda: ConvertBatch(data))
    return converter(batch)


def tokenize_batch(batch: pd.DataFrame, **kwargs: Any) -> pd.DataFrame:
    # A Ray task holds one CPU, as Ray's OMP_NUM_THREADS=1 says to numpy, but the Rust tokenizer
    # spreads every batch over a thread per core of the machine: with a task per core, 16 x 16
    # threads on 16 CPUs. It reads the variable at each call; a value set by the user stays.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = cached("tokenize:" + json.dumps(kwargs, sort_keys=True), lambda: TokenizeBatch(**kwargs))
    return tokenizer(batch)


def in_slices(fn: Any, block: pd.DataFrame) -> pd.DataFrame:
    """`fn` over `block` in slices of BATCH_ROWS rows, concatenated: Ray hands whole blocks to
    the per-row maps, and the slices bound their memory."""
    if len(block) <= BATCH_ROWS:
        return fn(block)
    slices = [
        block.iloc[start : start + BATCH_ROWS].reset_index(drop=True) for start in range(0, len(block), BATCH_ROWS)
    ]
    return pd.concat([fn(batch) for batch in slices], ignore_index=True)


class ConvertBatch:
    """Format adapter + cleaning + PHI scrub + split + de-duplication key, per batch."""

    def __init__(self, data: dict[str, Any]):
        from ray_jobs.preprocess.clean import clean_text, content_key
        from ray_jobs.preprocess.phi import build_scrubber

        self.data = DataConfig.model_validate(data)
        self.clean_text = clean_text
        self.content_key = content_key
        self.scrubber = build_scrubber(self.data.phi) if self.data.phi.enabled else None
        audience_prompts = self.data.audience.prompts.values() if self.data.audience else ()
        # The recipe's prompts, raw -> cleaned: they open most rows, and are cleaned once here.
        self.cleaned_prompts = {
            p: clean_text(
                p, strip_html=self.data.clean.strip_html, normalize_whitespace=self.data.clean.normalize_whitespace
            )
            for p in [self.data.system_prompt or "", *audience_prompts]
            if p
        }
        self.config_prompts = set(self.cleaned_prompts.values())

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        data, clean = self.data, self.data.clean
        out = {
            "row_id": row["row_id"],
            "split": row["split"],
            "messages": None,
            "meta": None,
            "stat_tags": [],
            "dedupe_key": row["row_id"],
            "reject_reason": row["reject_reason"] if isinstance(row["reject_reason"], str) else None,
        }
        if out["reject_reason"]:
            return out
        try:
            record = json.loads(row["record"])
            messages, meta = to_conversation(record, data)
            phi: Counter = Counter()
            for message in messages:
                text = self.cleaned_prompts.get(message["content"])
                if text is None:
                    text = self.clean_text(
                        message["content"], strip_html=clean.strip_html, normalize_whitespace=clean.normalize_whitespace
                    )
                if len(text) > clean.max_chars:
                    raise RowRejected("too_long_chars")
                if len(text.strip()) < clean.min_chars and message["role"] != "system":
                    raise RowRejected("too_short")
                message["content"] = text
            if self.scrubber is not None:
                # Gold entities are scrubbed with their row, so they match the scrubbed text
                # (an entity that is itself PHI becomes its tag) and evaluation does not punish
                # a model for not reproducing PHI it never saw.
                # System prompts written in the recipe hold no PHI: only the data's texts are
                # analysed (the recipe's prompt alone is a sixth of a short row's text).
                entities = meta.get("entities") or []
                from_data = [m for m in messages if m["role"] != "system" or m["content"] not in self.config_prompts]
                texts, labels, phi = self.scrubber.scrub_row(
                    [m["content"] for m in from_data], [e["text"] for e in entities]
                )
                for message, text in zip(from_data, texts):
                    message["content"] = text
                for entity, label in zip(entities, labels):
                    entity["text"] = label
            if "reference" in meta and meta["reference"] is not None:
                meta["reference"] = messages[-1]["content"]
        except RowRejected as rejected:
            out["reject_reason"] = rejected.reason
            return out
        if out["split"] == "auto":
            out["split"] = "eval" if _in_eval(row["row_id"], data.split_seed, data.eval_fraction) else "train"
        out.update(
            messages=json.dumps(messages, ensure_ascii=False),
            meta=json.dumps(meta, ensure_ascii=False),
            stat_tags=stat_tags(phi, meta),
        )
        if clean.dedupe:
            out["dedupe_key"] = self.content_key([m["content"] for m in messages if m["role"] != "system"])
        return out

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        return in_slices(self._convert, block)

    def _convert(self, batch: pd.DataFrame) -> pd.DataFrame:
        import pyarrow as pa

        # Object columns throughout (as read): Ray may concatenate several outputs into one block,
        # and a NaN-filled pandas text column beside a None-filled one gives a column Arrow
        # cannot type.
        out = pd.DataFrame([self._one(row) for row in batch.to_dict("records")], dtype=object)
        out[PASSED] = out["reject_reason"].isna()  # what de-duplication counts, whatever tokenising says
        # Typed here: a block whose rows all have no tags would otherwise be Arrow's list<null>.
        out["stat_tags"] = pd.Series(pd.arrays.ArrowExtensionArray(pa.array(out["stat_tags"], pa.list_(pa.string()))))
        return out


class TokenizeBatch:
    """Chat template + prompt masking with the base model's own tokenizer."""

    def __init__(
        self,
        model_dir: str,
        data: dict[str, Any],
        revision: str | None,
        trust_remote_code: bool,
        chat_template: str | None = None,
    ):
        self.data = DataConfig.model_validate(data)
        self.tokenizer = load_tokenizer(model_dir, revision, trust_remote_code, chat_template)

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        return in_slices(self._tokenize, block)

    def _tokenize(self, batch: pd.DataFrame) -> pd.DataFrame:
        reasons, messages = batch["reject_reason"].tolist(), batch["messages"].tolist()
        todo = [i for i, reason in enumerate(reasons) if not isinstance(reason, str)]
        empty = np.zeros(0, dtype=np.int32)
        ids_col, labels_col = [empty] * len(batch), [empty] * len(batch)
        results = tokenize_conversations(
            self.tokenizer,
            [json.loads(messages[i]) for i in todo],
            max_seq_len=self.data.max_seq_len,
            truncation=self.data.truncation,
            train_on_inputs=self.data.train_on_inputs,
            min_tokens=self.data.clean.min_tokens,
            max_tokens=self.data.clean.max_tokens,
        )
        for i, result in zip(todo, results):
            if isinstance(result, RowRejected):
                reasons[i] = result.reason
            else:
                reasons[i] = None
                ids_col[i], labels_col[i] = result
        batch = batch.copy()
        # Arrow int32 lists built from the arrays, which pandas holds and Ray stores as they
        # are: Python lists cost a conversion to lists and another to Arrow (~18 us a row), and
        # numpy arrays would become Ray's tensor extension type, which other Parquet readers
        # (pyarrow, pandas, Spark) do not understand.
        batch["input_ids"] = int32_lists(ids_col)
        batch["labels"] = int32_lists(labels_col)
        batch["reject_reason"] = pd.Series(reasons, index=batch.index, dtype=object)
        batch["num_tokens"] = [len(x) for x in ids_col]
        batch["num_target_tokens"] = [int((x != IGNORE_INDEX).sum()) for x in labels_col]
        return batch


def int32_lists(arrays: list[np.ndarray]) -> pd.Series:
    """A pandas column of Arrow `list<int32>` values, one per array, made without Python lists."""
    return pd.Series(pd.arrays.ArrowExtensionArray(int32_list_array(arrays)))


# ---------------------------------------------------------------------------- the stage
def fingerprint(recipe: Recipe, identities: list[dict[str, Any]], model_dir: str) -> str:
    """`identities`: the input files' `readers.file_identity` (path, size, mtime)."""
    tokenizer_files = sorted(Path(model_dir).glob("tokenizer*")) if Path(model_dir).is_dir() else []
    payload = {
        "version": PIPELINE_VERSION,
        "recipe": recipe.fingerprint_fields(),
        "files": identities,
        "tokenizer": [hashlib.sha256(f.read_bytes()).hexdigest() for f in tokenizer_files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(recipe: Recipe, *, force: bool = False) -> DatasetRef:
    """Preprocess the recipe's data (or reuse an identical earlier result)."""
    import ray

    from ray_jobs.preprocess.progress import reporting_progress

    storage = Storage.from_uri(recipe.storage.root)
    data = recipe.data
    try:
        train_files = expand_inputs(data.train)
        eval_files = expand_inputs(data.eval) if data.eval else []
    except ValueError as exc:
        raise PreprocessError(f"data: {exc}") from None
    model_dir = resolve_model_dir(recipe.model, storage)
    # One stat (an S3 HEAD) per file, for the fingerprint and the block count alike.
    identities = [file_identity(fs, path) for _, fs, path in train_files + eval_files]
    fp = fingerprint(recipe, identities, model_dir)
    prefix = dataset_prefix(recipe.name, fp)
    if storage.is_complete(prefix) and not force:
        log.info("dataset %s is up to date; reusing it", storage.uri(prefix))
        return DatasetRef(
            prefix, storage.uri(prefix), fp, storage.read_json(posixpath.join(prefix, "stats.json")), True
        )
    storage.delete_dir(prefix)

    if not ray.is_initialized():
        ray.init()
    started = time.perf_counter()
    print(f"[medtune] preprocess: reading, cleaning and tokenising {len(train_files + eval_files)} file(s)", flush=True)
    with reporting_progress():  # datasets made here print progress lines whenever they run
        input_bytes = sum(identity["size"] or 0 for identity in identities)
        tokenized = _tokenized_rows(recipe, model_dir, train_files, eval_files, input_bytes).materialize()
        if os.environ.get("MEDTUNE_DATA_STATS"):
            # Where the time went, per Ray Data operator (tasks, actors, wall and CPU time).
            log.warning("Ray Data stats of the tokenised rows:\n%s", tokenized.stats())
        rejected = find_duplicates(tokenized, data)
    parts = _split_blocks(tokenized, rejected)
    totals = merge_stats(ray.get([part.partial for part in parts]))
    tokens, reject_count = sum(totals["tokens"].values()), sum(totals["rejects"].values())
    done = f"{totals['rows_in']:,} rows tokenised in {time.perf_counter() - started:.0f} s, {tokens:,} tokens kept"
    print(f"[medtune] preprocess: {done}, {reject_count:,} rejected; packing", flush=True)
    write_rejects(storage, prefix, totals["rejected_rows"])
    _check_rejects(
        totals,
        data,
        storage.uri(prefix, "rejects.jsonl"),
        [u for u, _, _ in train_files],
        [u for u, _, _ in eval_files],
    )
    packed_rows = _write_splits(parts, data, storage, prefix)
    stats = dataset_stats(totals, data, packed_rows)
    storage.write_json(posixpath.join(prefix, "stats.json"), stats)
    manifest = {
        "name": recipe.name,
        "fingerprint": fp,
        "format": data.format,
        "base_model": recipe.model.base,
        "inputs": [uri for uri, _, _ in train_files + eval_files],
        "pipeline_version": PIPELINE_VERSION,
        "train": "train/",
        "eval": "eval/" if totals["splits"].get("eval") else None,
    }
    storage.write_json(posixpath.join(prefix, "manifest.json"), manifest)
    storage.mark_complete(prefix, {"fingerprint": fp})
    log.info("dataset written to %s: %s", storage.uri(prefix), json.dumps(stats["rows_out"]))
    return DatasetRef(prefix, storage.uri(prefix), fp, stats, False)


def _tokenized_rows(recipe: Recipe, model_dir: str, train_files: list, eval_files: list, input_bytes: int):
    """The Ray Data plan from input files to tokenised rows, each with its split and any reject
    reason (nothing runs until the caller materialises it)."""
    import ray.data

    data = recipe.data
    # Sort-based shuffle: hash-shuffle aggregators reserve CPUs and can starve small clusters.
    # Set before any dataset exists: a dataset keeps the context it was created with.
    context = ray.data.DataContext.get_current()
    context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # The same inputs give the same packed rows in the same order, run after run: packing and
    # the training order follow the row order, and a test or a rerun must not depend on which
    # task happened to finish first.
    context.execution_options.preserve_order = True
    files = train_files + eval_files
    names = input_names([uri for uri, _, _ in files])
    blocks = block_count(input_bytes)
    # Line-based files are cut into about `blocks` pieces, and each piece is one block that its
    # task parses and carries on through the per-row work: no barrier between reading and it.
    # Other files are read whole, so the rows are cut into equal blocks after reading, which
    # waits for every file to be parsed (1.5 s of a 10 s warm run on 16 CPUs when it was done
    # for line-based files too). More files than blocks are cut that way as well: a block per
    # small file would cost a task per file.
    streamed = len(files) <= blocks and all(readers.cut_by_lines(uri) for uri, _, _ in files)
    piece_bytes = readers.PIECE_BYTES
    if streamed and input_bytes:  # sizes unknown (0): the default pieces
        piece_bytes = min(piece_bytes, -(-input_bytes // blocks))
    raw = _read_split(train_files, "auto" if not eval_files else "train", names, piece_bytes)
    if eval_files:
        raw = raw.union(_read_split(eval_files, "eval", names, piece_bytes))
    if not streamed:
        # With fewer rows than blocks, some blocks are empty, and Ray Data hands an empty block
        # on without its columns (its maps never see it): the plain Ray tasks over the blocks
        # (`dedupe.exact_duplicates`, `_split_block`, packing) take such blocks as they are.
        raw = raw.repartition(blocks)
    data_dict = data.model_dump(mode="json")
    if data.phi.enabled and data.phi.actors:
        # A fixed pool bounds how many copies of a large phi.model sit in memory.
        converted = raw.map_batches(
            ConvertBatch,
            fn_constructor_kwargs={"data": data_dict},
            compute=ray.data.ActorPoolStrategy(size=data.phi.actors),
            batch_format="pandas",
            batch_size=None,
        )
    else:
        # Tasks, each worker process building the scrubber (Presidio, its word lists) once
        # and keeping it for later tasks and later runs (`process_cache`). Measured against an
        # autoscaling actor pool on 2 cores, 20k rows: warm runs 38-42 s vs 56-58 s, cold 57
        # vs 68 s; the pool grew to one actor while the stage waited on it, and new actors
        # re-import Presidio on every run.
        converted = raw.map_batches(
            convert_batch, fn_kwargs={"data": data_dict}, batch_format="pandas", batch_size=None
        )
    if data.clean.near_dedupe:
        converted = converted.map_batches(with_signature, batch_format="pandas", batch_size=None)
    # Tokenised in the same tasks as read and converted (Ray fuses the maps, as every one takes
    # whole blocks: a batch size would make Ray gather that many pieces per task): de-duplication
    # comes after, from small columns (`dedupe.py`), so no barrier or shuffle of every row's text
    # sits between.
    return converted.map_batches(
        tokenize_batch,
        batch_format="pandas",
        batch_size=None,
        fn_kwargs={
            "model_dir": model_dir,
            "data": data_dict,
            "revision": recipe.model.revision,
            "trust_remote_code": recipe.model.trust_remote_code,
            "chat_template": recipe.model.chat_template,
        },
    )


def block_count(input_bytes: int) -> int:
    """Blocks for the per-row stages: BLOCKS_PER_CPU per CPU, more when the input is large."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, BLOCKS_PER_CPU * cpus, -(-input_bytes // BLOCK_BYTES))


def _check_rejects(
    totals: dict[str, Any], data: DataConfig, rejects_uri: str, train_uris: list[str], eval_uris: list[str]
) -> None:
    """PreprocessError when nothing was read, too many rows were bad, or no training row is left;
    the message names the input files."""
    rows_in = totals["rows_in"]
    if rows_in == 0:
        files = _listed(train_uris + eval_uris)
        raise PreprocessError(f"data.train: no rows in {files} (an empty file, or a JSON file with an empty list?)")
    # Duplicates are removed, not bad: only bad rows count against the threshold.
    bad = sum(n for reason, n in totals["rejects"].items() if reason not in ("duplicate", "near_duplicate"))
    fraction = bad / rows_in
    if fraction > data.max_reject_fraction:
        worst = ", ".join(f"{r} {n}" for r, n in totals["rejects"].most_common(4))
        raise PreprocessError(
            f"{bad} of {rows_in} rows rejected ({fraction:.1%} > data.max_reject_fraction "
            f"{data.max_reject_fraction:.0%}): {worst}; see {rejects_uri}"
        )
    if totals["splits"].get("train", 0) == 0:
        held_out = totals["splits"].get("eval", 0) if not eval_uris else 0
        if held_out:
            raise PreprocessError(
                f"data.train: the {held_out} usable row(s) of {_listed(train_uris)} were all held out for "
                f"evaluation (data.eval_fraction {data.eval_fraction}); add rows, or name eval files in data.eval"
            )
        raise PreprocessError(f"data.train: no row of {_listed(train_uris)} survived cleaning; see {rejects_uri}")


def _listed(uris: list[str], most: int = 3) -> str:
    """Files named in an error: the first `most`, then how many more."""
    names = ", ".join(uris[:most])
    return names + (f" and {len(uris) - most} more files" if len(uris) > most else "")


EVAL_COLUMNS = ["row_id", "messages", "meta", "input_ids", "labels", "num_tokens"]


@dataclass(frozen=True)
class BlockParts:
    """References to what one materialised block of tokenised rows splits into (`_split_block`)."""

    partial: Any
    train: Any
    train_rows: int
    eval: Any
    eval_rows: int


def _split_blocks(tokenized, rejected: dict[str, str]) -> list[BlockParts]:
    """Each materialised block marked, counted and split, one Ray task per block, in row order.
    One round of plain tasks instead of a Ray Data pass for the counts and another for the
    packing's filter: each of those cost about a second of start-up and tail on 2 or 16 CPUs."""
    import ray

    split = ray.remote(_split_block).options(num_returns=5)
    rejected_ref = ray.put(rejected)
    refs = [split.remote(block, [rejected_ref]) for block in tokenized.to_arrow_refs()]
    counts = ray.get([r[2] for r in refs] + [r[4] for r in refs])
    return [
        BlockParts(r[0], r[1], train_rows, r[3], eval_rows)
        for r, train_rows, eval_rows in zip(refs, counts[: len(refs)], counts[len(refs) :])
    ]


def _split_block(block, rejected_ref: list):
    """(stats summary, kept training rows' token lists, their count, kept eval rows, their count)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if block.num_rows == 0:  # Ray Data passes an empty block on without its columns
        empty = pa.table({"input_ids": int32_list_array([]), "labels": int32_list_array([])})
        return partial_stats(block), empty, 0, pa.table({}), 0
    (ref,) = rejected_ref  # in a list: Ray passes it on as a reference, fetched once per process
    marked = mark_duplicates(block, ref)
    partial = partial_stats(marked.select(list(STATS_COLUMNS)))
    # Masks first, then each part selects its columns before filtering: a filter copies every
    # column it is given, and the block holds each row's text as well as its token lists.
    is_kept = pc.is_null(marked.column("reject_reason"))
    in_train = pc.and_(is_kept, pc.equal(marked.column("split"), "train"))
    in_eval = pc.and_(is_kept, pc.equal(marked.column("split"), "eval"))
    train = marked.select(["input_ids", "labels"]).filter(in_train)
    evals = marked.select(EVAL_COLUMNS).filter(in_eval)
    return partial, train, train.num_rows, evals, evals.num_rows


def _write_splits(parts: list[BlockParts], data: DataConfig, storage: Storage, prefix: str) -> int:
    """Packed training rows and unpacked eval rows as Parquet; returns the packed row count."""
    import ray.data

    packed_rows = write_packed(
        [(part.train, part.train_rows) for part in parts],
        storage,
        posixpath.join(prefix, "train"),
        max_seq_len=data.max_seq_len,
        packing=data.packing,
    )
    evals = [part.eval for part in parts if part.eval_rows]
    if evals:
        ray.data.from_arrow_refs(evals).write_parquet(storage.path(prefix, "eval"), filesystem=storage.filesystem)
    return packed_rows


def write_rejects(storage: Storage, prefix: str, rejected_rows: list[list[str]]) -> None:
    """rejects.jsonl: row id and reason only; rejected rows' text may hold PHI."""
    lines = sorted(json.dumps({"row_id": row_id, "reason": reason}) for row_id, reason in rejected_rows)
    storage.write_text(posixpath.join(prefix, "rejects.jsonl"), "\n".join(lines) + ("\n" if lines else ""))


def main(recipe: Recipe) -> DatasetRef:
    info = run(recipe)
    state = "reused" if info.reused else "written"
    print(f"[medtune] dataset {state}: {info.uri}  rows {info.stats['rows_out']}  rejected {info.stats['rejected']}")
    return info
