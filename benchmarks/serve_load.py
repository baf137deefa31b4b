"""Load benchmark of the Serve app: many adapters at several concurrencies, against two baselines.

    python benchmarks/serve_load.py --model tiny --out benchmarks/results/serve_load-cpu-tiny.json
    python benchmarks/serve_load.py --model llama-8b-shape --out benchmarks/results/serve_load-h100.json
    python benchmarks/serve_load.py --model tiny --design all      # continuous vs static mixed vs per-adapter
    python benchmarks/serve_load.py --model llama-8b-shape --engine vllm,hf --design continuous --bare-vllm \
        --concurrency 32,64 --sequential-requests 0                 # vLLM vs the HF engine, same GPU, one run

What it measures, on one model (built offline, random weights; nothing is downloaded):
- (a) sequential: one request at a time through plain PEFT `generate` with `set_adapter`,
  what the seeds' inference scripts do. Tokens/s and per-request latency.
- server, adapters: the real Serve app (ray_jobs.serve.app, in-process Ray) driven over HTTP
  by an async client at each concurrency, requests spread round-robin over N adapters.
  Tokens/s, p50/p95 latency and time to first token (streamed requests).
- (b) server, base only: the same server answering base-model requests at the same concurrencies.
- adapter first-load time (seconds per adapter, as the replica measured it).
Ratios printed: server tokens/s over (a), and adapters over base-only (b) at each concurrency.

Design decisions:
- `--model llama-8b-shape` is Llama-3.1-8B's exact config (32 layers, 4096 hidden, GQA 8,
  128256 vocab) with random bf16 weights; lm_head rows outside the tiny tokenizer's
  vocabulary are zeroed so every generated token decodes to text (streamed chunks = tokens).
  Adapters are rank-16 LoRA on q/k/v/o, written directly as PEFT safetensors.
- Every request asks for exactly --max-tokens (random weights rarely emit end of turn), so
  tokens/s compares like with like.
- The JSON is rewritten after every measurement, so a run cut short still leaves results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.model_shapes import SHAPES  # noqa: E402

DESIGNS = ["continuous", "mixed", "per_adapter"]
PROMPT_WORDS = [
    "patient",
    "presents",
    "with",
    "chest",
    "pain",
    "shortness",
    "of",
    "breath",
    "fever",
    "blood",
    "pressure",
    "diabetes",
    "mellitus",
    "hypertension",
    "prescribed",
    "metformin",
    "twice",
    "daily",
    "extract",
    "the",
    "entities",
]


def log(message: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    import peft
    import transformers

    info.update(transformers=transformers.__version__, peft=peft.__version__)
    try:  # serve_engines.py runs without Ray
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------- model and adapters
def build_model(kind: str, out: Path) -> Path:
    """A model directory: the tiny llama, or a Llama-3.1-8B-shaped random bf16 model."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from ray_jobs.tiny_model import TEMPLATES, build_tiny_model, train_tokenizer

    if kind == "tiny":
        return build_tiny_model(out, "llama")
    tokenizer = train_tokenizer("llama3")
    spec = TEMPLATES["llama3"]
    eos = tokenizer.convert_tokens_to_ids(spec.eos)
    config = LlamaConfig(
        **{k: v for k, v in SHAPES["llama-8b"].items() if k != "model_type"},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        # Only tokens the tokenizer can decode (and no special tokens) may win the argmax.
        special = set(tokenizer.all_special_ids)
        keep = torch.tensor([i not in special for i in range(len(tokenizer))], device=device)
        model.lm_head.weight[len(tokenizer) :] = 0
        model.lm_head.weight[: len(tokenizer)][~keep] = 0
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"built llama-8b-shape in {time.perf_counter() - started:.0f}s at {out}")
    return out


def write_adapter(model_dir: Path, out: Path, seed: int, rank: int, base_name: str) -> Path:
    """A random LoRA adapter on q/k/v/o in PEFT format, written without loading the base."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shapes = {
        "q_proj": (config.hidden_size, config.num_attention_heads * head_dim),
        "k_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
        "v_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
        "o_proj": (config.num_attention_heads * head_dim, config.hidden_size),
    }
    dtype = torch.bfloat16 if config.hidden_size >= 1024 else torch.float32
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) / fan_in**0.5).to(
                dtype
            )
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.02).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(shapes),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    ).save_pretrained(str(out))
    return out


def prompt_text(tokens: int) -> str:
    return " ".join(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(tokens))


# ---------------------------------------------------------------------- (a) sequential PEFT
def sequential_baseline(
    model_dir: Path, adapters: dict[str, Path], requests: int, max_tokens: int, prompt: str
) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(1)  # the same as a Serve replica with num_cpus=1 (Ray sets OMP_NUM_THREADS=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    latencies, tokens = [], 0
    started = time.perf_counter()
    for index in range(requests):
        model.set_adapter(names[index % len(names)])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t0)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - started
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "requests": requests,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p95_s": round(percentile(latencies, 95), 4),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# ---------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model_dir: Path,
    storage_root: Path,
    port: int,
    max_batch: int,
    batching: str,
    app_name: str,
    stream_interval: float = 0.0,
    engine: str = "hf",
):
    import torch
    from ray import serve

    from ray_jobs.core.recipe import parse_recipe
    from ray_jobs.serve.deployment import build_app

    gpu = torch.cuda.is_available()
    recipe = parse_recipe(
        {
            "name": "bench",
            "model": {"base": str(model_dir), "dtype": "bf16" if gpu else "fp32"},
            "data": {"format": "chat", "train": "unused.jsonl"},
            "storage": {"root": str(storage_root)},
            "serve": {
                "served_model_name": "base",
                "host": "127.0.0.1",
                "port": port,
                "gpus_per_replica": 1 if gpu else 0,
                "cpus_per_replica": 1,
                "max_batch_size": max_batch,
                "max_ongoing_requests": max(2 * max_batch, 8),
                "max_queued_requests": 4096,
                "batch_wait_timeout_s": 0.01,
                "request_timeout_s": 3600,
                "max_loaded_adapters": 64,
                "adapter_refresh_s": 3600,
                "batching": batching,
                "stream_interval_s": stream_interval,
                "engine": engine,
                # vLLM: one GPU slot per benchmark adapter, as many sequences as the deepest level
                "vllm": {"max_loras": 4, "max_num_seqs": max(max_batch, 8)},
            },
        }
    )
    serve.run(build_app(recipe), name=app_name, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def bare_vllm(
    model_dir: Path, adapters: dict[str, Path], levels: list[int], max_tokens: int, prompt: str, rank: int
) -> dict[str, Any]:
    """vLLM's offline engine alone (`LLM.generate`), adapters round-robin: the ceiling the endpoint
    is compared with. Runs in its own process so that its GPU memory is freed before Serve starts."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer(prompt)["input_ids"]
    llm = LLM(
        model=str(model_dir),
        dtype="bfloat16",
        enable_lora=True,
        max_loras=4,
        max_lora_rank=max(16, rank),
        max_num_seqs=max(levels),
        disable_log_stats=True,
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    loras = [LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())]
    rows = []
    for concurrency in levels:
        for kind in ("adapters", "base"):
            prompts = [{"prompt_token_ids": prompt_ids} for _ in range(concurrency)]
            lora = [loras[i % len(loras)] for i in range(concurrency)] if kind == "adapters" else None
            llm.generate(prompts, params, lora_request=lora, use_tqdm=False)  # warm
            # Four waves of exactly `concurrency` sequences (one generate call with more prompts
            # would run max_num_seqs of them at once, not `concurrency`).
            started = time.perf_counter()
            tokens = 0
            for _ in range(4):
                outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
                tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
            wall = time.perf_counter() - started
            rows.append(
                {
                    "kind": kind,
                    "concurrency": concurrency,
                    "tokens": tokens,
                    "wall_s": round(wall, 3),
                    "tokens_per_s": round(tokens / wall, 1),
                }
            )
            log(f"bare vLLM {kind:8s} c={concurrency:<3d} {rows[-1]}")
    return {"rows": rows}


async def drive(
    base_url: str, models: list[str], concurrency: int, requests: int, max_tokens: int, prompt: str
) -> dict[str, Any]:
    """Streamed completions, `concurrency` in flight, round-robin over `models`."""
    import aiohttp

    limit = asyncio.Semaphore(concurrency)
    rows: list[dict[str, Any]] = []

    async def one(session, index: int) -> None:
        body = {
            "model": models[index % len(models)],
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        async with limit:
            started = time.perf_counter()
            first, tokens, status = None, 0, 0
            async with session.post(f"{base_url}/v1/completions", json=body) as response:
                status = response.status
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and event["choices"][0].get("text") and first is None:
                        first = time.perf_counter() - started
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
            rows.append({"status": status, "latency": time.perf_counter() - started, "ttft": first, "tokens": tokens})

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session, i) for i in range(requests)))
        wall = time.perf_counter() - started
    ok = [r for r in rows if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    latencies = [r["latency"] for r in ok]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": len(rows) - len(ok),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(percentile(latencies, 50), 4),
        "latency_p95_s": round(percentile(latencies, 95), 4),
        "ttft_p50_s": round(percentile(ttfts, 50), 4),
        "ttft_p95_s": round(percentile(ttfts, 95), 4),
    }


def http_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=600) as response:
        return json.loads(response.read())


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "llama-8b-shape"], default="tiny")
    parser.add_argument("--adapters", type=int, default=4, help="number of adapters the load is spread over")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrencies")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: max(16, 4 x concurrency))"
    )
    parser.add_argument("--max-tokens", type=int, default=0, help="tokens per answer (default: 32 tiny, 128 8b)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument(
        "--sequential-requests",
        type=int,
        default=-1,
        help="requests for baseline (a); 0 skips it (default: 2 x adapters)",
    )
    parser.add_argument(
        "--engine", default="hf", help="comma-separated serve.engine values to run behind the endpoint: hf, vllm"
    )
    parser.add_argument(
        "--bare-vllm",
        action="store_true",
        help="also measure vLLM's offline engine alone (LLM.generate), in its own process",
    )
    parser.add_argument(
        "--design",
        default="continuous,mixed",
        help="hf engine: comma-separated serve.batching values to compare: continuous (the default), "
        "mixed (static @serve.batch + PEFT adapter_names), per_adapter (what Serve "
        "multiplexing gives); 'all' for the three",
    )
    parser.add_argument(
        "--stream-intervals",
        default="0",
        help="comma-separated serve.stream_interval_s values; each design runs once per value "
        "(labelled design+VALUE when not 0)",
    )
    parser.add_argument(
        "--workdir", default=None, help="where the model and adapters are written (default: a temp dir)"
    )
    parser.add_argument("--out", default=None, help="JSON results file (rewritten after every measurement)")
    parser.add_argument(
        "--bare-results",
        default=None,
        help="a bare-vLLM JSON measured earlier on the same machine (--bare-only), for the table",
    )
    parser.add_argument(
        "--bare-only", default=None, help="measure only vLLM's offline engine, into this JSON file"
    )  # the --bare-vllm child process
    args = parser.parse_args(argv)
    unknown = set(args.design.split(",")) - {*DESIGNS, "all"}
    if unknown:
        parser.error(f"--design: unknown engine(s) {sorted(unknown)}; choose from {DESIGNS} or all")
    if set(args.engine.split(",")) - {"hf", "vllm"}:
        parser.error("--engine: choose from hf, vllm")
    return args


def runs(args) -> list[tuple[str, str, str, float]]:
    """(label, serve.engine, serve.batching, stream interval) for every server to measure."""
    designs = DESIGNS if args.design == "all" else args.design.split(",")
    intervals = [float(value) for value in args.stream_intervals.split(",")]
    out = []
    for engine in args.engine.split(","):
        for design in designs if engine == "hf" else ["continuous"]:
            for interval in intervals:
                label = engine if engine == "vllm" else design
                out.append((label if not interval else f"{label}+{interval:g}", engine, design, interval))
    return out


def run_bare_vllm(args, work: Path, levels: list[int], results: dict[str, Any]) -> None:
    import subprocess

    out = work / "bare.json"
    command = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--workdir",
        str(work),
        "--adapters",
        str(args.adapters),
        "--rank",
        str(args.rank),
        "--concurrency",
        args.concurrency,
        "--max-tokens",
        str(args.max_tokens),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--bare-only",
        str(out),
    ]
    log("bare vLLM engine, in its own process")
    subprocess.run(command, check=True)
    results["bare_vllm"] = json.loads(out.read_text())


def measure(
    base_url: str,
    label: str,
    entry: dict[str, Any],
    names: list[str],
    levels: list[int],
    args,
    max_tokens: int,
    prompt: str,
    save,
) -> None:
    for name in names:  # first use loads the adapter; the replica times it
        asyncio.run(drive(base_url, [name], 1, 1, 2, prompt))
    entry["adapter_first_load_s"] = http_json(f"{base_url}/healthz")["adapter_load_seconds"]
    log(f"adapter first loads (s): {entry['adapter_first_load_s']}")
    save()
    for concurrency in levels:
        requests = args.requests or max(16, 4 * concurrency)
        for kind, models in (("adapters", names), ("base", ["base"])):
            asyncio.run(drive(base_url, models, concurrency, min(concurrency, 4), 4, prompt))  # warm up
            row = asyncio.run(drive(base_url, models, concurrency, requests, max_tokens, prompt))
            entry[kind].append(row)
            log(f"{label} {kind:8s} c={concurrency:<3d} {row}")
            save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from ray_jobs.core.storage import Storage, adapter_prefix

    levels = [int(c) for c in args.concurrency.split(",")]
    max_tokens = args.max_tokens or (32 if args.model == "tiny" else 128)
    args.max_tokens = max_tokens
    prompt = prompt_text(args.prompt_tokens)
    results: dict[str, Any] = {
        "benchmark": "serve_load",
        "model": args.model,
        "adapters": args.adapters,
        "rank": args.rank,
        "max_tokens": max_tokens,
        "prompt_tokens_approx": args.prompt_tokens,
        "concurrency": levels,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="serve-load-"))
    os.environ.setdefault("MEDTUNE_CACHE", str(work / "cache"))
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():  # a --workdir from an earlier run keeps its model
        build_model(args.model, model_dir)
    adapters = {f"bench-{i}": work / "adapters" / f"bench-{i}" for i in range(args.adapters)}
    for index, (_name, local) in enumerate(adapters.items()):
        if not (local / "adapter_config.json").exists():
            write_adapter(model_dir, local, seed=index + 1, rank=args.rank, base_name=args.model)
    if args.bare_only:
        Path(args.bare_only).write_text(
            json.dumps(bare_vllm(model_dir, adapters, levels, max_tokens, prompt, args.rank))
        )
        return 0
    if args.bare_results:  # measured earlier on the same machine (bare_vllm's own process)
        results["bare_vllm"] = json.loads(Path(args.bare_results).read_text())
    save()
    storage = Storage.from_uri(str(work / "storage"))
    for name, local in adapters.items():
        storage.upload_dir(local, adapter_prefix(name, "v1"))
    log(f"{args.adapters} rank-{args.rank} adapters written under {storage.root_uri}")

    sequential = 2 * args.adapters if args.sequential_requests < 0 else args.sequential_requests
    if sequential:
        log(f"(a) sequential PEFT generate, {sequential} requests")
        results["sequential"] = sequential_baseline(model_dir, adapters, sequential, max_tokens, prompt)
        log(f"(a) {results['sequential']}")
        save()
    if args.bare_vllm:
        run_bare_vllm(args, work, levels, results)
        save()

    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results["designs"] = {}
    try:
        for label, engine, design, interval in runs(args):
            log(f"starting the Serve app ({label}: engine={engine}, batching={design}, stream_interval_s={interval:g})")
            started = time.perf_counter()
            app = f"bench-{label.replace('+', '-')}"
            base_url = start_server(
                model_dir, work / "storage", port, max(levels), design, app, stream_interval=interval, engine=engine
            )
            entry: dict[str, Any] = {
                "startup_s": round(time.perf_counter() - started, 1),
                "adapters": [],
                "base": [],
                "engine": engine,
                "batching": design,
                "stream_interval_s": interval,
            }
            results["designs"][label] = entry
            measure(base_url, label, entry, list(adapters), levels, args, max_tokens, prompt, save)
            serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    results["table"] = table(results)
    save()
    print(results["table"], flush=True)
    return 0


def table(results: dict[str, Any]) -> str:
    sequential = results.get("sequential", {}).get("tokens_per_s")
    lines = [
        f"serve_load: model={results['model']} adapters={results['adapters']} rank={results['rank']} "
        f"max_tokens={results['max_tokens']} on {results['machine'].get('gpu') or results['machine']['platform']}",
        f"(a) sequential PEFT generate: {sequential:.1f} tok/s, p50 {results['sequential']['latency_p50_s']:.3f}s"
        if sequential
        else "(a) sequential PEFT generate: not measured",
        f"{'design':16s} {'conc':>4s} {'tok/s':>9s} {'p50 s':>8s} {'p95 s':>8s} {'ttft50':>8s} {'ttft95':>8s} "
        f"{'base tok/s':>10s} {'x (a)':>7s} {'% of (b)':>8s} {'errors':>6s}",
    ]
    bare = {(r["kind"], r["concurrency"]): r["tokens_per_s"] for r in results.get("bare_vllm", {}).get("rows", [])}
    if bare:
        lines[-1] += f" {'% bare vLLM':>11s}"
    for design, entry in results.get("designs", {}).items():
        for row, base in zip(entry["adapters"], entry["base"]):
            line = (
                f"{design:16s} {row['concurrency']:4d} {row['tokens_per_s']:9.1f} {row['latency_p50_s']:8.3f} "
                f"{row['latency_p95_s']:8.3f} {row['ttft_p50_s']:8.3f} {row['ttft_p95_s']:8.3f} "
                f"{base['tokens_per_s']:10.1f} "
                f"{row['tokens_per_s'] / sequential if sequential else float('nan'):7.2f} "
                f"{100 * row['tokens_per_s'] / base['tokens_per_s']:7.1f}% {row['errors'] + base['errors']:6d}"
            )
            if ("adapters", row["concurrency"]) in bare:
                line += f" {100 * row['tokens_per_s'] / bare[('adapters', row['concurrency'])]:10.1f}%"
            lines.append(line)
        loads = entry.get("adapter_first_load_s", {})
        if loads:
            lines.append(f"{design:16s} adapter first load: max {max(loads.values()):.3f}s over {len(loads)} adapters")
    for (kind, concurrency), tokens_per_s in bare.items():
        lines.append(f"bare vLLM LLM.generate {kind:8s} c={concurrency:<3d} {tokens_per_s:9.1f} tok/s")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
