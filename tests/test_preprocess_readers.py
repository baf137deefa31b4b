"""Readers: how raw files become rows, and what each row is called.

A row id (`<name>:<line or index>`) is what rejects.jsonl shows a user and what the
train/eval split and de-duplication order by, so it must be unique across all inputs,
readable, and the same wherever the dataset lives. Unit tests, no Ray.
"""

from __future__ import annotations

import gzip
import json

from ray_jobs.preprocess.readers import file_pieces, input_names, parse_file


def row_ids(uri: str, data: bytes, name: str | None = None) -> list[str]:
    return [row["row_id"] for row in parse_file(uri, data, name)]


def test_a_single_input_is_named_by_its_file_name():
    assert input_names(["/data/notes.jsonl"]) == {"/data/notes.jsonl": "notes.jsonl"}


def test_files_of_the_same_name_in_different_folders_get_different_names():
    names = input_names(["/data/site_a/notes.jsonl", "/data/site_b/notes.jsonl", "/data/extra.csv"])
    assert names == {
        "/data/site_a/notes.jsonl": "site_a/notes.jsonl",
        "/data/site_b/notes.jsonl": "site_b/notes.jsonl",
        "/data/extra.csv": "extra.csv",
    }


def test_names_do_not_change_when_the_dataset_moves():
    here = input_names(["/home/me/corpus/a/notes.jsonl", "/home/me/corpus/b/notes.jsonl"])
    there = input_names(["s3://bucket/corpus/a/notes.jsonl", "s3://bucket/corpus/b/notes.jsonl"])
    assert sorted(here.values()) == sorted(there.values()) == ["a/notes.jsonl", "b/notes.jsonl"]


def test_inputs_with_no_common_folder_keep_their_full_uri():
    uris = ["/data/notes.jsonl", "s3://bucket/notes.jsonl"]
    assert input_names(uris) == {uri: uri for uri in uris}


def test_row_ids_carry_the_name_and_the_line_number():
    data = b'{"text": "a"}\n\n{"text": "b"}\n'
    assert row_ids("/d/site_a/notes.jsonl", data, "site_a/notes.jsonl") == [
        "site_a/notes.jsonl:1",
        "site_a/notes.jsonl:3",
    ]
    assert row_ids("/d/site_a/notes.jsonl", data) == ["notes.jsonl:1", "notes.jsonl:3"]  # default: basename


def test_a_json_file_holding_json_lines_keeps_its_own_name():
    data = b'{"text": "a"}\n{"text": "b"}\n'
    assert row_ids("/d/notes.json", data) == ["notes.json:1", "notes.json:2"]
    assert row_ids("/d/notes.json.gz", gzip.compress(data)) == ["notes.json.gz:1", "notes.json.gz:2"]


def test_json_arrays_and_wrapped_lists_are_indexed_from_zero():
    rows = [{"text": "a"}, {"text": "b"}]
    assert row_ids("/d/x.json", json.dumps(rows).encode()) == ["x.json:0", "x.json:1"]
    assert row_ids("/d/x.json", json.dumps({"data": rows}).encode()) == ["x.json:0", "x.json:1"]


def test_csv_rows_are_numbered_by_their_line_in_the_file():
    data = b"question,answer\nWhat is gout?,A form of arthritis.\nQ2,A2\n"
    rows = list(parse_file("/d/qa.csv", data))
    assert [r["row_id"] for r in rows] == ["qa.csv:2", "qa.csv:3"]  # line 1 is the header
    assert json.loads(rows[0]["record"]) == {"question": "What is gout?", "answer": "A form of arthritis."}


def test_a_text_corpus_is_one_row_per_non_empty_line_as_load_dataset_reads_it():
    data = b"Aspirin inhibits platelet aggregation.\r\n\nMetformin lowers hepatic glucose output.\n"
    rows = list(parse_file("corpus/medical_corpus.txt", data))
    assert [r["row_id"] for r in rows] == ["medical_corpus.txt:1", "medical_corpus.txt:3"]
    assert [json.loads(r["record"]) for r in rows] == [
        {"text": "Aspirin inhibits platelet aggregation."},
        {"text": "Metformin lowers hepatic glucose output."},
    ]
    bad = list(parse_file("corpus.txt", b"ok line\n\xff\xfe broken\n"))
    assert [r["reject_reason"] for r in bad] == [None, "not_utf8"]


def test_a_big_line_file_parsed_in_pieces_gives_the_rows_of_the_whole_file():
    lines = [json.dumps({"text": f"note {i} " + "x" * (i % 37)}) for i in range(200)]
    lines[17] = '{"text": broken'  # a bad line and blank lines keep their numbers across pieces
    lines[90] = ""
    data = ("\n".join(lines) + "\n\n").encode()
    pieces = file_pieces("notes.jsonl", data, piece_bytes=500)

    assert len(pieces) > 5
    assert b"".join(piece for _, piece in pieces) == data
    assert all(piece.endswith(b"\n") for _, piece in pieces)  # cut at line ends only
    from_pieces = [row for line, piece in pieces for row in parse_file("notes.jsonl", piece, first_line=line)]
    assert from_pieces == list(parse_file("notes.jsonl", data))
    assert {"row_id": "notes.jsonl:18", "record": None, "reject_reason": "invalid_json"} in from_pieces


def test_small_compressed_and_non_line_files_stay_whole():
    rows = b'{"text": "a"}\n' * 100
    assert file_pieces("notes.jsonl", rows, piece_bytes=10_000) == [(1, rows)]
    assert file_pieces("notes.jsonl.gz", gzip.compress(rows), piece_bytes=10) == [(1, gzip.compress(rows))]
    assert file_pieces("notes.json", rows, piece_bytes=10) == [(1, rows)]
