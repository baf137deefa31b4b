"""Readers: local paths, globs and s3:// URIs in JSONL, JSON, Parquet or CSV -> raw records.

Every reader yields rows `{"row_id", "record", "reject_reason"}` where `record` is the raw
record as a JSON string and `row_id` is `<name>:<line or index>`, `name` being the file's
path relative to the deepest folder common to all inputs (`input_names`): unique per input
file, readable in rejects.jsonl, and unchanged when the whole dataset is moved elsewhere
(the train/eval split hashes row ids, so it survives the move). Parsing happens inside Ray tasks, row by row, so one malformed
line, a non-UTF-8 byte or a giant row is quarantined with its reason instead of failing the
whole file (Ray Data's own JSON reader would abort on the first bad line).
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

from ray_jobs.core.storage import is_remote, s3_filesystem

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
}
LINE_FORMATS = ("jsonl", "text")
"""Formats with one record per line, so a file can be parsed in pieces cut at line ends."""
MAX_RECORD_BYTES = 8 * 1024 * 1024
"""A record larger than this is quarantined as `giant_row` before it is parsed."""
PIECE_BYTES = 8 * 1024 * 1024
"""JSON Lines and text files larger than this are parsed in pieces of about this size, each in
its own task: parsing one 100k-row file in one task took 2 s on 16 cores, all others idle."""


class InputError(ValueError):
    """An input path that matches nothing or has an unsupported extension."""


def file_format(path: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".zst"):
        name = name.removesuffix(suffix)
    ext = posixpath.splitext(name)[1]
    if ext not in FORMATS:
        raise InputError(f"{path}: unsupported file type {ext or '(none)'}; use .jsonl, .json, .parquet, .csv or .txt")
    return FORMATS[ext]


def expand_inputs(patterns: list[str]) -> list[tuple[str, pafs.FileSystem, str]]:
    """Resolve paths and globs to (uri, filesystem, fs_path) triples, sorted and de-duplicated."""
    files: dict[str, tuple[str, pafs.FileSystem, str]] = {}
    for pattern in patterns:
        if is_remote(pattern):
            fs = s3_filesystem()
            bare = pattern[len("s3://") :]
            if any(ch in bare for ch in "*?["):
                root = bare.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
                infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
                matched = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, bare)]
            else:
                info = fs.get_file_info(bare)
                if info.type == pafs.FileType.Directory:
                    infos = fs.get_file_info(pafs.FileSelector(bare, recursive=True))
                    matched = [i.path for i in infos if i.type == pafs.FileType.File]
                else:
                    matched = [bare] if info.type == pafs.FileType.File else []
            found = {f"s3://{p}": (f"s3://{p}", fs, p) for p in matched}
        else:
            local = os.path.expanduser(pattern)
            if os.path.isdir(local):
                paths = [os.path.join(r, f) for r, _, fs_ in os.walk(local) for f in fs_]
            else:
                paths = glob.glob(local, recursive=True)
            found = {
                os.path.abspath(p): (os.path.abspath(p), pafs.LocalFileSystem(), os.path.abspath(p))
                for p in paths
                if os.path.isfile(p)
            }
        if not found:
            raise InputError(f"{pattern}: no such file (or the glob matches nothing)")
        files.update({k: v for k, v in found.items() if not posixpath.basename(k).startswith((".", "_"))})
    for uri in files:
        file_format(uri)
    return [files[k] for k in sorted(files)]


def input_names(uris: list[str]) -> dict[str, str]:
    """uri -> the name its row ids carry: the path below the deepest common folder.

    One file keeps its basename (`notes.jsonl`); `a/notes.jsonl` and `b/notes.jsonl` stay
    apart. Inputs with nothing in common (local files mixed with s3:// URIs) keep the full uri.
    """
    folders = [uri.split("/")[:-1] for uri in uris]
    common = 0
    while folders and all(len(f) > common and f[common] == folders[0][common] for f in folders):
        common += 1
    return {uri: "/".join(uri.split("/")[common:]) for uri in uris}


def file_identity(fs: pafs.FileSystem, fs_path: str) -> dict[str, Any]:
    """What the dataset fingerprint knows of an input file: path, size and mtime."""
    info = fs.get_file_info(fs_path)
    mtime = info.mtime.isoformat() if info.mtime is not None else None
    return {"path": fs_path, "size": info.size, "mtime": mtime}


def _row(row_id: str, record: Any = None, reason: str | None = None) -> dict[str, Any]:
    return {
        "row_id": row_id,
        "record": None if reason else json.dumps(record, ensure_ascii=False, default=str),
        "reject_reason": reason,
    }


def _decode(raw: bytes, row_id: str) -> tuple[str | None, dict[str, Any] | None]:
    if len(raw) > MAX_RECORD_BYTES:
        return None, _row(row_id, reason="giant_row")
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        return None, _row(row_id, reason="not_utf8")


def cut_by_lines(uri: str) -> bool:
    """Whether a file of this name is surely cut at line ends by `file_pieces` when it is big
    enough: line-based, and not named as compressed (such a file may arrive still compressed,
    and is then kept whole)."""
    return file_format(uri) in LINE_FORMATS and not uri.lower().endswith((".gz", ".zst"))


def file_pieces(uri: str, data: bytes, piece_bytes: int = PIECE_BYTES) -> list[tuple[int, bytes]]:
    """(number of its first line, bytes) pieces of a file, for parsing in parallel: line-based
    files over `piece_bytes` are cut at line ends; other formats and compressed files stay whole."""
    if file_format(uri) not in LINE_FORMATS or len(data) <= piece_bytes or data[:2] == b"\x1f\x8b":
        return [(1, data)]
    pieces, start, line = [], 0, 1
    while start < len(data):
        end = data.find(b"\n", start + piece_bytes)
        end = len(data) if end < 0 else end + 1
        pieces.append((line, data[start:end]))
        line += data.count(b"\n", start, end)
        start = end
    return pieces


def _lines(data: bytes, name: str, first_line: int = 1) -> Iterator[tuple[str, str | None, dict[str, Any] | None]]:
    """(row id, decoded text or None, rejected row or None) per non-empty line."""
    for number, raw in enumerate(data.split(b"\n"), start=first_line):
        if raw.strip():
            row_id = f"{name}:{number}"
            yield (row_id, *_decode(raw, row_id))


def parse_file(
    uri: str, data: bytes, name: str | None = None, kind: str | None = None, first_line: int = 1
) -> Iterator[dict[str, Any]]:
    """Parse one file's bytes into rows; bad rows come out with a reject_reason.

    Args:
        uri: where the bytes come from; its extension decides the format.
        data: the file's content, or a piece of a line-based file (`file_pieces`).
        name: what row ids start with (default: the basename; see `input_names`).
        kind: the format, overriding the extension.
        first_line: the line number of the piece's first line.
    """
    name = name or posixpath.basename(uri)
    kind = kind or file_format(uri)
    if uri.lower().endswith(".gz") and data[:2] == b"\x1f\x8b":  # not yet decompressed
        import gzip

        data = gzip.decompress(data)
    if kind == "jsonl":
        for row_id, text, rejected in _lines(data, name, first_line):
            if rejected:
                yield rejected
                continue
            try:
                yield _row(row_id, json.loads(text))
            except json.JSONDecodeError:
                yield _row(row_id, reason="invalid_json")
        return
    if kind == "json":
        text, rejected = (
            _decode(data, f"{name}:0")
            if len(data) <= MAX_RECORD_BYTES * 64
            else (None, _row(f"{name}:0", reason="giant_row"))
        )
        if rejected:
            yield rejected
            return
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            # Some ".json" files are really JSON Lines.
            yield from parse_file(uri, data, name, kind="jsonl")
            return
        if isinstance(payload, dict):
            # {"data": [...]} / {"train": [...]}: the one list-valued key holds the rows.
            lists = [v for v in payload.values() if isinstance(v, list)]
            payload = lists[0] if len(lists) == 1 else [payload]
        if not isinstance(payload, list):
            yield _row(f"{name}:0", reason="not_an_object")
            return
        for index, record in enumerate(payload):
            yield _row(f"{name}:{index}", record)
        return
    if kind == "text":
        # A raw corpus for continued pre-training, one row per non-empty line, as Hugging Face
        # `load_dataset("text", ...)` reads it (the audience-adapter seed's medical corpus).
        for row_id, text, rejected in _lines(data, name, first_line):
            yield rejected or _row(row_id, {"text": text.rstrip("\r")})
        return
    if kind == "csv":
        text, rejected = _decode(data, f"{name}:0")
        if rejected:
            yield rejected
            return
        dialect = "excel-tab" if uri.lower().endswith((".tsv", ".tsv.gz")) else "excel"
        reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
        for number, record in enumerate(reader, start=2):  # line 1 is the header
            row_id = f"{name}:{number}"
            if None in record:  # more cells than header columns
                yield _row(row_id, reason="csv_extra_cells")
                continue
            # Cells holding JSON (lists of entities, message lists) are parsed by the format adapter.
            yield _row(row_id, {k: v for k, v in record.items() if k is not None})
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception:  # pyarrow raises several types for corrupt files
            yield _row(f"{name}:0", reason="invalid_parquet")
            return
        for index, record in enumerate(table.to_pylist()):
            yield _row(f"{name}:{index}", _plain(record))
        return
    raise InputError(f"{uri}: unsupported file type")


def _plain(value: Any) -> Any:
    """numpy / arrow scalars and arrays -> JSON-friendly Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
