"""GPU evidence for the training stage: `medtune train` (Ray Train) on an 8B-shaped model.

    python benchmarks/train_resume_gpu.py --deepspeed zero2 --steps 150 --fail-at 80 --out DIR

Builds a Llama-3.1-8B-shaped model with random weights (bf16 safetensors, once), gives it
the tiny offline tokenizer, writes synthetic entity-extraction notes, and runs the real
training stage (`ray_jobs.train.run.run`): QLoRA nf4 (or `--quantization 8bit|none`) on 1 GPU
per worker under DeepSpeed (or DDP with `--deepspeed none`),
checkpoints every `--checkpoint-every` steps, and one worker killed (os._exit) right after
step `--fail-at`, so Ray Train restarts it from the latest checkpoint. Writes the run's
lineage, the checkpoints it kept and the adapter's tensor shapes to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import build_random_model

WORDS = [
    "patient",
    "dose",
    "tablet",
    "daily",
    "history",
    "fever",
    "cough",
    "renal",
    "hepatic",
    "cardiac",
    "pulmonary",
    "therapy",
    "infusion",
    "follow",
    "visit",
    "adverse",
    "event",
    "baseline",
    "week",
    "month",
    "score",
    "lesion",
    "biopsy",
    "imaging",
    "plasma",
    "serum",
    "trial",
    "subject",
    "domain",
    "visit",
    "protocol",
    "randomised",
    "placebo",
    "arm",
    "cohort",
    "interval",
]


def long_rows(count: int, seed: int) -> list[dict]:
    """Instruction rows with log-normal lengths (median ~600 tokens with the tiny tokenizer,
    ~30% prompt), the benchmark's document distribution, as the instruction seed's format."""
    import math
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = int(max(24, min(1100, rng.lognormvariate(math.log(165), 0.6))))
        text = [rng.choice(WORDS) for _ in range(words)]
        cut = int(words * 0.3)
        rows.append({"instruction": " ".join(text[:cut]), "output": " ".join(text[cut:])})
    return rows


def train_once(
    *,
    shape: str,
    workdir: Path,
    deepspeed: str,
    quantization: str,
    workers: int,
    steps: int,
    checkpoint_every: int,
    fail_at: int,
    seq_len: int,
    rows: int,
    data: str,
    log_every: int = 10,
    memory_gib: float | None = None,
    attn: str = "auto",
) -> dict:
    """One `medtune train` run (Ray must be initialised); returns its summary."""
    import torch

    from ray_jobs import pipeline
    from ray_jobs.core.recipe import parse_recipe
    from ray_jobs.core.storage import Storage, run_prefix
    from ray_jobs.synthetic import entity_rows
    from ray_jobs.tiny_model import build_tiny_model

    model_dir = build_random_model(shape, workdir / shape)
    if not (model_dir / "tokenizer.json").exists():
        tiny = build_tiny_model(workdir / "tiny-tokenizer", "llama")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (tiny / name).exists():
                shutil.copy(tiny / name, model_dir / name)
    data_file = workdir / f"{data}-{rows}.json"
    if not data_file.exists():
        data_file.write_text(json.dumps(entity_rows(rows, seed=11) if data == "entities" else long_rows(rows, seed=11)))
    tag = f"{shape}-{deepspeed}-{quantization}-{workers}gpu".replace(".", "")
    storage_root = str(workdir / f"storage-{tag}")
    recipe = parse_recipe(
        {
            "name": f"gpu-{tag}",
            "model": {
                "base": str(model_dir),
                "quantization": quantization,
                "dtype": "bf16",
                "attn_implementation": attn,
            },
            "data": {
                "format": data if data == "entities" else "instruction",
                "train": [str(data_file)],
                "system_prompt": "Extract the entities as JSON." if data == "entities" else None,
                "max_seq_len": seq_len,
                "eval_fraction": 0.02,
            },
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "attention"},
            "train": {
                "max_steps": steps,
                "micro_batch_size": 1,
                "lr": 2e-4,
                "warmup_steps": 10,
                "workers": workers,
                "gpus_per_worker": int(torch.cuda.is_available()),
                "cpus_per_worker": 4 if torch.cuda.is_available() else 0.5,
                "deepspeed": deepspeed,
                "gradient_checkpointing": "auto",
                "max_gpu_memory_gib": memory_gib,
                "liger_kernels": True,
                "checkpoint_every": checkpoint_every,
                "log_every": log_every,
                "max_failures": 1,
            },
            "storage": {"root": storage_root},
        }
    )
    started = time.perf_counter()
    result = pipeline.train(recipe, run_name=f"{recipe.name}-r1", fault_at_step=fail_at or None)
    seconds = time.perf_counter() - started
    lineage = json.loads(Path(result.adapter_uri, "lineage.json").read_text())
    storage = Storage.from_uri(storage_root)
    from safetensors.torch import load_file

    tensors = load_file(Path(result.adapter_uri) / "adapter_model.safetensors")
    logged = [
        json.loads(line)
        for line in storage.read_text(f"{run_prefix(result.run)}/tensorboard/metrics.jsonl").splitlines()
    ]
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "recipe": recipe.model_dump(mode="json"),
        "seconds": seconds,
        "lineage": lineage,
        "logged": logged,
        "checkpoints": sorted(n for n in storage.listdir(run_prefix(result.run)) if n.startswith("checkpoint_")),
        "adapter_tensors": len(tensors),
        "adapter_shapes": sorted({str(tuple(t.shape)) for t in tensors.values()}),
        "empty_tensors": [k for k, t in tensors.items() if t.numel() == 0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--workdir", default="/tmp/mtb")
    parser.add_argument("--deepspeed", default="zero2", help="zero2, zero3, or none (DDP)")
    parser.add_argument("--quantization", default="4bit", choices=["4bit", "8bit", "none"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--fail-at", type=int, default=80, help="0: no injected failure")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument(
        "--data",
        default="entities",
        choices=["entities", "long"],
        help="short synthetic notes, or log-normal instruction documents (median ~600 tokens)",
    )
    parser.add_argument("--attn", default="auto", help="model.attn_implementation")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(
        runtime_env={"env_vars": {k: os.environ[k] for k in ("PYTHONPATH", "TORCH_CUDA_ARCH_LIST") if k in os.environ}}
    )
    summary = train_once(
        shape=args.shape,
        workdir=Path(args.workdir),
        deepspeed=args.deepspeed,
        quantization=args.quantization,
        workers=args.workers,
        steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        fail_at=args.fail_at,
        seq_len=args.seq_len,
        rows=args.rows,
        data=args.data,
        attn=args.attn,
    )
    name = f"train-resume-{args.shape}-{args.deepspeed}-{args.quantization}-{args.workers}gpu.json"
    (out / name).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("recipe", "logged")}, indent=1, default=str))
    for metrics in summary["logged"]:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
