"""The generation engines alone (no Ray, no HTTP): decode throughput by batch size and adapter mix.

    python benchmarks/serve_engines.py --model tiny --out /tmp/engines.json            # CPU smoke
    python benchmarks/serve_engines.py --model llama-8b-shape --out benchmarks/results/serve_engines-h100.json

For each engine (`continuous`: ray_jobs.serve.continuous with stacked LoRA weights; `mixed`:
static PEFT `generate` with `adapter_names=`; `per_adapter`: one PEFT call per adapter), and
each batch size, `batch` greedy requests are handed to the engine at once and timed to the
last token: once spread round-robin over the adapters, once for the base model only. This
separates the engine's own speed from the Serve app's queueing (benchmarks/serve_load.py).
The model and adapters are the ones serve_load.py builds (random weights, nothing downloaded).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serve_load import build_model, log, machine, prompt_text, write_adapter  # noqa: E402

ENGINES = ["continuous", "mixed", "per_adapter"]


def new_engine(kind: str, model_dir: Path):
    import torch

    from ray_jobs.core.recipe import ModelConfig
    from ray_jobs.serve.engines.hf_continuous import ContinuousEngine
    from ray_jobs.serve.engines.hf_static import StaticEngine

    model_cfg = ModelConfig(base=str(model_dir), dtype="bf16" if torch.cuda.is_available() else "fp32")
    if kind == "continuous":
        return ContinuousEngine(str(model_dir), model_cfg, max_loaded_adapters=8, max_batch_size=256)
    return StaticEngine(str(model_dir), model_cfg, max_loaded_adapters=8, batching=kind)


def measure(
    engine, keys: list[str | None], adapters: dict[str, Path], batch: int, max_tokens: int, prompt_ids: list[int]
) -> dict[str, Any]:
    import torch

    from ray_jobs.serve.engines.base import GenerationRequest

    requests = [
        GenerationRequest(
            list(prompt_ids),
            keys[i % len(keys)],
            max_tokens,
            adapter_path=str(adapters[keys[i % len(keys)]]) if keys[i % len(keys)] else None,
        )
        for i in range(batch)
    ]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    return {
        "batch": batch,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ms_per_step": round(1000 * wall / max(1, max(r.completion_tokens for r in results)), 2),
    }


def profile(engine, keys: list[str], adapters: dict[str, Path], batch: int, prompt_ids: list[int]) -> dict[str, Any]:
    """Where a decoding step's time goes, with and without adapters: launch-bound or kernel-bound.

    The continuous engine's steps are driven from this thread (its own decode thread sleeps while
    nothing is queued), so the profiler, which records the thread that starts it, sees them.
    """
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ray_jobs.serve.engines.base import GenerationRequest
    from ray_jobs.serve.engines.hf_continuous import ContinuousEngine, _Row

    if not isinstance(engine, ContinuousEngine):
        return {}
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    found: dict[str, Any] = {}
    for label, chosen in (("adapters", keys), ("base", [None])):
        with engine.lock, torch.inference_mode():
            rows = [
                _Row(
                    GenerationRequest(list(prompt_ids), chosen[i % len(chosen)], 10_000),
                    Future(),
                    slot=engine.slot_of.get(chosen[i % len(chosen)], 0),
                )
                for i in range(batch)
            ]
            engine._prefill(rows)
            for _ in range(4):  # warm
                engine._decode()
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(16):
                engine._decode()
            if cuda:
                torch.cuda.synchronize()
            step_ms = 1000 * (time.perf_counter() - started) / 16
            with torch_profile(activities=activities) as prof:
                for _ in range(8):
                    engine._decode()
                if cuda:
                    torch.cuda.synchronize()
            for row in list(engine.rows):
                engine._end(row, "cancelled")
            engine.rows, engine.cache = [], None
        events = prof.key_averages()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=20) + "\n" + events.table(sort_by="cpu_time_total", row_limit=12)
        found[label] = {"ms_per_step": round(step_ms, 2), "table": table}
        print(f"--- profile {label} batch={batch}: {step_ms:.2f} ms per decoding step\n{table}", flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "llama-8b-shape"], default="tiny")
    parser.add_argument("--engines", default="continuous,mixed", help=f"comma-separated, from {ENGINES}")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--profile-batch",
        type=int,
        default=0,
        help="after timing, profile 16 decoding steps of each engine at this batch size "
        "(torch.profiler; tables of the top CPU and GPU operators)",
    )
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    if set(engines) - set(ENGINES):
        parser.error(f"--engines: unknown {sorted(set(engines) - set(ENGINES))}; choose from {ENGINES}")

    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="serve-engines-"))
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build_model(args.model, model_dir)
    adapters = {
        f"bench-{i}@v1": write_adapter(
            model_dir, work / "adapters" / f"bench-{i}", seed=i + 1, rank=args.rank, base_name=args.model
        )
        for i in range(args.adapters)
    }
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, Any] = {
        "benchmark": "serve_engines",
        "model": args.model,
        "adapters": args.adapters,
        "rank": args.rank,
        "max_tokens": args.max_tokens,
        "machine": machine(),
        "engines": {},
    }

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    for kind in engines:
        started = time.perf_counter()
        engine = new_engine(kind, model_dir)
        loads = {key: round(engine.ensure_adapter(key, str(path)), 3) for key, path in adapters.items()}
        prompt_ids = engine.tokenizer(prompt_text(args.prompt_tokens))["input_ids"]
        entry: dict[str, Any] = {
            "startup_s": round(time.perf_counter() - started, 1),
            "adapter_load_s": loads,
            "adapters": [],
            "base": [],
        }
        results["engines"][kind] = entry
        measure(engine, list(adapters), adapters, 2, 4, prompt_ids)  # warm-up: kernels, allocator
        for batch in batches:
            for label, keys in (("adapters", list(adapters)), ("base", [None])):
                row = measure(engine, keys, adapters, batch, args.max_tokens, prompt_ids)
                entry[label].append(row)
                log(f"{kind:12s} {label:8s} batch={batch:<4d} {row}")
                save()
        if args.profile_batch:
            entry["profile"] = profile(engine, list(adapters), adapters, args.profile_batch, prompt_ids)
            save()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lines = [
        f"serve_engines: model={args.model} adapters={args.adapters} rank={args.rank} "
        f"max_tokens={args.max_tokens} on {results['machine'].get('gpu') or results['machine']['platform']}",
        f"{'engine':12s} {'batch':>5s} {'adapters tok/s':>15s} {'base tok/s':>11s} {'adapters/base':>14s}",
    ]
    for kind, entry in results["engines"].items():
        for with_adapters, base in zip(entry["adapters"], entry["base"]):
            lines.append(
                f"{kind:12s} {with_adapters['batch']:5d} {with_adapters['tokens_per_s']:15.1f} "
                f"{base['tokens_per_s']:11.1f} {with_adapters['tokens_per_s'] / base['tokens_per_s']:14.2f}"
            )
    results["table"] = "\n".join(lines)
    save()
    print(results["table"], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
