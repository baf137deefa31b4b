"""The five seed recipes on a real model: each recipe's own metric before -> after training.

    python benchmarks/seed_recipes_real_model.py --out benchmarks/results/seed_recipes_smollm2-cpu.json
    python benchmarks/seed_recipes_real_model.py --gpu --steps 200 --out $OUT/seed_recipes.json   # device

Each shipped seed recipe (configs/sdtm, medical-qa, reasoning, entities, audience/patient)
runs through the real stages (Ray Data -> Ray Train -> evaluation) with
`model.base=smollm2-135m` and a small synthetic set in its seed's own data layout
(ray_jobs.synthetic): the recipe's LoRA shape, prompts, columns and metrics stay as shipped;
what changes is the base model, the number of steps, the storage (a local directory) and,
on CPU, 4-bit quantisation (bitsandbytes needs a GPU) and the GPU count. Prints a markdown
table and writes every report to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_jobs import synthetic  # noqa: E402

# recipe -> (rows generator, the headline metric: (report section, key, label))
SEEDS = {
    "sdtm/qwen2.5-14b-qlora.yaml": (synthetic.sdtm_rows, ("sdtm", "accuracy", "SDTM step accuracy")),
    "medical-qa/mistral-7b-qlora.yaml": (
        synthetic.qa_rows,
        ("qa_safety", "refusal_rate", "refusal rate on refusal rows"),
    ),
    "reasoning/llama3.1-8b-qlora.yaml": (
        synthetic.reasoning_rows,
        ("format", "compliance_rate", "Thinking/Final format"),
    ),
    "entities/llama3.1-8b-lora.yaml": (synthetic.entity_rows, ("entities", "exact.f1", "entity F1 (exact)")),
    "audience/llama3.1-8b-patient-lora.yaml": (
        synthetic.audience_rows,
        ("audience", "adherence_rate", "patient answers at reading grade <= 8"),
    ),
}


def _value(entry: dict, section: str | None, key: str):
    node = entry if section is None else entry.get(section, {})
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def run_one(relative: str, args: argparse.Namespace, root: Path) -> dict:
    from ray_jobs import pipeline
    from ray_jobs.core.recipe import load_recipe

    rows_of, (section, key, label) = SEEDS[relative]
    data_dir = root / "data" / relative.split("/")[0]
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.json").write_text(json.dumps(rows_of(args.rows, seed=7)))
    (data_dir / "eval.json").write_text(json.dumps(rows_of(args.eval_rows, seed=99)))
    overrides = [
        "model.base=smollm2-135m",
        "model.chat_template=null",  # SmolLM2 ships its own (ChatML); the QA recipe names Mistral's for Mistral-7B-v0.1
        "model.family=auto",
        f"data.train=[{data_dir / 'train.json'}]",
        f"data.eval=[{data_dir / 'eval.json'}]",
        "data.max_seq_len=512",
        "data.clean.dedupe=false",  # the synthetic generators repeat sentences by design
        f"train.max_steps={args.steps}",
        "train.epochs=1",
        f"train.checkpoint_every={args.steps}",
        f"train.log_every={max(1, args.steps // 4)}",
        "train.eval_every=0",
        "train.workers=1",
        f"train.lr={args.lr}",
        "train.warmup_steps=2",
        f"storage.root={root / 'storage'}",
        f"eval.max_samples={args.eval_rows}",
        "eval.batch_size=8",
        f"eval.generation.max_new_tokens={args.max_new_tokens}",
    ]
    if args.gpu:
        # One GPU: DDP instead of the SDTM recipe's ZeRO-2 (whose fused Adam JIT-compiles for a
        # minute); everything else, QLoRA included, as the recipe ships.
        overrides += ["train.gpus_per_worker=1", "train.deepspeed=none"]
    else:
        overrides += [
            "model.quantization=none",
            "train.gpus_per_worker=0",
            "train.deepspeed=none",
            "train.gradient_checkpointing=false",
            "train.liger_kernels=false",
            "train.micro_batch_size=2",
            "train.grad_accum=1",
            "train.tokens_per_step=null",
            "train.cpu_threads=2",
        ]
    recipe = load_recipe(REPO / "configs" / relative, overrides)
    started = time.perf_counter()
    pipeline.train(recipe)
    trained = time.perf_counter() - started
    report = pipeline.evaluate(recipe)
    base, adapter = report["models"]["base"], report["models"]["adapter"]
    return {
        "recipe": relative,
        "metric": label,
        "before": _value(base, section, key),
        "after": _value(adapter, section, key),
        "eval_loss": [base["eval_loss"], adapter["eval_loss"]],
        "train_s": round(trained, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "report": report,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--eval-rows", type=int, default=24)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--only", nargs="*", help="recipe paths (relative to configs/) to run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import ray

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for relative in args.only or SEEDS:
            results.append(run_one(relative, args, Path(tmp)))
            Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    print(f"\n| recipe | metric | base | after {args.steps} steps | eval loss | train s |")
    print("|---|---|---:|---:|---|---:|")
    for r in results:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
        loss = f"{r['eval_loss'][0]:.3f} -> {r['eval_loss'][1]:.3f}"
        print(f"| {r['recipe']} | {r['metric']} | {fmt(r['before'])} | {fmt(r['after'])} | {loss} | {r['train_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
