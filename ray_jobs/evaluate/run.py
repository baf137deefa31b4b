"""The evaluation stage: the base model vs the adapter on the eval split, per task.

    python -m ray_jobs.evaluate RECIPE
    medtune evaluate RECIPE [--set eval.max_samples=50]
    MEDTUNE_ADAPTER=name@version medtune evaluate RECIPE    # a specific adapter version

Writes `report.json`, `report.md` and plots (before/after bars; the training run's loss
curves from its TensorBoard logs) under `<storage>/reports/<run>/`. The eval rows are split
over Ray tasks, one per GPU (or CPU slot) in the cluster (`eval.workers`), each loading the
base model and the adapter itself:
- every format: eval loss and perplexity, before (base) vs after (adapter);
- entities: P/R/F1 exact / relaxed / overlap, per label, JSON validity, plus the
  entity-extraction seed's `true_pred_entities.json` and `performance.json`;
- reasoning: format compliance, reasoning length, final-answer exact match;
- sdtm: accuracy per step; qa_safety: refusal / escalation rates; audience: reading grade
  per audience and the share of answers within the audience's grade bound.
Answers come from vLLM on a GPU with vLLM installed (eval.engine: auto), else from
transformers `generate`; generation is greedy by default, so metrics are reproducible. A model output that is not
valid JSON counts as a miss, never a crash.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Any

from ray_jobs.core.artifacts import DatasetRef, Lineage, resolve_adapter
from ray_jobs.core.engines import choose_engine, vllm_available
from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.recipe import Recipe
from ray_jobs.core.storage import Storage, adapter_prefix, report_prefix, run_prefix
from ray_jobs.evaluate.generation import sampling_kwargs


class EvaluateError(MedtuneError):
    """Nothing to evaluate (no eval split); the message says what to set."""


def _eval_rows(storage: Storage, prefix: str, limit: int | None) -> list[dict[str, Any]]:
    import pyarrow.dataset as pads

    dataset = pads.dataset(storage.path(prefix), filesystem=storage.filesystem, format="parquet")
    rows = sorted(dataset.to_table().to_pylist(), key=lambda r: r["row_id"])
    return rows[:limit] if limit else rows


def loss_sums(model, rows: list[dict[str, Any]], device, batch_size: int) -> tuple[float, int]:
    """(sum of target-token cross-entropies, number of target tokens) over `rows`."""
    import torch

    from ray_jobs.core.modeling import collate, summed_loss

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {"input_ids": [r["input_ids"] for r in chunk], "labels": [r["labels"] for r in chunk]}
            ids, labels, pos = (t.to(device) for t in collate(batch, pad_id=0))
            loss_sum, n = summed_loss(model, ids, labels, pos)
            total, count = total + float(loss_sum), count + n
    return total, count


def evaluate_shard(
    recipe_json: dict[str, Any],
    adapter: tuple[str, str],
    rows: list[dict[str, Any]],
    generative: bool,
    shard: tuple[int, int] = (1, 1),
) -> dict[str, dict[str, Any]]:
    """Base model, then the adapter on it, over one shard of the eval rows: loss sums and answers.

    Runs in the driver or as a Ray task (one per GPU, or per CPU slot): it resolves the base
    model and the adapter through storage itself, so every node fetches its own copy. `shard`:
    (its number, how many): the first names the answering engine for all (they choose alike,
    and the report takes the first's), and each one's progress lines say which shard they count.
    """
    import torch
    from peft import PeftModel

    from ray_jobs.core.modeling import cache_root, load_model, load_tokenizer, resolve_model_dir

    recipe = Recipe.model_validate(recipe_json)
    storage = Storage.from_uri(recipe.storage.root)
    name, version = adapter
    model_dir = resolve_model_dir(recipe.model, storage)
    tokenizer = load_tokenizer(
        model_dir, recipe.model.revision, recipe.model.trust_remote_code, recipe.model.chat_template
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine, why = "hf", "no generated answers to score"
    if generative:
        engine, why = choose_engine(recipe.eval.engine, recipe, has_vllm=vllm_available(), has_gpu=device == "cuda")
        if shard[0] == 1:
            print(f"[medtune] evaluation answers from {engine} ({why})", flush=True)
    base = load_model(recipe.model, model_dir, device=device)
    results: dict[str, dict[str, Any]] = {}
    local = None
    for label in ("base", "adapter"):
        if label == "adapter":
            local = storage.local_view(adapter_prefix(name, version), cache_root() / "adapters" / name / version)
            if (local / "adapter_config.json").exists():
                model = PeftModel.from_pretrained(base, str(local))
            else:  # train.method: full publishes a whole model in the same place
                del base
                model = load_model(recipe.model, str(local), device=device)
        else:
            model = base
        total, count = loss_sums(model, rows, device, recipe.eval.batch_size)
        entry: dict[str, Any] = {"loss_sum": total, "tokens": count, "outputs": [], "seconds": [], "engine": engine}
        if generative and engine == "hf":
            shown = label if shard[1] == 1 else f"{label}, shard {shard[0]}/{shard[1]}"
            entry["outputs"], entry["seconds"] = generate_answers(model, tokenizer, rows, recipe, device, shown)
        results[label] = entry
    if generative and engine == "vllm":
        from ray_jobs.evaluate.vllm_generate import free_gpu_memory, generate_with_vllm

        model = base = None  # transformers out of GPU memory before vLLM sizes its cache
        free_gpu_memory()
        answers = generate_with_vllm(recipe, model_dir, Path(local), prompt_token_ids(tokenizer, rows))
        for label, (outputs, seconds) in answers.items():
            results[label].update(outputs=outputs, seconds=seconds)
    return results


def prompt_token_ids(tokenizer, rows: list[dict[str, Any]]) -> list[list[int]]:
    """Each row's prompt (its messages without the last assistant turn) as the model reads it."""
    return [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompt_texts(tokenizer, rows)]


def prompt_texts(tokenizer, rows: list[dict[str, Any]]) -> list[str]:
    return [
        tokenizer.apply_chat_template(json.loads(r["messages"])[:-1], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]


def eval_workers(recipe: Recipe, rows: int) -> int:
    """How many shards the eval rows are split into: eval.workers, or with `auto` one per GPU in
    the Ray cluster, else one per CPU (at most 8), never more than there are batches of rows."""
    batches = max(1, -(-rows // recipe.eval.batch_size))
    if recipe.eval.workers != "auto":
        return max(1, min(recipe.eval.workers, batches))
    import ray

    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    return max(1, min(gpus if gpus else min(cpus, 8), batches))


def evaluate_rows(
    recipe: Recipe, adapter: tuple[str, str], rows: list[dict[str, Any]], generative: bool
) -> dict[str, dict[str, Any]]:
    """`evaluate_shard` over all rows, split across Ray tasks when more than one worker helps;
    answers come back in row order."""
    workers = eval_workers(recipe, len(rows))
    payload = recipe.model_dump(mode="json")
    if workers == 1:
        return evaluate_shard(payload, adapter, rows, generative)
    import ray

    size = -(-len(rows) // workers)
    shards = [rows[i : i + size] for i in range(0, len(rows), size)]
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    task = ray.remote(num_gpus=gpus, num_cpus=1, max_retries=1)(evaluate_shard)
    print(
        f"[medtune] evaluating {len(rows)} rows in {len(shards)} Ray tasks{' (one GPU each)' if gpus else ''}",
        flush=True,
    )
    parts = ray.get(
        [
            task.remote(payload, adapter, shard, generative, (number, len(shards)))
            for number, shard in enumerate(shards, start=1)
        ]
    )
    merged: dict[str, dict[str, Any]] = {}
    for label in ("base", "adapter"):
        merged[label] = {
            "engine": parts[0][label]["engine"],
            "loss_sum": sum(p[label]["loss_sum"] for p in parts),
            "tokens": sum(p[label]["tokens"] for p in parts),
            "outputs": [o for p in parts for o in p[label]["outputs"]],
            "seconds": [t for p in parts for t in p[label]["seconds"]],
        }
    return merged


def generate_answers(
    model, tokenizer, rows: list[dict[str, Any]], recipe: Recipe, device, label: str = "model"
) -> tuple[list[str], list[float]]:
    """Answers to each row's prompt (its messages without the last assistant turn): greedy for
    metrics unless the recipe samples, then with the model family's settings."""
    import torch

    from ray_jobs.core.modeling import decoding_attention

    gen = recipe.eval.generation
    tokenizer.padding_side = "left"
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    outputs, seconds = [], []
    for start in range(0, len(rows), recipe.eval.batch_size):
        chunk = rows[start : start + recipe.eval.batch_size]
        prompts = prompt_texts(tokenizer, chunk)
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id,
            **sampling_kwargs(gen, recipe.model),
        }
        started = time.perf_counter()
        with torch.no_grad(), decoding_attention(device):
            out = model.generate(**encoded, **kwargs)
        elapsed = time.perf_counter() - started
        new = out[:, encoded["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        seconds.extend([elapsed / len(chunk)] * len(chunk))
        print(
            f"[medtune] evaluation ({label}): {len(outputs)}/{len(rows)} rows answered, "
            f"{sum(seconds) / len(seconds):.2f} s per row",
            flush=True,
        )
    return outputs, seconds


def task_metrics(recipe: Recipe, rows: list[dict[str, Any]], outputs: list[str], tokenizer) -> dict[str, Any]:
    from ray_jobs.evaluate import metrics as m

    metas = [json.loads(r["meta"]) for r in rows]
    result: dict[str, Any] = {}
    wanted = recipe.eval.metrics
    if "entities" in wanted:
        parsed = [m.parse_entities(o) for o in outputs]
        result["entities"] = m.entity_scores(
            [meta.get("entities", []) for meta in metas], [p[0] for p in parsed], unique=recipe.data.unique_entities
        )
        result["entities"]["json_validity_rate"] = m.json_validity_rate([p[1] for p in parsed])
    if "format" in wanted:
        result["format"] = m.reasoning_scores(
            outputs,
            [meta.get("final_response") for meta in metas],
            count_tokens=lambda t: len(tokenizer(t)["input_ids"]),
        )
    if "sdtm" in wanted:
        result["sdtm"] = m.sdtm_step_accuracy(
            outputs, [meta.get("reference", "") for meta in metas], [str(meta.get("step", "unknown")) for meta in metas]
        )
    if "qa_safety" in wanted:
        result["qa_safety"] = m.safety_scores(outputs, [str(meta.get("category", "")) for meta in metas])
    if "audience" in wanted:
        result["audience"] = m.audience_scores(outputs, [meta.get("audience") for meta in metas])
    return result


def run(recipe: Recipe, dataset: DatasetRef, adapter: str | None = None) -> dict[str, Any]:
    """Evaluate the adapter (default: the recipe's latest) against its base on `dataset`'s eval split."""
    from ray_jobs.evaluate import metrics as m

    storage = Storage.from_uri(recipe.storage.root)
    name, version = resolve_adapter(storage, adapter or os.environ.get("MEDTUNE_ADAPTER") or recipe.name)
    if not dataset.stats["rows_out"].get("eval"):
        raise EvaluateError("data: the dataset has no eval split; set data.eval files or data.eval_fraction > 0")
    rows = _eval_rows(storage, dataset.eval_path, recipe.eval.max_samples)
    generative = [w for w in recipe.eval.metrics if w != "perplexity"]
    results = evaluate_rows(recipe, (name, version), rows, bool(generative))

    from ray_jobs.core.modeling import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(
        resolve_model_dir(recipe.model, storage),
        recipe.model.revision,
        recipe.model.trust_remote_code,
        recipe.model.chat_template,
    )
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "adapter": f"{name}@{version}",
        "base_model": recipe.model.base,
        "dataset": dataset.uri,
        "eval_rows": len(rows),
        "models": {},
    }
    samples: dict[str, list[str]] = {}
    latency: dict[str, Any] = {}
    for label, result in results.items():
        loss = result["loss_sum"] / max(result["tokens"], 1)
        entry: dict[str, Any] = {"eval_loss": loss, "perplexity": m.perplexity(loss)}
        if generative:
            entry["generation_engine"] = result["engine"]
            entry.update(task_metrics(recipe, rows, result["outputs"], tokenizer))
            samples[label] = result["outputs"]
            latency[label] = m.latency_summary(result["seconds"])
        report["models"][label] = entry
    if samples:
        report["samples"] = answer_samples(rows, samples)
    curves = training_curves(storage, name, version)
    if curves:
        report["training_curves"] = curves

    rel = report_prefix(f"{name}-{version}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        if "entities" in recipe.eval.metrics:
            pairs = [
                {
                    "row_id": r["row_id"],
                    "text": json.loads(r["messages"])[-2]["content"],
                    "true": json.loads(r["meta"]).get("entities", []),
                    "pred": m.parse_entities(o)[0],
                    "raw_output": o,
                }
                for r, o in zip(rows, samples.get("adapter", []))
            ]
            (out / "true_pred_entities.json").write_text(json.dumps(pairs, indent=2) + "\n")
            performance = {
                **report["models"]["adapter"].get("entities", {}),
                "average_inference_time_s": latency.get("adapter", {}).get("mean"),
                "latency": latency,
            }
            (out / "performance.json").write_text(json.dumps(performance, indent=2, default=str) + "\n")
        (out / "report.md").write_text(render_markdown(report))
        plot_comparison(report, out / "before_after.png")
        if curves:
            plot_curves(curves, out / "loss_curves.png")
        storage.upload_dir(out, rel, info={"adapter": f"{name}@{version}"})
    report["uri"] = storage.uri(rel)
    return report


SAMPLE_ANSWERS = 5
"""Eval rows whose base and adapter answers the report shows side by side."""
SAMPLE_CHARS = 600


def answer_samples(rows: list[dict[str, Any]], outputs: dict[str, list[str]]) -> list[dict[str, str]]:
    """The first eval rows' prompt, reference answer and each model's answer (texts cut at
    SAMPLE_CHARS): what the metrics were computed from, for a reader to judge. Eval rows are
    the preprocessed ones, so PHI is already scrubbed from them."""

    def cut(text: str) -> str:
        return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " [...]"

    picked = []
    for index, row in enumerate(rows[:SAMPLE_ANSWERS]):
        messages = json.loads(row["messages"])
        prompt = next((m["content"] for m in reversed(messages[:-1]) if m["role"] == "user"), "")
        entry = {"row_id": row["row_id"], "prompt": cut(prompt), "reference": cut(messages[-1]["content"])}
        for label, answers in outputs.items():
            entry[label] = cut(answers[index])
        picked.append(entry)
    return picked


def _quoted(text: str) -> list[str]:
    return ["> " + line if line else ">" for line in text.splitlines() or [""]]


def _headline(entry: dict[str, Any]) -> dict[str, float]:
    values = {"eval_loss": entry["eval_loss"], "perplexity": entry["perplexity"]}
    if "entities" in entry:
        values["entity_f1_exact"] = entry["entities"]["exact"]["f1"]
        values["json_validity"] = entry["entities"]["json_validity_rate"] or 0.0
    if "format" in entry:
        values["format_compliance"] = entry["format"]["compliance_rate"] or 0.0
    if "sdtm" in entry:
        values["sdtm_accuracy"] = entry["sdtm"]["accuracy"] or 0.0
    if "qa_safety" in entry:
        values["refusal_rate"] = entry["qa_safety"]["refusal_rate"] or 0.0
    if "audience" in entry:
        values["audience_adherence"] = entry["audience"]["adherence_rate"] or 0.0
    return values


def training_curves(storage: Storage, name: str, version: str) -> dict[str, list[list[float]]]:
    """Training and eval loss by step ({"loss": [[step, value], ...], "eval_loss": ...}), read
    from the TensorBoard logs of the run that produced the adapter; {} when there are none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        lineage = Lineage.read(storage, name, version)
    except (FileNotFoundError, OSError, ValueError, TypeError):
        return {}
    run = (lineage.run or "").rstrip("/")
    if not run:
        return {}
    rel = posixpath.join(run_prefix(posixpath.basename(run)), "tensorboard")
    curves: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = storage.local_view(rel, Path(tmp) / "tensorboard")
        except (FileNotFoundError, OSError):
            return {}
        if not local.is_dir():
            return {}
        events = EventAccumulator(str(local))
        events.Reload()
        for key in ("loss", "eval_loss"):
            if f"train/{key}" in events.Tags().get("scalars", []):
                curves[key] = [[event.step, event.value] for event in events.Scalars(f"train/{key}")]
    return curves


def plot_curves(curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for key, points in curves.items():
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o" if len(points) < 30 else None,
            label={"loss": "training loss", "eval_loss": "eval loss"}.get(key, key),
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target token)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(report: dict[str, Any]) -> str:
    base, after = _headline(report["models"]["base"]), _headline(report["models"]["adapter"])
    lines = [
        f"# Evaluation: {report['adapter']}",
        "",
        f"Base model `{report['base_model']}`, {report['eval_rows']} eval rows from `{report['dataset']}`.",
        "",
        "| metric | base | adapter | change |",
        "|---|---:|---:|---:|",
    ]
    for key in base:
        lines.append(f"| {key} | {base[key]:.4f} | {after[key]:.4f} | {after[key] - base[key]:+.4f} |")
    lines += ["", "![before vs after](before_after.png)", ""]
    if report.get("training_curves"):
        lines += ["Training run's loss by step:", "", "![loss curves](loss_curves.png)", ""]
    if report.get("samples"):
        lines += [
            "## Sample answers",
            "",
            f"The first {len(report['samples'])} eval rows, greedy unless the recipe samples.",
            "",
        ]
        for sample in report["samples"]:
            lines += [f"### `{sample['row_id']}`", "", "Prompt:", "", *_quoted(sample["prompt"]), ""]
            lines += ["Reference:", "", *_quoted(sample["reference"]), ""]
            for label in ("base", "adapter"):
                if label in sample:
                    lines += [f"{label.capitalize()} model:", "", *_quoted(sample[label]), ""]
    return "\n".join(lines)


def plot_comparison(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, after = _headline(report["models"]["base"]), _headline(report["models"]["adapter"])
    keys = [k for k in base if k != "perplexity"]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(keys)), 3.2))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [base[k] for k in keys], width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [after[k] for k in keys], width=0.4, label="adapter")
    ax.set_xticks(list(xs), keys, rotation=15)
    ax.set_title(f"{report['adapter']}: before vs after")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(recipe: Recipe, dataset: DatasetRef, adapter: str | None = None) -> dict[str, Any]:
    report = run(recipe, dataset, adapter)
    base, after = _headline(report["models"]["base"]), _headline(report["models"]["adapter"])
    summary = ", ".join(f"{k} {base[k]:.3f} -> {after[k]:.3f}" for k in base)
    print(f"[medtune] evaluation of {report['adapter']}: {summary}\n[medtune] report: {report['uri']}/report.md")
    return report
