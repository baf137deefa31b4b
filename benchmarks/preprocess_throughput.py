"""Preprocessing throughput: medtune's Ray Data pipeline vs single-process `datasets.map`.

    python benchmarks/preprocess_throughput.py                      # 20k rows: a few minutes on 2 cores
    python benchmarks/preprocess_throughput.py --rows 100000 --out benchmarks/results/preprocess_throughput-cpu-2core.json
    python benchmarks/preprocess_throughput.py --rows 1000000 --engines near-dedupe   # near-dedupe alone, at scale

Every engine gets the same synthetic entity-extraction rows (the Unsloth seed's format, each
row unique so de-duplication keeps them all) as one JSONL file and the same tiny tokenizer
carrying the Llama 3 chat template (built offline), and produces packed training rows
written to Parquet. Throughput is tokens tokenised per second of wall time, reading and
writing included.

Engines:
- `hf-seed`: what the seeds do. `load_dataset("json")`, `map` a function that cleans
  whitespace, renders the chat template and tokenises; pack by concatenating everything
  and cutting `max_seq_len` blocks (`group_texts`, documents attend to each other); no
  masking, PHI scrubbing or de-duplication.
- `hf-same-work`: `datasets.map` over medtune's own per-row code (format adapter, HTML and
  whitespace cleaning, PHI scrub, chat template with assistant-only labels), exact
  de-duplication and boundary-keeping packing, in one process: the same work as medtune,
  without Ray. The gap between this and `medtune-ray` is the engine, not the work.
- `medtune-ray cold`: `pipeline.run` on a fresh local Ray cluster using every core,
  `ray.init` and worker start-up included (what one `python -m ray_jobs.preprocess` costs).
- `medtune-ray warm`: the same recipe again on the same cluster (`force=True`), workers and
  their cached tokenizer already up: the marginal cost on a long-lived cluster.
- `medtune-ray warm regex-phi`: the same with `data.phi.engine: regex`, so the difference to
  `medtune-ray warm` is the cost of Presidio and its name and city lists.
- `medtune-ray warm near-dedupe` (with `--near-dedupe`): the same with `clean.near_dedupe`
  on, so the difference to `medtune-ray warm` is near-dedupe's cost. Alone
  (`--engines near-dedupe`) it is the cluster's first run: `medtune-ray cold near-dedupe`.
Every engine but `hf-seed` runs the recipe's PHI engine (presidio by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENTITY_PROMPT = (
    "You are a medical entity extractor from clinical texts. Extract the entities from the text "
    "and return them in a structured JSON format."
)
CONTEXT = [
    "Seen in clinic today.",
    "Follow-up in two weeks.",
    "No known drug allergies.",
    "Vitals stable, BP 128/82.",
    "Referred by the primary care physician.",
    "Lives alone; independent.",
    "Family history of heart disease.",
    "Non-smoker, drinks socially.",
]


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor() or "unknown",
    )
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal")), 0)
    import datasets
    import ray
    import transformers

    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "datasets": datasets.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def write_rows(path: Path, rows: int, seed: int) -> None:
    """Seed-format entity rows, made unique with a visit number and some clinical context."""
    from ray_jobs.synthetic import entity_rows

    rng = random.Random(seed)
    with path.open("w") as out:
        for index, row in enumerate(entity_rows(rows, seed)):
            context = " ".join(rng.sample(CONTEXT, rng.randint(0, 3)))
            text = f"Visit {index}: {row['text']} {context}".strip()
            out.write(json.dumps({"text": text, "entities": row["entities"]}) + "\n")


def parquet_tokens(directory: Path) -> int:
    import pyarrow.parquet as pq

    return sum(
        sum(len(ids) for ids in pq.read_table(f, columns=["input_ids"]).column("input_ids").to_pylist())
        for f in directory.rglob("*.parquet")
    )


# ---------------------------------------------------------------------------- engines
def hf_seed(data_file: Path, model_dir: str, out_dir: Path, max_seq_len: int) -> dict:
    """The seeds' recipe: load json, map format + template + tokenize, group_texts, save."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(data_file), split="train", cache_dir=str(out_dir / "cache"))

    def format_and_tokenize(batch: dict) -> dict:
        texts = []
        for text, entities in zip(batch["text"], batch["entities"]):
            text = re.sub(r"\s+", " ", text).strip()  # the Elara seed's clean_text
            messages = [
                {"role": "system", "content": ENTITY_PROMPT},
                {"role": "user", "content": text},
                {"role": "assistant", "content": json.dumps({"entities": entities})},
            ]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        return tokenizer(texts, add_special_tokens=False)

    tokenized = dataset.map(format_and_tokenize, batched=True, remove_columns=dataset.column_names)
    tokens = sum(len(ids) for ids in tokenized["input_ids"])

    def group_texts(batch: dict) -> dict:
        ids = [token for row in batch["input_ids"] for token in row]
        usable = len(ids) // max_seq_len * max_seq_len
        blocks = [ids[i : i + max_seq_len] for i in range(0, usable, max_seq_len)]
        return {"input_ids": blocks, "labels": blocks}

    packed = tokenized.map(group_texts, batched=True, batch_size=2048, remove_columns=tokenized.column_names)
    packed.to_parquet(str(out_dir / "train.parquet"))
    return {
        "seconds": time.perf_counter() - start,
        "tokens": tokens,
        "rows_out": len(tokenized),
        "packed_rows": len(packed),
    }


def hf_same_work(data_file: Path, model_dir: str, out_dir: Path, recipe) -> dict:
    """medtune's per-row classes and packing, driven by datasets.map in one process."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import load_dataset

    from ray_jobs.preprocess import packing, pipeline

    start = time.perf_counter()
    data = recipe.data.model_dump(mode="json")
    convert = pipeline.ConvertBatch(data)
    tokenize = pipeline.TokenizeBatch(model_dir, data, None, False)
    dataset = load_dataset("json", data_files=str(data_file), split="train", cache_dir=str(out_dir / "cache"))

    def convert_and_tokenize(batch: dict, indices: list[int]) -> dict:
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        frame = pd.DataFrame(
            {
                "row_id": [f"notes.jsonl:{i + 1}" for i in indices],
                "record": [json.dumps(r) for r in records],
                "reject_reason": None,
                "split": "auto",
            }
        )
        out = tokenize(convert(frame))
        # Arrow, as the Ray pipeline's blocks are: the token lists are not turned into Python.
        return pa.Table.from_pandas(
            out[["row_id", "dedupe_key", "reject_reason", "input_ids", "labels"]], preserve_index=False
        )

    # Named fingerprints: datasets otherwise hashes each function with dill, which pickles the
    # PHI word lists the closure holds (about a second per map, whatever the row count).
    tokenized = dataset.map(
        convert_and_tokenize,
        batched=True,
        batch_size=pipeline.BATCH_ROWS,
        with_indices=True,
        remove_columns=dataset.column_names,
        new_fingerprint="same-work-tokenized",
    )
    seen: set[str] = set()

    def first_good_copy(reject_reason: str | None, dedupe_key: str) -> bool:
        if reject_reason is not None or dedupe_key in seen:
            return False
        seen.add(dedupe_key)
        return True

    kept = tokenized.filter(
        first_good_copy, input_columns=["reject_reason", "dedupe_key"], new_fingerprint="same-work-kept"
    )
    tokens = pc.sum(pc.list_value_length(kept.with_format("arrow")["input_ids"])).as_py()

    def pack(batch: pa.Table) -> pa.Table:
        return packing.pack_batch(batch, recipe.data.max_seq_len, True)

    packed = kept.with_format("arrow").map(
        pack,
        batched=True,
        batch_size=packing.PACK_ROWS,
        remove_columns=kept.column_names,
        new_fingerprint="same-work-packed",
    )
    packed.to_parquet(str(out_dir / "train.parquet"))
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "rows_out": len(kept), "packed_rows": len(packed)}


def medtune_ray(recipe, storage_root: Path, force: bool) -> dict:
    from ray_jobs.preprocess import pipeline

    start = time.perf_counter()
    info = pipeline.run(recipe, force=force)
    seconds = time.perf_counter() - start
    stats = info.stats
    tokens = sum(stats["tokens"].values())
    assert parquet_tokens(storage_root / info.prefix / "train") == tokens
    return {
        "seconds": seconds,
        "tokens": tokens,
        "rows_out": sum(stats["rows_out"].values()),
        "packed_rows": stats["packing"]["rows"],
    }


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic rows (default 20000)")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--near-dedupe", action="store_true", help="also a warm run with clean.near_dedupe on")
    parser.add_argument(
        "--engines",
        default="hf-seed,hf-same-work,ray",
        help="comma-separated, from hf-seed, hf-same-work, ray (cold, warm, warm regex-phi), near-dedupe",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    engines = set(args.engines.split(",")) | ({"near-dedupe"} if args.near_dedupe else set())
    if unknown := engines - {"hf-seed", "hf-same-work", "ray", "near-dedupe"}:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))}")

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_caching()  # every map really runs
    datasets.disable_progress_bars()
    from ray_jobs.core.modeling import resolve_model_dir
    from ray_jobs.core.recipe import parse_recipe
    from ray_jobs.core.storage import Storage

    env = machine()
    work = Path(tempfile.mkdtemp(prefix="medtune-bench-"))
    os.environ.setdefault("MEDTUNE_CACHE", str(work / "cache"))
    data_file = work / "notes.jsonl"
    write_rows(data_file, args.rows, args.seed)
    storage_root = work / "storage"
    recipe = parse_recipe(
        {
            "name": "bench",
            "model": {"base": "tiny:llama"},
            "storage": {"root": str(storage_root)},
            "data": {
                "format": "entities",
                "train": [str(data_file)],
                "system_prompt": ENTITY_PROMPT,
                "eval_fraction": 0.0,
                "max_seq_len": args.max_seq_len,
            },
        }
    )
    model_dir = resolve_model_dir(recipe.model, Storage.from_uri(str(storage_root)))  # built once, offline

    results: dict[str, dict] = {}
    print(f"{args.rows} rows, max_seq_len {args.max_seq_len}, {env['cores']} cores ({env['cpu_model']})", flush=True)
    for name, run in (
        ("hf-seed", lambda: hf_seed(data_file, model_dir, work / "hf-seed", args.max_seq_len)),
        ("hf-same-work", lambda: hf_same_work(data_file, model_dir, work / "hf-same", recipe)),
    ):
        if name not in engines:
            continue
        results[name] = run()
        print(f"  {name}: {results[name]['seconds']:.1f} s", flush=True)

    import ray

    start = time.perf_counter()
    # 2 GB was enough on 2 cores; more cores keep more blocks in flight (Ray Data backpressures
    # on the object store), so scale it rather than throttle a 16-core run.
    store = max(2_000_000_000, 500_000_000 * (os.cpu_count() or 1))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, object_store_memory=store)
    ray_init_s = time.perf_counter() - start
    if "ray" in engines:
        results["medtune-ray cold"] = medtune_ray(recipe, storage_root, force=False)
        results["medtune-ray cold"]["seconds"] += ray_init_s
        results["medtune-ray cold"]["ray_init_seconds"] = ray_init_s
        print(f"  medtune-ray cold: {results['medtune-ray cold']['seconds']:.1f} s", flush=True)
        results["medtune-ray warm"] = medtune_ray(recipe, storage_root, force=True)
        print(f"  medtune-ray warm: {results['medtune-ray warm']['seconds']:.1f} s", flush=True)
        # The PHI engine's cost inside the pipeline: the same warm run with the regex engine
        # (no names or cities, no Presidio).
        phi = recipe.data.phi.model_copy(update={"engine": "regex"})
        regex_phi = recipe.model_copy(update={"data": recipe.data.model_copy(update={"phi": phi})})
        results["medtune-ray warm regex-phi"] = medtune_ray(regex_phi, storage_root, force=True)
        print(f"  medtune-ray warm regex-phi: {results['medtune-ray warm regex-phi']['seconds']:.1f} s", flush=True)
    if "near-dedupe" in engines:
        # Near-dedupe's cost: MinHash in the per-row tasks, LSH band keys grouped by bucket.
        clean = recipe.data.clean.model_copy(update={"near_dedupe": True})
        near = recipe.model_copy(update={"data": recipe.data.model_copy(update={"clean": clean})})
        name = "medtune-ray warm near-dedupe" if "ray" in engines else "medtune-ray cold near-dedupe"
        results[name] = medtune_ray(near, storage_root, force=True)
        if "ray" not in engines:
            results[name]["seconds"] += ray_init_s
            results[name]["ray_init_seconds"] = ray_init_s
        print(f"  {name}: {results[name]['seconds']:.1f} s", flush=True)
    ray.shutdown()

    for result in results.values():
        result["tokens_per_s"] = result["tokens"] / result["seconds"]
        result["rows_per_s"] = args.rows / result["seconds"]
    seed_rate = results.get("hf-seed", {}).get("tokens_per_s")
    same_rate = results.get("hf-same-work", {}).get("tokens_per_s")
    print()
    print(
        f"{'engine':<30}{'rows out':>10}{'tokens':>12}{'seconds':>10}{'rows/s':>9}{'tokens/s':>12}"
        f"{'vs hf-seed':>12}{'vs same-work':>14}"
    )
    for name, r in results.items():
        versus = [f"{r['tokens_per_s'] / rate:.2f}x" if rate else "-" for rate in (seed_rate, same_rate)]
        print(
            f"{name:<30}{r['rows_out']:>10}{r['tokens']:>12}{r['seconds']:>10.1f}{r['rows_per_s']:>9.0f}"
            f"{r['tokens_per_s']:>12.0f}{versus[0]:>12}{versus[1]:>14}"
        )
    env["load_average_at_end"] = os.getloadavg()
    print(f"\nload average start {env['load_average_at_start']}, end {env['load_average_at_end']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "benchmark": "preprocess_throughput",
                    "rows": args.rows,
                    "max_seq_len": args.max_seq_len,
                    "machine": env,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
