"""The preprocessing stage end to end on a real local Ray cluster.

Each pipeline run costs seconds on a 2-CPU machine, so the cases share a few runs:
a messy corpus (quarantine, de-duplication, PHI, the reject threshold), one dataset spread
over every input file type (reading, masking, packing, fingerprint reuse), files of the same
name in different folders (row ids, near-duplicates across files), one corpus processed by
one Ray task and by many (identical results), and one run with its input and output on the
S3 test server.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
from transformers import AutoTokenizer

from helpers import drifting_notes, near_duplicates_sequentially
from ray_jobs.core.artifacts import DatasetRef
from ray_jobs.core.modeling import tiny_model_name
from ray_jobs.core.recipe import parse_recipe
from ray_jobs.core.storage import COMPLETE_MARKER, Storage, model_prefix
from ray_jobs.preprocess import packing, pipeline, readers, stats
from ray_jobs.preprocess.formats import entities_answer
from ray_jobs.preprocess.readers import expand_inputs, file_identity
from ray_jobs.preprocess.tokenize import IGNORE_INDEX
from ray_jobs.synthetic import entity_rows

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]

ENTITY_PROMPT = "You are a medical entity extractor from clinical texts."
EMAIL, PHONE, REJECTED_EMAIL = "john.doe@example.com", "555-123-4567", "jane.roe@clinic.org"
# The row a new user tried (issue 18): every identifier in it, the name included, must go.
PATIENT, MRN, DOB = "John Q. Smith", "00482913", "03/14/1962"
NAME_NOTE = f"Patient {PATIENT}, MRN {MRN}, DOB {DOB}, asks about statins for Parkinson's disease."


def entity_row(text: str, *entities: tuple[str, str]) -> dict:
    return {"text": text, "entities": [{"label": label, "text": value} for label, value in entities]}


def good_rows(tag: str, count: int) -> list[dict]:
    """Distinct, valid entity rows whose text carries `tag` so each can be found again."""
    drugs = ["metformin", "aspirin", "ibuprofen", "lisinopril", "atorvastatin", "insulin"]
    return [
        entity_row(
            f"Note {tag}{i}: the patient takes {drugs[i % len(drugs)]} for diabetes mellitus.",
            ("Medication", drugs[i % len(drugs)]),
            ("Disease", "diabetes mellitus"),
        )
        for i in range(count)
    ]


def recipe_for(name: str, root: str | Path, train: list[str], **data) -> object:
    return parse_recipe(
        {
            "name": name,
            "model": {"base": "tiny:llama"},
            "data": {"format": "entities", "train": train, "system_prompt": ENTITY_PROMPT, **data},
            "storage": {"root": str(root)},
        }
    )


def dataset_files(root: Path, info: DatasetRef) -> list[Path]:
    return sorted(p for p in (root / info.prefix).rglob("*") if p.is_file())


def read_split(root: Path, info: DatasetRef, split: str) -> pa.Table:
    return pq.read_table(root / info.prefix / split)


def decoded_outputs(root: Path, info: DatasetRef) -> list[str]:
    """Everything the dataset holds as text: decoded training rows and eval conversations."""
    tokenizer = AutoTokenizer.from_pretrained(root / model_prefix(tiny_model_name("llama")))
    texts = [tokenizer.decode(ids) for ids in read_split(root, info, "train").column("input_ids").to_pylist()]
    if (root / info.prefix / "eval").is_dir():
        texts += read_split(root, info, "eval").column("messages").to_pylist()
    return texts


def rejects(root: Path, info: DatasetRef) -> list[dict]:
    return [json.loads(line) for line in (root / info.prefix / "rejects.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- a messy corpus
class MessyCorpus:
    """A JSONL file with one of every kind of bad row, and a JSON file repeating one good row."""

    def __init__(self, directory: Path):
        self.root = directory / "storage"
        good = good_rows("A", 14)
        self.phi_rows = [
            entity_row(f"Reach the patient at {EMAIL} about asthma.", ("Disease", "asthma")),
            entity_row(f"Callback number {PHONE}; asthma is worse.", ("Disease", "asthma")),
            entity_row(NAME_NOTE, ("Person", PATIENT), ("Medication", "statins"), ("Disease", "Parkinson's disease")),
        ]
        self.duplicated = good[3]
        lines: list[bytes] = [json.dumps(row).encode() for row in good[:8]]
        lines.append(b"")  # blank lines are not rows
        bad = {
            "invalid_json": b'{"text": "Truncated line about gout", "entities": [',
            "not_utf8": '{"text": "Caf\xe9 patient with gout", "entities": []}'.encode("latin-1"),
            "missing_field:text": json.dumps({"entities": [{"label": "Disease", "text": "gout"}]}).encode(),
            "entity_not_in_text": json.dumps(
                entity_row(f"Write to {REJECTED_EMAIL}: fever noted.", ("Disease", "malaria"))
            ).encode(),
            "empty_field:text": json.dumps({"text": "", "entities": []}).encode(),
            "wrong_type:text": json.dumps({"text": ["Listed gout"], "entities": []}).encode(),
            # Over readers.MAX_RECORD_BYTES (8 MiB): refused before it is parsed.
            "giant_row": json.dumps(entity_row("Giant gout note. " * 600_000, ("Disease", "gout"))).encode(),
            # Over data.clean.max_tokens (see recipe) but far below max_chars and 8 MiB.
            "too_many_tokens": json.dumps(entity_row("Rambling gout history. " * 60, ("Disease", "gout"))).encode(),
        }
        self.expected_rejects = []
        for reason, line in bad.items():
            lines.append(line)
            self.expected_rejects.append({"row_id": f"a_notes.jsonl:{len(lines)}", "reason": reason})
        lines += [json.dumps(row).encode() for row in good[8:] + self.phi_rows]
        (directory / "a_notes.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        # The second file repeats good[3] (first) and adds two rows of its own.
        (directory / "b_notes.json").write_text(json.dumps([self.duplicated, *good_rows("B", 2)]))
        self.expected_rejects.append({"row_id": "b_notes.json:0", "reason": "duplicate"})
        self.rows_in = len(lines) - 1 + 3
        self.bad_rows = len(bad)
        self.files = [str(directory / "a_notes.jsonl"), str(directory / "b_notes.json")]

    def recipe(self, **data):
        # Good rows are about 90 tokens with the template; the rambling one is over 500.
        return recipe_for("messy", self.root, self.files, clean={"max_tokens": 300}, **data)


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> MessyCorpus:
    return MessyCorpus(tmp_path_factory.mktemp("messy"))


@pytest.fixture(scope="module")
def messy_run(messy: MessyCorpus) -> DatasetRef:
    return pipeline.run(messy.recipe(max_reject_fraction=0.5))


def test_every_bad_row_is_counted_under_its_reason(messy: MessyCorpus, messy_run: DatasetRef):
    stats = messy_run.stats
    assert stats["rejects_by_reason"] == {
        "invalid_json": 1,
        "not_utf8": 1,
        "missing_field:text": 1,
        "entity_not_in_text": 1,
        "empty_field:text": 1,
        "wrong_type:text": 1,
        "giant_row": 1,
        "too_many_tokens": 1,
        "duplicate": 1,
    }
    assert stats["rows_in"] == messy.rows_in
    assert stats["rejected"] == 9
    assert sum(stats["rows_out"].values()) == messy.rows_in - 9
    assert json.loads((messy.root / messy_run.prefix / "stats.json").read_text()) == stats


def test_stats_count_phi_metadata_and_tokens_of_kept_rows_only_across_blocks():
    tags = pa.list_(pa.string())
    first = pa.table(
        {
            "row_id": ["a:1", "a:2", "a:3"],
            "split": ["train", "eval", "train"],
            "reject_reason": pa.array([None, None, "duplicate"], pa.string()),
            "num_tokens": [100, 300, 50],
            "num_target_tokens": [10, 30, 5],
            "stat_tags": pa.array(
                [
                    stats.stat_tags(Counter(name=2, date=1), {"step": "domain_selection", "domain": "AE"}),
                    stats.stat_tags(Counter(), {"category": "drug information", "reference": "x"}),
                    stats.stat_tags(Counter(name=5), {"step": "domain_selection"}),  # a duplicate: not counted
                ],
                tags,
            ),
        }
    )
    # A block with no tags at all, as Arrow may type it when every list is empty.
    second = pa.table(
        {
            "row_id": ["b:1", "b:2"],
            "split": ["train", "auto"],
            "reject_reason": pa.array([None, "invalid_json"], pa.string()),
            "num_tokens": [5000, 0],
            "num_target_tokens": [1000, 0],
            "stat_tags": pa.array([[], []], pa.list_(pa.null())),
        }
    )
    totals = stats.merge_stats([stats.partial_stats(first), stats.partial_stats(second)])
    data = parse_recipe(
        {"name": "s", "model": {"base": "tiny:llama"}, "data": {"format": "entities", "train": "x.jsonl"}}
    ).data
    summary = stats.dataset_stats(totals, data, packed_rows=3)
    assert summary["rows_in"] == 5
    assert summary["rows_out"] == {"train": 2, "eval": 1}
    assert summary["rejects_by_reason"] == {"duplicate": 1, "invalid_json": 1}
    assert sorted(totals["rejected_rows"]) == [["a:3", "duplicate"], ["b:2", "invalid_json"]]
    assert summary["tokens"] == {"train": 5100, "eval": 300}
    assert summary["target_tokens"] == {"train": 1010, "eval": 30}
    assert summary["phi_replacements"] == {"name": 2, "date": 1}
    assert summary["metadata_counts"] == {"step=domain_selection": 1, "domain=AE": 1, "category=drug information": 1}
    histogram = dict(zip(summary["length_histogram"]["bucket_edges"], summary["length_histogram"]["counts"]))
    assert (histogram[64], histogram[256], histogram[4096]) == (1, 1, 1)
    assert sum(histogram.values()) == 3


def test_rejects_jsonl_lists_row_ids_and_reasons_but_no_row_text(messy: MessyCorpus, messy_run: DatasetRef):
    assert sorted(rejects(messy.root, messy_run), key=lambda r: r["row_id"]) == sorted(
        messy.expected_rejects, key=lambda r: r["row_id"]
    )
    raw = (messy.root / messy_run.prefix / "rejects.jsonl").read_bytes()
    for text in (
        "Truncated line",
        "Caf",
        "gout",
        "Listed",
        "Giant",
        "Rambling",
        "fever noted",
        REJECTED_EMAIL,
        "malaria",
    ):
        assert text.encode() not in raw


def test_a_row_repeated_across_files_is_kept_once(messy: MessyCorpus, messy_run: DatasetRef):
    # The copy with the lowest row id (a_notes.jsonl) is kept; the other is a duplicate.
    texts = decoded_outputs(messy.root, messy_run)
    assert sum(text.count(messy.duplicated["text"]) for text in texts) == 1


def test_phi_is_counted_and_replaced_everywhere_in_the_dataset(messy: MessyCorpus, messy_run: DatasetRef):
    # The entity answer repeats the name, so names count in the prompt and in the answer.
    assert messy_run.stats["phi_replacements"] == {"email": 1, "phone": 1, "name": 2, "mrn": 1, "date": 1}
    files = dataset_files(messy.root, messy_run)
    assert any(f.suffix == ".parquet" for f in files) and any(f.name == "rejects.jsonl" for f in files)
    for path in files:
        content = path.read_bytes()
        for value in (EMAIL, PHONE, REJECTED_EMAIL, PATIENT, MRN, DOB):
            assert value.encode() not in content, f"{value} found in {path.name}"
    # Parquet pages may be compressed, so look at the decoded contents too.
    everything = "\n".join(decoded_outputs(messy.root, messy_run))
    assert "Reach the patient at [EMAIL] about asthma." in everything
    assert "Callback number [PHONE]; asthma is worse." in everything
    assert "Patient [NAME], MRN [MRN], DOB [DATE], asks about statins for Parkinson's disease." in everything
    for value in (EMAIL, PHONE, PATIENT, "Smith", MRN, DOB):
        assert value not in everything


def test_an_entity_that_is_phi_becomes_its_tag_in_the_answer_and_the_gold_labels(
    messy: MessyCorpus, messy_run: DatasetRef
):
    answer = entities_answer(
        [
            {"label": "Person", "text": "[NAME]"},
            {"label": "Medication", "text": "statins"},
            {"label": "Disease", "text": "Parkinson's disease"},
        ]
    )
    everything = "\n".join(decoded_outputs(messy.root, messy_run))
    assert answer in everything
    if (messy.root / messy_run.prefix / "eval").is_dir():
        for meta in read_split(messy.root, messy_run, "eval").column("meta").to_pylist():
            assert PATIENT not in meta


def test_no_identifier_reaches_a_log_of_the_run(messy: MessyCorpus, messy_run: DatasetRef):
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert logs
    for path in logs:
        content = path.read_bytes()
        for value in (EMAIL, PHONE, REJECTED_EMAIL, PATIENT, MRN, DOB):
            assert value.encode() not in content, f"{value} found in {path}"


def test_the_dataset_is_marked_complete_with_a_manifest(messy: MessyCorpus, messy_run: DatasetRef):
    store = Storage.from_uri(str(messy.root))
    assert store.is_complete(messy_run.prefix)
    assert store.read_marker(messy_run.prefix)["fingerprint"] == messy_run.fingerprint
    manifest = store.read_json(posixpath.join(messy_run.prefix, "manifest.json"))
    assert manifest["inputs"] == messy.files
    assert manifest["format"] == "entities"
    assert not messy_run.reused


def test_too_many_rejects_fail_the_job_naming_the_counts(messy: MessyCorpus, messy_run: DatasetRef):
    with pytest.raises(pipeline.PreprocessError) as caught:
        pipeline.run(messy.recipe())  # the default data.max_reject_fraction: 5%
    message = str(caught.value)
    # Duplicates are removed, not bad: only the bad rows count against the threshold.
    assert f"{messy.bad_rows} of {messy.rows_in} rows rejected" in message
    assert "data.max_reject_fraction 5%" in message
    assert "rejects.jsonl" in message
    # The failed dataset is never marked complete, so nothing can mistake it for a result.
    store = Storage.from_uri(str(messy.root))
    complete = [name for name in store.listdir("datasets/messy") if store.is_complete(f"datasets/messy/{name}")]
    assert complete == [messy_run.fingerprint]
    # It keeps its rejects.jsonl for the user to read, and no training or eval rows.
    (failed,) = set(store.listdir("datasets/messy")) - set(complete)
    assert store.list_files(f"datasets/messy/{failed}") == ["rejects.jsonl"]


# --------------------------------------------------------------------------- a few rows
@pytest.mark.parametrize(("distinct", "copies"), [(1, 0), (2, 0), (4, 0), (4, 1)])
def test_a_json_file_of_fewer_rows_than_blocks_keeps_every_good_row(tmp_path: Path, distinct: int, copies: int):
    # A JSON array is cut into BLOCKS_PER_CPU blocks per CPU once read (8 here): with fewer rows,
    # some blocks are empty, and Ray Data hands those on without columns. The de-duplication
    # key tasks failed on them ('Field "row_id" does not exist in schema', issue 31).
    rows = good_rows("F", distinct)
    (tmp_path / "notes.json").write_text(json.dumps(rows + rows[:copies]))
    root = tmp_path / "storage"
    recipe = recipe_for("few", root, [str(tmp_path / "notes.json")], eval_fraction=0.0, clean={"dedupe": True})
    assert pipeline.block_count(0) > distinct + copies

    info = pipeline.run(recipe)

    assert info.stats["rows_in"] == distinct + copies
    assert info.stats["rows_out"] == {"train": distinct}
    assert rejects(root, info) == [
        {"row_id": f"notes.json:{distinct + i}", "reason": "duplicate"} for i in range(copies)
    ]
    packed = " ".join(decoded_outputs(root, info))
    assert all(row["text"] in packed for row in rows)


@pytest.mark.parametrize("content", ["[]", ""])
def test_a_file_with_no_rows_fails_with_one_line_naming_it(tmp_path: Path, content: str):
    (tmp_path / "empty.json").write_text(content)
    recipe = recipe_for("none", tmp_path / "storage", [str(tmp_path / "empty.json")], clean={"dedupe": True})

    with pytest.raises(pipeline.PreprocessError) as caught:
        pipeline.run(recipe)

    message = str(caught.value)
    assert message.startswith("data.train: no rows in ") and str(tmp_path / "empty.json") in message
    assert "\n" not in message


def test_every_per_block_task_takes_an_empty_block_without_columns():
    # What Ray Data hands on for a block with no rows: no schema at all.
    from ray_jobs.preprocess import dedupe

    empty = pa.table({})
    keyed = pa.table({"row_id": ["r1", "r2"], "dedupe_key": ["k", "k"], dedupe.PASSED: [True, True]})
    assert dedupe.exact_duplicates([ray.put(empty), ray.put(keyed), ray.put(empty)], 2) == ["r2"]
    assert dedupe.exact_duplicates([ray.put(empty)], 1) == []
    assert dedupe.mark_duplicates(empty, ray.put({"r2": "duplicate"})).num_rows == 0

    partial, train, train_rows, _, eval_rows = pipeline._split_block(empty, [ray.put({"r2": "duplicate"})])
    assert (train.num_rows, train_rows, eval_rows) == (0, 0, 0)
    assert train.column_names == ["input_ids", "labels"]
    totals = stats.merge_stats([partial])
    assert totals["rows_in"] == 0 and not totals["splits"] and totals["histogram"].sum() == 0
    # Packing reads no slice of a block without rows.
    assert packing.windows([0, 2, 0, 1], 2) == [[(1, 0, 2)], [(3, 0, 1)]]


# --------------------------------------------------------------------------- every input type
class MixedInputs:
    """Three rows in each of JSON array, CSV, Parquet and JSONL, all valid."""

    def __init__(self, directory: Path):
        self.root = directory / "storage"
        inputs = directory / "inputs"
        inputs.mkdir()
        self.rows = {kind: good_rows(kind.upper() + "-", 3) for kind in ("json", "csv", "parquet", "jsonl")}
        (inputs / "notes.json").write_text(json.dumps({"data": self.rows["json"]}))
        csv_lines = ["text,entities"] + [
            '"{}","{}"'.format(row["text"], json.dumps(row["entities"]).replace('"', '""')) for row in self.rows["csv"]
        ]
        (inputs / "notes.csv").write_text("\n".join(csv_lines) + "\n")
        pq.write_table(pa.Table.from_pylist(self.rows["parquet"]), inputs / "notes.parquet")
        (inputs / "notes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in self.rows["jsonl"]))
        self.train = [
            str(inputs / "notes.json"),
            str(inputs / "notes.csv"),
            str(inputs / "notes.parquet"),
            str(inputs / "notes.jsonl"),
        ]

    def recipe(self, **data):
        return recipe_for("mixed", self.root, self.train, **{"eval_fraction": 0.0, "max_seq_len": 256, **data})


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> MixedInputs:
    return MixedInputs(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def mixed_run(mixed: MixedInputs) -> DatasetRef:
    return pipeline.run(mixed.recipe())


def test_json_csv_parquet_and_jsonl_inputs_are_all_read(mixed: MixedInputs, mixed_run: DatasetRef):
    assert mixed_run.stats["rows_in"] == 12
    assert mixed_run.stats["rejected"] == 0
    assert mixed_run.stats["rows_out"] == {"train": 12}
    everything = "\n".join(decoded_outputs(mixed.root, mixed_run))
    for kind, rows in mixed.rows.items():
        for row in rows:
            assert everything.count(row["text"]) == 1, f"{kind} row missing or repeated"


def test_packed_rows_hold_each_conversation_with_only_answers_labelled(mixed: MixedInputs, mixed_run: DatasetRef):
    tokenizer = AutoTokenizer.from_pretrained(mixed.root / model_prefix(tiny_model_name("llama")))
    table = read_split(mixed.root, mixed_run, "train").to_pylist()
    assert mixed_run.stats["packing"]["rows"] == len(table)
    answers = []
    for row in table:
        assert len(row["input_ids"]) <= 256
        assert sum(row["seq_lens"]) == len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        assert row["position_ids"].count(0) == len(row["seq_lens"])  # one restart per conversation
        start = 0
        for length in row["seq_lens"]:
            labels = row["labels"][start : start + length]
            answers.append(tokenizer.decode([t for t in labels if t != IGNORE_INDEX]))
            start += length
    expected = [entities_answer(row["entities"]) + "<|eot_id|>" for rows in mixed.rows.values() for row in rows]
    assert sorted(answers) == sorted(expected)  # the CSV's JSON-string entities included


def test_an_unchanged_dataset_is_reused(mixed: MixedInputs, mixed_run: DatasetRef):
    again = pipeline.run(mixed.recipe())
    assert again.reused
    assert (again.fingerprint, again.prefix, again.stats) == (mixed_run.fingerprint, mixed_run.prefix, mixed_run.stats)


def test_the_fingerprint_follows_data_fields_and_input_files(mixed: MixedInputs, mixed_run: DatasetRef):
    model_dir = str(mixed.root / model_prefix(tiny_model_name("llama")))

    def fingerprint_of(recipe) -> str:
        identities = [file_identity(fs, path) for _, fs, path in expand_inputs(mixed.train)]
        return pipeline.fingerprint(recipe, identities, model_dir)

    assert fingerprint_of(mixed.recipe()) == mixed_run.fingerprint
    assert fingerprint_of(mixed.recipe(max_seq_len=128)) != mixed_run.fingerprint
    assert fingerprint_of(mixed.recipe(clean={"dedupe": False})) != mixed_run.fingerprint
    # Training-only settings do not invalidate the data.
    changed_training = parse_recipe({**mixed.recipe().model_dump(mode="json"), "train": {"lr": 1e-5}})
    assert fingerprint_of(changed_training) == mixed_run.fingerprint
    # Touching an input file (new mtime) does.
    jsonl = Path(mixed.train[-1])
    stat = jsonl.stat()
    os.utime(jsonl, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert fingerprint_of(mixed.recipe()) != mixed_run.fingerprint
    finally:
        os.utime(jsonl, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# --------------------------------------------------------------------------- same names, near duplicates
SITE_ROWS = {
    "site_a": [
        entity_row(
            "The patient has severe persistent asthma and uses an albuterol inhaler before exercise.",
            ("Disease", "asthma"),
            ("Medication", "albuterol"),
        ),
        entity_row(
            "Gout flare in the left big toe, treated with colchicine and rest for one week.",
            ("Disease", "gout"),
            ("Medication", "colchicine"),
        ),
        entity_row(
            "Type 2 diabetes mellitus is controlled on metformin with a morning glucose log.",
            ("Disease", "diabetes mellitus"),
            ("Medication", "metformin"),
        ),
    ],
    # The first row repeats site_a's first row with one word changed: a near duplicate.
    "site_b": [
        entity_row(
            "The patient has severe persistent asthma and uses an albuterol inhaler before running.",
            ("Disease", "asthma"),
            ("Medication", "albuterol"),
        ),
        entity_row(
            "Migraine with aura responds to sumatriptan taken at the first sign of headache.",
            ("Disease", "migraine"),
            ("Medication", "sumatriptan"),
        ),
        entity_row(
            "Hypertension is managed with lisinopril and a low salt diet since the last visit.",
            ("Disease", "hypertension"),
            ("Medication", "lisinopril"),
        ),
    ],
}


def test_near_duplicates_in_different_blocks_of_one_file_are_found(tmp_path: Path):
    # 700 distinct rows: the stage cuts them into pipeline.block_count blocks (several per
    # CPU), so row 3 and its near-copy at row 650 are signed and banded by different tasks.
    import random

    rng = random.Random(5)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu"]
    words = sorted({"".join(rng.choices(syllables, k=4)) for _ in range(3000)})
    rows = []
    for _ in range(700):
        text = " ".join(rng.sample(words, 24))
        rows.append(entity_row(f"The patient notes {text}.", ("Finding", text.split()[0])))
    copy = dict(rows[2], text=rows[2]["text"].replace("The patient notes", "Patient notes"))
    rows[649] = copy
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert pipeline.block_count(path.stat().st_size) >= 2

    info = pipeline.run(
        # Also the fixed actor pool for the PHI scrubber (data.phi.actors).
        recipe_for(
            "blocks",
            tmp_path / "storage",
            [str(path)],
            eval_fraction=0.0,
            clean={"near_dedupe": True},
            phi={"actors": 1},
        )
    )

    assert rejects(tmp_path / "storage", info) == [{"row_id": "notes.jsonl:650", "reason": "near_duplicate"}]
    assert info.stats["rows_out"] == {"train": 699}


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_exact_duplicates_spread_over_blocks_and_parts_keep_the_lowest_row_id(parts: int):
    # 40 distinct keys, each on 1-4 rows scattered over 5 blocks (the first copy not always in
    # the first block), plus rows that failed cleaning, whose keys never count.
    import pyarrow as pa

    from ray_jobs.preprocess import dedupe

    rows = [(f"r{index:03d}", f"key-{index * 7 % 40}", index % 11 != 0) for index in range(120)]
    order = sorted(rows, key=lambda row: (row[0][-1], row[0]))  # blocks not in row-id order
    blocks = [
        ray.put(pa.table(dict(zip(["row_id", "dedupe_key", dedupe.PASSED], map(list, zip(*order[start::5]))))))
        for start in range(5)
    ]

    found = dedupe.exact_duplicates(blocks, parts)

    first_of_key: dict[str, str] = {}
    for row_id, key, passed in sorted(rows):
        if passed:
            first_of_key.setdefault(key, row_id)
    expected = sorted(row_id for row_id, key, passed in rows if passed and first_of_key[key] != row_id)
    assert len(expected) > 20
    assert sorted(found) == expected


def test_near_dedupe_across_tasks_gives_the_sequential_verdicts_when_rows_wait_for_full_lists(monkeypatch):
    # Templated notes drifting a word at a time: with one listed match per row and band, many
    # rows are left uncertain and the second pass (full lists for them) decides them.
    import pandas as pd

    from ray_jobs.preprocess import dedupe
    from ray_jobs.preprocess.clean import minhash_signature

    texts = drifting_notes(300)
    frame = pd.DataFrame(
        {
            "row_id": list(texts),
            "signature": [minhash_signature(t).tolist() for t in texts.values()],
            dedupe.PASSED: True,
        }
    )
    data = recipe_for("near", Path("/unused"), ["x.jsonl"], clean={"dedupe": False, "near_dedupe": True}).data
    monkeypatch.setattr(dedupe, "MATCHES_PER_BAND", 1)

    found = dedupe.find_duplicates(ray.data.from_pandas(frame).repartition(6), data)

    expected = near_duplicates_sequentially(texts, data.clean.near_dedupe_threshold)
    assert 0 < len(expected) < len(texts)
    assert found == dict.fromkeys(sorted(expected), "near_duplicate")


def test_a_worker_fetches_a_broadcast_set_once_and_drops_old_runs_ones(monkeypatch):
    from collections import OrderedDict

    from ray_jobs.preprocess import process_cache

    monkeypatch.setattr(process_cache, "_BROADCAST", OrderedDict())
    refs = [ray.put({f"row-{i}"}) for i in range(process_cache.BROADCAST_ENTRIES + 2)]
    fetch = process_cache.broadcast_value

    assert [fetch(ref) for ref in refs] == [{f"row-{i}"} for i in range(len(refs))]
    assert fetch(refs[-1]) is fetch(refs[-1])  # one fetch, one object
    assert list(process_cache._BROADCAST) == [ref.hex() for ref in refs[-process_cache.BROADCAST_ENTRIES :]]


def test_files_of_the_same_name_in_different_folders_and_near_duplicates_across_them(tmp_path: Path):
    # Row ids name each file by its path below the inputs' common folder, so the two
    # notes.jsonl stay apart (they used to collide as `notes.jsonl:1` and crash near-dedupe),
    # and ids survive moving the whole dataset elsewhere.
    train = []
    for site, rows in SITE_ROWS.items():
        (tmp_path / site).mkdir()
        path = tmp_path / site / "notes.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        train.append(str(path))

    info = pipeline.run(
        recipe_for("same-names", tmp_path / "storage", train, eval_fraction=0.0, clean={"near_dedupe": True})
    )

    assert info.stats["rows_out"] == {"train": 5}
    assert rejects(tmp_path / "storage", info) == [{"row_id": "site_b/notes.jsonl:1", "reason": "near_duplicate"}]
    texts = "\n".join(decoded_outputs(tmp_path / "storage", info))
    assert SITE_ROWS["site_a"][0]["text"] in texts and SITE_ROWS["site_b"][0]["text"] not in texts
    for row in SITE_ROWS["site_a"][1:] + SITE_ROWS["site_b"][1:]:
        assert texts.count(row["text"]) == 1


# --------------------------------------------------------------------------- one Ray task or many
def test_many_ray_tasks_produce_the_same_dataset_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Six files of synthetic notes (many exact and near duplicates within and across files)
    # plus a bad row. Processed once with every stage in one task, once in blocks of 16 rows
    # (one task per block, run concurrently on the cluster's workers, each file parsed in
    # pieces). De-duplication, the split, stats, the packed rows and every conversation's
    # tokens must not depend on how the work is spread.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rows = entity_rows(300, seed=3)
    for part in range(6):
        lines = [json.dumps(row) for row in rows[part * 50 : (part + 1) * 50]]
        if part == 4:
            lines.insert(7, '{"text": "Broken line about gout", ')
        (inputs / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    root = tmp_path / "storage"
    recipe = recipe_for(
        "spread", root, [str(inputs / "*.jsonl")], eval_fraction=0.2, max_seq_len=512, clean={"near_dedupe": True}
    )

    def run_in_batches_of(rows_per_task: int) -> dict:
        monkeypatch.setattr(pipeline, "block_count", lambda input_bytes: -(-len(rows) // rows_per_task))
        monkeypatch.setattr(readers, "PIECE_BYTES", rows_per_task * 200)  # 16: each file parsed in ~3 pieces
        info = pipeline.run(recipe, force=True)
        # Token columns are plain int32 lists that any Parquet reader understands (not Ray's
        # tensor extension type), in the packed rows and in the eval rows duplicates were marked in.
        for split, columns in (("train", packing.PACKED_COLUMNS), ("eval", ("input_ids", "labels"))):
            schema = pq.read_schema(next((root / info.prefix / split).glob("*.parquet")))
            assert {name: schema.field(name).type for name in columns} == dict.fromkeys(columns, pa.list_(pa.int32()))
        return {
            "stats": info.stats,
            "rejects": rejects(root, info),
            "packed": sorted(read_split(root, info, "train").to_pylist(), key=json.dumps),
            "eval": sorted(read_split(root, info, "eval").to_pylist(), key=lambda r: r["row_id"]),
        }

    monkeypatch.setattr(packing, "PACK_ROWS", 64)  # several packing batches in both runs
    one = run_in_batches_of(512)  # more than the corpus: every stage gets one block, one task
    many = run_in_batches_of(16)

    assert many["stats"] == one["stats"]  # packing efficiency and packed row count included
    assert many["rejects"] == one["rejects"]
    assert many["packed"] == one["packed"]  # the same packed rows, documents in the same places
    assert many["eval"] == one["eval"]
    assert one["stats"]["packing"]["rows"] > 2
    # The comparison is not vacuous: the corpus exercises every cross-row step.
    reasons = one["stats"]["rejects_by_reason"]
    assert reasons["duplicate"] > 0 and reasons["near_duplicate"] > 0 and reasons["invalid_json"] == 1
    assert one["stats"]["rows_out"]["train"] > 0 and one["stats"]["rows_out"]["eval"] > 0


# --------------------------------------------------------------------------- S3 in, S3 out
def test_a_dataset_read_from_and_written_to_s3(s3_bucket: str, tmp_path: Path):
    bucket = Storage.from_uri(s3_bucket)
    rows = good_rows("S3-", 6)
    bucket.write_text("raw/notes.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    root = f"{s3_bucket}/medtune"

    info = pipeline.run(recipe_for("from-s3", root, [f"{s3_bucket}/raw/*.jsonl"], eval_fraction=0.0))

    assert info.uri == f"{root}/{info.prefix}"
    assert info.stats["rows_in"] == 6 and info.stats["rows_out"] == {"train": 6}
    store = Storage.from_uri(root)
    assert store.is_complete(info.prefix)
    listed = store.list_files(info.prefix)
    assert {"stats.json", "manifest.json", "rejects.jsonl", COMPLETE_MARKER} <= set(listed)
    shards = [name for name in listed if name.startswith("train/") and name.endswith(".parquet")]
    assert shards
    table = pa.concat_tables(pq.read_table(io.BytesIO(store.read_bytes(f"{info.prefix}/{name}"))) for name in shards)
    assert sum(len(lens) for lens in table.column("seq_lens").to_pylist()) == 6
    assert store.read_json(f"{info.prefix}/manifest.json")["inputs"] == [f"{s3_bucket}/raw/notes.jsonl"]
    # The tiny base model was published once to the same storage, complete, for every node.
    assert store.is_complete(model_prefix(tiny_model_name("llama")))


# --------------------------------------------------------------------------- progress lines
PROGRESS_LINE = re.compile(
    r"^\[medtune\] preprocess: (?P<step>[\w +,-]+?)"
    r"(?: starting \((?:\d+m\d\ds|\d+s)\)|: \d+ task\(s\) running for (?:\d+m\d\ds|\d+s), none done yet| (?P<done>[\d,]+)/~(?P<total>[\d,]+) rows "
    r"\(\d+%\), [\d,]+ rows/s(?:, ETA (?P<eta>\d+m\d\ds|\d+s))?)(?:; then (?P<later>.+))?$"
)


def test_a_running_step_reports_rows_done_of_ray_datas_estimate_with_pace_and_eta(monkeypatch, capsys):
    from ray_jobs.preprocess.progress import INTERVAL_ENV, reporting_progress

    def slow_step(batch: dict) -> dict:  # defined here: Ray workers cannot import test modules
        time.sleep(0.05)
        return batch

    def tidy(batch: dict) -> dict:
        return batch

    monkeypatch.setenv(INTERVAL_ENV, "0.3")
    with reporting_progress():
        # Another CPU share keeps Ray from fusing `tidy` into `slow_step`'s operator.
        plan = ray.data.range(400, override_num_blocks=40).map_batches(slow_step).map_batches(tidy, num_cpus=0.5)
    plan.materialize()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[medtune] preprocess:")]

    assert len(lines) >= 2, out
    matches = [PROGRESS_LINE.match(line) for line in lines]
    assert all(matches), lines
    slow_lines = [m for m in matches if "slow_step" in m["step"] and m["done"]]
    assert slow_lines and all(m["total"] == "400" for m in slow_lines), lines
    done = [int(m["done"].replace(",", "")) for m in slow_lines]
    assert done == sorted(done) and done[-1] <= 400
    assert any(m["eta"] for m in slow_lines), lines  # a pace and a total give an ETA
    assert slow_lines[0]["later"] == "tidy", lines  # the steps still to come

    # Datasets made outside the block (training's reads of the result) stay quiet.
    ray.data.range(400, override_num_blocks=40).map_batches(slow_step, batch_size=None).materialize()
    assert "[medtune] preprocess:" not in capsys.readouterr().out


def test_operators_are_named_by_the_steps_a_user_knows_fused_ones_by_each_step():
    from ray_jobs.preprocess.progress import step_name

    assert step_name("StreamingRepartition[num_rows_per_block=256,strict=False]") == "read"
    assert step_name("ReadBinary->SplitBlocks(4)") == "read"
    assert step_name("Foo(12)") == "Foo"
    assert step_name("MapBatches(convert_batch)->MapBatches(tokenize_batch)") == "clean + PHI, tokenise"
    read_and_convert = "MapBatches(explode)->MapBatches(convert_batch)->MapBatches(tokenize_batch)"
    assert step_name(read_and_convert) == "read, clean + PHI, tokenise"
    assert step_name("MapBatches(band_rows)") == "near-dedupe"
    assert step_name("MapBatches(normalise)") == "normalise"
