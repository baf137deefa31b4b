"""Training throughput: the seeds' recipe vs medtune's training path, side by side, one run.

    python benchmarks/train_throughput.py --shape llama-8b --out results.json       # GPU
    python benchmarks/train_throughput.py --shape tiny --steps 3 --out /tmp/t.json   # CPU smoke

Same model (random weights with a real architecture's shape), same GPU, same documents
(log-normal lengths, median ~600 tokens, the first ~30% of each document is prompt and
masked). Every variant runs a few warm-up steps, then `--steps` timed optimizer steps.

- `seeds`: what the seeds' scripts do: HF + PEFT, batches of 4 documents right-padded to
  the longest, attention_mask, HF's own loss, gradient checkpointing.
- `medtune-*`: the training worker's own `ray_jobs.train.trainer.Trainer` (`setup` and
  `step`, as a run calls them, gradient clipping and scheduler included): documents packed
  into rows of `--seq-len` tokens with position ids restarting per document (documents
  never attend to each other), token-weighted loss, optionally Liger kernels and gradient
  checkpointing chosen by a probe step (`auto`).

Printed per variant: real (non-pad) tokens/s, peak GPU memory, MFU and the ratio to
`seeds`. MFU = tokens/s x (6 N + 12 L d s) / peak bf16 FLOP/s, with N the base model's
parameters, L layers, d hidden size and s the mean document length (attention is within a
document); 6N is the usual convention even though LoRA skips the frozen weights' gradients,
and checkpointing's recompute is not counted. The correctness guard compares medtune's
packed loss with the plain unpacked loss of the same documents on the same model, both
through the variant's own attention kernel: it shows that packing keeps documents apart (a
leak between documents changes the packed loss), not that the kernel equals sdpa; that is
tests/test_train_speed.py's job (varlen against sdpa, on CPU through its per-document path).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model_shapes import SHAPES
from ray_jobs.core.modeling import IGNORE_INDEX, collate, summed_loss
from ray_jobs.core.recipe import Recipe
from ray_jobs.preprocess.tokenize import pack_documents
from ray_jobs.train.plan import WorkerPlan
from ray_jobs.train.trainer import Trainer, WorkerContext

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_random_model(shape: str, directory: Path) -> Path:
    """Save a random-weight model of `shape` once (bf16 safetensors), like a hub checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (directory / "config.json").exists():
        return directory
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return directory


def documents(count: int, vocab: int, seq_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        length = int(min(seq_len, max(32, rng.lognormvariate(math.log(600), 0.6))))
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        prompt = int(length * 0.3)
        docs.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return docs


def bench_recipe(
    model_dir: Path,
    *,
    quantized: bool,
    liger: bool,
    checkpointing,
    seq_len: int,
    micro_batch: int,
    on_gpu: bool,
    steps: int,
    attn: str = "sdpa",
    budget_gib: float | None = None,
) -> Recipe:
    """A recipe for `Trainer`: the seeds' LoRA (r 16 on attention, lr 1e-4, constant), one
    micro-batch per optimizer step. The data section is never read: rows come from here."""
    return Recipe.model_validate(
        {
            "name": "train-throughput",
            "model": {
                "base": str(model_dir),
                "quantization": "4bit" if quantized else "none",
                "dtype": "bf16" if on_gpu else "fp32",
                "attn_implementation": attn,
                "quant": {"type": "nf4", "double_quant": True, "compute_dtype": "bf16"},
            },
            "data": {"format": "text", "train": ["unused.jsonl"], "max_seq_len": seq_len},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "attention"},
            "train": {
                "method": "lora",
                "gradient_checkpointing": checkpointing,
                "liger_kernels": liger,
                "micro_batch_size": micro_batch,
                "grad_accum": 1,
                "max_steps": steps,
                "lr": 1e-4,
                "scheduler": "constant",
                "gpus_per_worker": 1 if on_gpu else 0,
                "max_gpu_memory_gib": budget_gib,
            },
        }
    )


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_steps(step_fn, batches, warmup: int, steps: int) -> dict:
    for batch in batches[:warmup]:
        step_fn(batch)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tokens, losses = 0, []
    started = time.perf_counter()
    for batch in batches[warmup : warmup + steps]:
        real, loss = step_fn(batch)
        tokens += real
        losses.append(loss)
    sync()
    seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_gib": peak_gib(),
        "mean_loss": sum(float(loss) for loss in losses) / len(losses),
    }


def seeds_variant(model_dir: Path, docs, args, device) -> dict:
    """HF + PEFT on padded batches of 4, as the seeds' training scripts run."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    on_gpu = device.type == "cuda"
    kwargs = {"dtype": torch.bfloat16 if on_gpu else torch.float32, "attn_implementation": "sdpa"}
    if on_gpu:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if on_gpu:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    model.config.use_cache = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = [docs[i : i + 4] for i in range(0, len(docs) - 3, 4)]
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()

    def step(batch):
        width = max(len(d[0]) for d in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (doc_ids, doc_labels) in enumerate(batch):
            ids[i, : len(doc_ids)] = torch.tensor(doc_ids)
            labels[i, : len(doc_ids)] = torch.tensor(doc_labels)
            mask[i, : len(doc_ids)] = 1
        with amp():  # HF Trainer's bf16=True, as the seeds configure it
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(mask.sum()), float(out.loss)

    model.train()
    result = run_steps(step, batches, args.warmup, args.steps)
    model = optimizer = None  # free the GPU for the next variant
    torch.cuda.empty_cache() if on_gpu else None
    return result


def medtune_variant(
    model_dir: Path,
    docs,
    args,
    device,
    *,
    quantized: bool,
    liger: bool,
    checkpointing,
    attn: str = "sdpa",
    budget_gib: float | None = None,
) -> dict:
    """medtune's worker path: the training worker's own Trainer on packed rows."""
    on_gpu = device.type == "cuda"
    recipe = bench_recipe(
        model_dir,
        quantized=quantized and on_gpu,
        liger=liger and on_gpu,
        checkpointing=checkpointing,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        on_gpu=on_gpu,
        steps=args.warmup + args.steps,
        attn=attn,
        budget_gib=budget_gib,
    )
    plan = WorkerPlan(
        recipe=recipe, model_dir=str(model_dir), total_steps=args.warmup + args.steps, pad_id=0, has_eval=False
    )
    trainer = Trainer(plan, WorkerContext(rank=0, world=1, device=device))
    trainer.setup()  # the checkpointing decision (`auto`: a probe step) included
    rows = pack_documents(docs, args.seq_len)
    rows.sort(key=lambda r: -len(r["input_ids"]))  # full rows first: the timed steps are full
    batches = [rows[i : i + args.micro_batch] for i in range(0, len(rows) - args.micro_batch + 1, args.micro_batch)]

    def step(batch):
        columns = {k: [r[k] for r in batch] for k in ("input_ids", "labels", "position_ids")}
        result = trainer.step([columns])
        # The loss stays a device tensor: reading it here would add a wait per step that the
        # training loop does not have (it reads the loss once per log window).
        return result.real_tokens, result.loss_sum_tensor / max(result.target_tokens, 1)

    result = run_steps(step, batches, args.warmup, args.steps)
    layers = trainer.model.config.num_hidden_layers
    result["checkpointed_layers"] = f"{trainer.checkpointed_layers}/{layers}"
    result["attention"] = trainer.model.config._attn_implementation
    result["memory_budget_gib"] = budget_gib
    with trainer.autocast_ctx():
        result["guard"] = loss_guard(trainer.model, docs[:12], args.seq_len, device, trainer.fused)
    trainer = None  # free the GPU for the next variant
    torch.cuda.empty_cache() if on_gpu else None
    return result


def loss_guard(model, docs, seq_len: int, device, fused: bool) -> dict:
    """Packed loss through the optimised path vs plain per-document loss, same model and
    attention kernel (one document per row: the kernel sees no packing there)."""
    model.eval()  # Liger's fused loss is used in training mode only; compare train-mode too
    with torch.no_grad():
        plain_sum, plain_count = 0.0, 0
        for ids, labels in docs:
            s, n = summed_loss(model, *(t.to(device) for t in collate({"input_ids": [ids], "labels": [labels]}, 0)))
            plain_sum, plain_count = plain_sum + float(s), plain_count + n
        model.train()
        packed_sum, packed_count = 0.0, 0
        for row in pack_documents(docs, seq_len):
            batch = collate({k: [row[k]] for k in ("input_ids", "labels", "position_ids")}, 0)
            s, n = summed_loss(model, *(t.to(device) for t in batch), fused=fused)
            packed_sum, packed_count = packed_sum + float(s), packed_count + n
    plain, packed = plain_sum / plain_count, packed_sum / packed_count
    return {
        "plain_loss": plain,
        "packed_loss": packed,
        "relative_difference": abs(packed - plain) / plain,
        "target_tokens": [plain_count, packed_count],
    }


def model_flops_per_token(shape: str, mean_doc_len: float) -> float:
    spec = SHAPES[shape]
    d, layers, inter, vocab = (
        spec["hidden_size"],
        spec["num_hidden_layers"],
        spec["intermediate_size"],
        spec["vocab_size"],
    )
    kv = d * spec["num_key_value_heads"] // spec["num_attention_heads"]
    params = layers * (2 * d * d + 2 * d * kv + 3 * d * inter) + 2 * vocab * d
    return 6 * params + 12 * layers * d * mean_doc_len


def print_summary(report: dict, shape: str, gpu: str) -> None:
    """The variants side by side; adds each one's ratio to the seeds' tokens/s to `report`."""
    base = report["variants"].get("seeds", {}).get("tokens_per_s")
    print(f"\n{shape} on {gpu}: real tokens/s (ratio to the seeds' recipe), peak GiB, MFU")
    for name, r in report["variants"].items():
        if "tokens_per_s" not in r:
            print(f"  {name:32s} {r.get('error')}")
            continue
        ratio = f"{r['tokens_per_s'] / base:5.2f}x" if base else "  n/a"
        mfu = f"{r['mfu'] * 100:5.1f}%" if "mfu" in r else "  n/a"
        guard = r.get("guard", {}).get("relative_difference")
        print(
            f"  {name:32s} {r['tokens_per_s']:9.0f} tok/s  {ratio}  {r['peak_gib']:6.1f} GiB  MFU {mfu}"
            + (
                f"  ckpt={r['checkpointed_layers']}  {r['attention']}  guard diff={guard:.2e}"
                if guard is not None
                else ""
            )
        )
        if base:
            r["ratio_to_seeds"] = r["tokens_per_s"] / base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--workdir", default="/tmp/medtune-bench")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--variants",
        default="seeds,medtune-packed-liger-auto,medtune-varlen-liger-auto,"
        "medtune-varlen-liger-fit-seeds,medtune-bf16-lora-varlen-liger-auto",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = build_random_model(args.shape, Path(args.workdir) / args.shape)
    spec = SHAPES[args.shape]
    docs = documents(args.docs, spec["vocab_size"], args.seq_len)
    mean_len = sum(len(d[0]) for d in docs) / len(docs)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    report = {
        "device": gpu,
        "shape": args.shape,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "mean_doc_tokens": mean_len,
        "torch": torch.__version__,
        "variants": {},
        "mfu_formula": "tokens/s * (6N + 12*L*d*mean_doc_len) / peak_bf16 (dense)",
        "peak_flops": peak,
    }
    flops = model_flops_per_token(args.shape, mean_len)

    def fit_seeds():
        """QLoRA held to the seeds' own peak memory (measured earlier in this run)."""
        seeds_peak = report["variants"].get("seeds", {}).get("peak_gib")
        if not seeds_peak:
            raise RuntimeError("run the seeds variant first: this one's memory budget is its peak")
        return medtune_variant(
            model_dir,
            docs,
            args,
            device,
            quantized=True,
            liger=True,
            checkpointing="auto",
            attn="auto",
            budget_gib=seeds_peak,
        )

    variants = {
        "seeds": lambda: seeds_variant(model_dir, docs, args, device),
        "medtune-packed": lambda: medtune_variant(
            model_dir, docs, args, device, quantized=True, liger=False, checkpointing=True
        ),
        "medtune-packed-liger": lambda: medtune_variant(
            model_dir, docs, args, device, quantized=True, liger=True, checkpointing=True
        ),
        "medtune-packed-liger-auto": lambda: medtune_variant(
            model_dir, docs, args, device, quantized=True, liger=True, checkpointing="auto"
        ),
        "medtune-varlen-liger-auto": lambda: medtune_variant(
            model_dir, docs, args, device, quantized=True, liger=True, checkpointing="auto", attn="auto"
        ),
        "medtune-varlen-liger-fit-seeds": fit_seeds,
        "medtune-bf16-lora-liger-auto": lambda: medtune_variant(
            model_dir, docs, args, device, quantized=False, liger=True, checkpointing="auto"
        ),
        "medtune-bf16-lora-varlen-liger-auto": lambda: medtune_variant(
            model_dir, docs, args, device, quantized=False, liger=True, checkpointing="auto", attn="auto"
        ),
    }
    for name in args.variants.split(","):
        print(f"--- {name}", flush=True)
        try:
            result = variants[name]()
        except Exception as exc:  # one variant failing (e.g. OOM) must not lose the others
            result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            torch.cuda.empty_cache() if device.type == "cuda" else None
        # The variant's model can outlive `del` through reference cycles (PEFT, hooks): free
        # it before the next variant measures its memory.
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        if "tokens_per_s" in result and peak:
            result["mfu"] = result["tokens_per_s"] * flops / peak
        report["variants"][name] = result
        print(json.dumps({name: result}), flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive a timeout

    print_summary(report, args.shape, gpu)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
