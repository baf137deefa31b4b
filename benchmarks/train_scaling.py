"""Multi-GPU scaling of `medtune train` (Ray Train): the same recipe on 1 and N GPUs.

    python benchmarks/train_scaling.py --runs none:1,none:2,zero2:2 --out benchmarks/results/train_scaling-h200x2.json

Each run is the real training stage (Ray Data shards, Ray Train workers, DDP or DeepSpeed,
checkpoints) on a model with a real architecture's shape and random weights, the tiny
offline tokenizer, and instruction documents of log-normal length (median ~600 tokens)
packed into `--seq-len` rows. Throughput is what the workers log: real (non-pad) tokens of
all workers per second of training (evaluation and checkpoint time excluded), taken as the
median over the log windows after the first `--skip` steps. Scaling = N-GPU tokens/s over
the 1-GPU run's (ideal: N); efficiency = scaling / N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_resume_gpu import train_once


def steady_throughput(logged: list[dict], skip: int) -> float:
    windows = [m["tokens_per_s"] for m in logged if m["step"] > skip and not m.get("eval_loss")]
    return statistics.median(windows or [m["tokens_per_s"] for m in logged])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--quantization", default="4bit", choices=["4bit", "8bit", "none"])
    parser.add_argument(
        "--runs",
        default="none:1,none:2,zero2:2",
        help="comma-separated deepspeed:workers (deepspeed none = DDP / one plain GPU)",
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10, help="steps of warm-up left out of the median")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--memory-gib", type=float, default=None, help="train.max_gpu_memory_gib")
    parser.add_argument("--attn", default="auto", help="model.attn_implementation")
    parser.add_argument("--workdir", default="/tmp/mtb")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import ray

    ray.init(
        runtime_env={"env_vars": {k: os.environ[k] for k in ("PYTHONPATH", "TORCH_CUDA_ARCH_LIST") if k in os.environ}}
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "shape": args.shape,
        "quantization": args.quantization,
        "seq_len": args.seq_len,
        "attn": args.attn,
        "runs": {},
    }
    for spec in args.runs.split(","):
        deepspeed, workers = spec.split(":")
        print(f"--- {spec}", flush=True)
        try:
            summary = train_once(
                shape=args.shape,
                workdir=Path(args.workdir),
                deepspeed=deepspeed,
                quantization=args.quantization,
                workers=int(workers),
                steps=args.steps,
                checkpoint_every=args.steps,
                fail_at=0,
                seq_len=args.seq_len,
                rows=args.rows,
                data="long",
                log_every=5,
                memory_gib=args.memory_gib,
                attn=args.attn,
            )
        except Exception as exc:  # one run failing (e.g. OOM) must not lose the others
            report["runs"][spec] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
            continue
        report["device"] = summary["device"]
        report["runs"][spec] = {
            "workers": int(workers),
            "deepspeed": deepspeed,
            "seconds": summary["seconds"],
            "tokens_per_s": steady_throughput(summary["logged"], args.skip),
            "peak_gib_per_gpu": max(m.get("gpu_mem_gib", 0) for m in summary["logged"]),
            "final_loss": summary["logged"][-1]["loss"],
            "logged": summary["logged"],
        }
        print(json.dumps({k: v for k, v in report["runs"][spec].items() if k != "logged"}), flush=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")  # partial results survive a timeout

    single = next((r["tokens_per_s"] for r in report["runs"].values() if r.get("workers") == 1), None)
    print(f"\n{args.shape} {args.quantization} on {report.get('device')}: tokens/s of all GPUs, scaling vs 1 GPU")
    for spec, r in report["runs"].items():
        if "error" in r:
            print(f"  {spec:10s} {r['error']}")
            continue
        if single:
            r["scaling"] = r["tokens_per_s"] / single
            r["efficiency"] = r["scaling"] / r["workers"]
        scale = f"{r['scaling']:.2f}x ({r['efficiency'] * 100:.0f}% efficient)" if single else "n/a"
        print(
            f"  {spec:10s} {r['tokens_per_s']:9.0f} tok/s  {scale}  {r['peak_gib_per_gpu']:.1f} GiB/GPU  "
            f"final loss {r['final_loss']:.3f}"
        )
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
