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

from benchmarks.train_throughput import build_random_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--workdir", default="/tmp/mtb")
    parser.add_argument("--deepspeed", default="zero2", help="zero2, zero3, or none (DDP)")
    parser.add_argument("--quantization", default="4bit", choices=["4bit", "8bit", "none"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--fail-at", type=int, default=80)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import ray

    from ray_jobs.config import parse_recipe
    from ray_jobs.storage import Storage, run_prefix
    from ray_jobs.synthetic import entity_rows
    from ray_jobs.tiny_model import build_tiny_model
    from ray_jobs.train import run as train_run

    work = Path(args.workdir)
    model_dir = build_random_model(args.shape, work / args.shape)
    if not (model_dir / "tokenizer.json").exists():
        tiny = build_tiny_model(work / "tiny-tokenizer", "llama")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (tiny / name).exists():
                shutil.copy(tiny / name, model_dir / name)
    data = work / "notes.json"
    data.write_text(json.dumps(entity_rows(args.rows, seed=11)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage_root = str(work / f"storage-{args.deepspeed}-{args.quantization}-{args.workers}")
    recipe = parse_recipe({
        "name": f"gpu-evidence-{args.deepspeed}-{args.quantization}",
        "model": {"base": str(model_dir), "quantization": args.quantization, "dtype": "bf16"},
        "data": {"format": "entities", "train": [str(data)], "system_prompt": "Extract the entities as JSON.",
                 "max_seq_len": args.seq_len, "eval_fraction": 0.02},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "attention"},
        "train": {"max_steps": args.steps, "micro_batch_size": 1, "lr": 2e-4, "warmup_steps": 10,
                  "workers": args.workers, "gpus_per_worker": 1, "cpus_per_worker": 4,
                  "deepspeed": args.deepspeed,
                  "gradient_checkpointing": "auto", "liger_kernels": True, "checkpoint_every": args.checkpoint_every,
                  "log_every": 10, "max_failures": 1},
        "storage": {"root": storage_root},
    })
    ray.init(runtime_env={"env_vars": {k: os.environ[k] for k in ("PYTHONPATH", "TORCH_CUDA_ARCH_LIST") if k in os.environ}})
    started = time.perf_counter()
    result = train_run.run(recipe, run_name=f"{recipe.name}-r1", fault_at_step=args.fail_at or None)
    seconds = time.perf_counter() - started
    lineage = json.loads(Path(result.adapter_uri, "lineage.json").read_text())
    storage = Storage.from_uri(storage_root)
    from safetensors.torch import load_file

    tensors = load_file(Path(result.adapter_uri) / "adapter_model.safetensors")
    summary = {
        "device": os.popen("nvidia-smi --query-gpu=name --format=csv,noheader").read().strip(),
        "recipe": recipe.model_dump(mode="json"), "seconds": seconds, "lineage": lineage,
        "checkpoints": sorted(n for n in storage.listdir(run_prefix(result.run)) if n.startswith("checkpoint_")),
        "adapter_tensors": len(tensors), "adapter_shapes": sorted({str(tuple(t.shape)) for t in tensors.values()}),
        "empty_tensors": [k for k, t in tensors.items() if t.numel() == 0],
    }
    (out / f"train-resume-{args.deepspeed}-{args.quantization}-{args.workers}gpu.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "recipe"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
