"""A real job's preprocessing, measured where it runs: raw JSONL -> `medtune preprocess` on
every core -> the first training steps on the GPU, in one run.

    python benchmarks/pipeline_gpu.py --rows 200000 --steps 10 --out $OUT/pipeline_gpu.json

Reports preprocessing tokens/s and its share of the job's wall time, and the same work in one
process (medtune's per-row code through `datasets.map`, on a sample of the same rows, same
machine, same run), so the ratio says what Ray Data buys on this machine. The rows are the
entity-extraction seed's format (preprocess_throughput's generator); the model is the
Llama-3.1-8B shape with random bf16 weights and the tiny Llama 3 tokenizer (no hub
downloads), trained with LoRA on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.preprocess_throughput import ENTITY_PROMPT, hf_same_work, machine, write_rows  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--sample-rows", type=int, default=20_000, help="rows for the one-process figure")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", choices=["llama-8b", "tiny"], default="llama-8b")
    parser.add_argument("--gpus", type=int, default=1, help="0: a CPU smoke run of this script")
    parser.add_argument("--workdir", default="/tmp/medtune-pipeline-gpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from benchmarks.serve_load import build_model
    from ray_jobs.core.recipe import parse_recipe

    env = machine()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"model-{args.model}"
    if not (model_dir / "config.json").exists():
        build_model("tiny" if args.model == "tiny" else "llama-8b", model_dir)
    raw, sample = work / "notes.jsonl", work / "sample.jsonl"
    write_rows(raw, args.rows, seed=0)
    write_rows(sample, args.sample_rows, seed=0)
    storage = Path(tempfile.mkdtemp(prefix="storage-", dir=work))

    def recipe_for(train_file: Path):
        return parse_recipe(
            {
                "name": "pipeline-gpu",
                "model": {"base": str(model_dir)},
                "storage": {"root": str(storage)},
                "data": {
                    "format": "entities",
                    "train": [str(train_file)],
                    "system_prompt": ENTITY_PROMPT,
                    "eval_fraction": 0.0,
                    "max_seq_len": 2048,
                },
                "lora": {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                "train": {
                    "method": "lora",
                    "max_steps": args.steps,
                    "micro_batch_size": 1,
                    "gradient_checkpointing": True,
                    "workers": 1,
                    "gpus_per_worker": args.gpus,
                    "cpus_per_worker": 1,
                    "checkpoint_every": args.steps,
                    "log_every": 1,
                },
                "eval": {"metrics": []},
            }
        )

    # The same work in one process, on a sample of the same rows.
    one = hf_same_work(sample, str(model_dir), work / "same-work", recipe_for(sample))
    one_rate = one["tokens"] / one["seconds"]
    print(f"one process, {args.sample_rows} rows: {one['seconds']:.1f} s, {one_rate:,.0f} tokens/s", flush=True)

    import ray

    from ray_jobs.preprocess import pipeline as preprocess
    from ray_jobs.train import run as train

    job_start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    recipe = recipe_for(raw)
    dataset = preprocess.run(recipe, force=True)
    preprocessed = time.perf_counter()
    tokens = sum(dataset.stats["tokens"].values())
    result = train.run(recipe, dataset)
    job_end = time.perf_counter()
    ray.shutdown()

    pre_s, job_s = preprocessed - job_start, job_end - job_start
    figures = {
        "rows": args.rows,
        "tokens": tokens,
        "preprocess_seconds": round(pre_s, 1),
        "preprocess_tokens_per_s": round(tokens / pre_s),
        "preprocess_share_of_wall": round(pre_s / job_s, 3),
        "train_seconds": round(job_end - preprocessed, 1),
        "train_steps": args.steps,
        "train_metrics": result.metrics,
        "job_seconds": round(job_s, 1),
        "one_process_same_work_tokens_per_s": round(one_rate),
        "ray_vs_one_process": round(tokens / pre_s / one_rate, 2),
        "machine": env,
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "machine"}, indent=2))
    print(
        f"\npreprocess {tokens:,} tokens in {pre_s:.1f} s = {tokens / pre_s:,.0f} tokens/s on {env['cores']} cores, "
        f"{tokens / pre_s / one_rate:.2f}x one process ({one_rate:,.0f}); {pre_s / job_s:.0%} of the job's "
        f"{job_s:.0f} s (training {args.steps} steps: {job_end - preprocessed:.0f} s incl. model load)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
